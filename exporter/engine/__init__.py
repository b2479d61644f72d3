"""`llava-export engine`: TensorRT plans from an artifact folder. Imports neither torch nor
exporter.graphs: engines are built where ONNX and TensorRT are, often without the exporter's stack."""
