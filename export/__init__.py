"""The export stage: the architectures, LeNet-5 training and the PyTorch -> ONNX model repository."""
