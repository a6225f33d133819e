"""Final tidy of a rewritten model with onnx-graphsurgeon: drop whatever the rewrite left
dangling and sort every graph (subgraphs included) topologically."""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from .large import is_large


def tidy(model: onnx.ModelProto) -> onnx.ModelProto:
    if is_large(model):
        return model        # graphsurgeon serialises through one protobuf; leave huge models be
    graph = gs.import_onnx(model)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    out = gs.export_onnx(graph, do_type_check=False)
    out.ir_version = model.ir_version
    del out.opset_import[:]
    out.opset_import.extend(model.opset_import)
    for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(out, field, getattr(model, field))
    del out.metadata_props[:]
    out.metadata_props.extend(model.metadata_props)
    return out
