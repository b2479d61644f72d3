"""The ONNX graphs of an artifact folder and the one path that exports and validates them."""
