"""The lightweight LLaVA runtime: reads only an artifact folder (numpy, onnxruntime,
tokenizers, pillow; tensorrt lazily). It never imports torch or transformers."""
