"""The engine room: ONNX Runtime sessions and the dynamic batchers, tensors in and logits out.

protocol.py (the contract the frontend uses; imports nothing heavy) <- engine.py
(ClassificationEngine: load, admit, infer) -> batcher.py (exact admission, dynamic batches) and
session.py (one ONNX Runtime session) -> providers.py (CUDA or CPU, detected). Only engine.py,
session.py and providers.py import onnxruntime; import them where the engine really runs.
"""
