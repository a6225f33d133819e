"""Image-folder calibration: sizes from the model, aspect-preserving resizes, EXIF orientation,
sub-folders and every format Pillow reads; bad choices refused."""

import numpy as np
import pytest
from PIL import Image

from onnxq.calib.data import Preprocess, open_source
from onnxq.errors import CalibrationError
from onnxq.types import InputSpec

SPEC = [InputSpec("x", np.dtype(np.float32), (None, 3, 6, 10))]


def _save(path, array, exif_orientation=None):
    img = Image.fromarray(array)
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        img.save(path, exif=exif)
    else:
        img.save(path)


def test_images_in_sub_folders_and_other_formats_take_the_model_size(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "a").mkdir()
    _save(tmp_path / "one.png", (rng.random((20, 20, 3)) * 255).astype(np.uint8))
    _save(tmp_path / "a" / "two.webp", (rng.random((30, 12, 3)) * 255).astype(np.uint8))
    _save(tmp_path / "a" / "three.tif", (rng.random((9, 40, 3)) * 255).astype(np.uint8))
    feeds = [load() for load in open_source(tmp_path, SPEC, Preprocess())]
    assert len(feeds) == 3 and all(f["x"].shape == (1, 3, 6, 10) for f in feeds)


def test_crop_keeps_the_aspect_and_letterbox_pads(tmp_path):
    img = np.zeros((12, 40, 3), np.uint8)
    img[:, :20] = 255                                   # left half white, right half black
    _save(tmp_path / "wide.png", img)
    unit = dict(mean=(0, 0, 0), std=(1, 1, 1))
    crop = open_source(tmp_path, SPEC, Preprocess(resize="crop", **unit))[0]()["x"][0, 0]
    box = open_source(tmp_path, SPEC, Preprocess(resize="letterbox", **unit))[0]()["x"][0, 0]
    stretch = open_source(tmp_path, SPEC, Preprocess(resize="stretch", **unit))[0]()["x"][0, 0]
    assert crop[:, 0].min() > 0.9 and crop[:, -1].max() < 0.1          # a centre crop: both halves, full height
    assert np.allclose(box[0], 114 / 255, atol=0.02) and np.allclose(box[-1], 114 / 255, atol=0.02)  # grey bars
    assert not np.allclose(stretch[0], 114 / 255, atol=0.02)            # stretched: no bars


def test_exif_orientation_is_applied(tmp_path):
    img = np.zeros((10, 6, 3), np.uint8)
    img[0, :] = 255                                     # the stored top row is white
    _save(tmp_path / "rotated.jpg", img, exif_orientation=6)   # "rotate 90 clockwise to view"
    spec = [InputSpec("x", np.dtype(np.float32), (None, 3, 6, 10))]
    x = open_source(tmp_path, spec, Preprocess(resize="stretch", mean=(0, 0, 0), std=(1, 1, 1)))[0]()["x"][0, 0]
    assert x[:, -1].mean() > 0.6 and x[0, :].mean() < 0.6   # the white row now runs down the right side


@pytest.mark.parametrize("kw, message", [(dict(layout="NWHC"), "layout must be one of NCHW, NHWC"),
                                         (dict(channel_order="GRB"), "channel_order must be one of RGB, BGR"),
                                         (dict(resize="fit"), "resize must be one of crop")])
def test_invalid_preprocessing_choices_are_refused(kw, message):
    with pytest.raises(CalibrationError, match=message):
        Preprocess(**kw)


def test_a_dynamic_input_needs_a_size(tmp_path):
    _save(tmp_path / "x.png", np.zeros((8, 8, 3), np.uint8))
    dynamic = [InputSpec("x", np.dtype(np.float32), (None, 3, None, None))]
    with pytest.raises(CalibrationError, match="no fixed height and width: give --size"):
        open_source(tmp_path, dynamic, Preprocess())[0]()
