"""Everything that reads or edits ONNX protobufs lives here."""
