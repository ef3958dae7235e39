"""The cnnserve gRPC service: ONNX Runtime classification and PyTorch gradient jobs."""

__version__ = "0.1.0"
