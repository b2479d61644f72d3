"""Measurement: `llava-bench` (PyTorch against the runtime, with the machine's roofline) and
the GPU check. Both run the runtime's own code, timed from outside."""
