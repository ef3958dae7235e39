"""Gradient jobs: guided backprop, DeepDream and neural style transfer in PyTorch worker processes.

Two layers (docs/SERVICE_INTERFACES.md, "Gradient jobs"):

- `pool.py` runs jobs in spawned worker processes and knows nothing about the algorithms;
- `tasks.py` is the job interface the pool calls (`load_models`, `handle`, `estimate_cost`) and the
  picklable task/result dataclasses; `guided_backprop.py`, `deepdream.py` and `style_transfer.py`
  are the algorithms on plain tensors; `rendering.py` turns arrays into PNGs.

`tasks.py` and `rendering.py` never import torch at module level, so the serving process can build
tasks and estimate their cost without loading PyTorch; only the workers do.
"""
