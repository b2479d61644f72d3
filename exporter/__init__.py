"""The exporter: PyTorch/transformers LLaVA checkpoints to ONNX artifacts and TensorRT engines,
and the benchmarks against the PyTorch reference. torch and transformers are imported in this
package only, never by the runtime (exporter.engine needs neither)."""
