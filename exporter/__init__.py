"""The exporter: PyTorch/transformers LLaVA checkpoints to ONNX artifacts. torch and
transformers are imported here and only here."""
