"""A toy LLaVA that really answers: procedural shape images (data.py) and its training (train.py).

The shipped weights (models/toy-llava, models/toy-llava-original + models/toy-clip) come from
`python -m exporter.toy.train --out models/toy-llava`; docs/toy-model.md tells how.
"""
