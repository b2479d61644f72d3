"""The ONNX graphs of an artifact folder and the one path that exports and validates them (export.py).

Imports nothing, so that `llava-export --help` shows DEFAULT_OPSET where the exporter's
dependencies are not installed.
"""

DEFAULT_OPSET = 18  # the ONNX opset every graph is written in, unless --opset says otherwise
