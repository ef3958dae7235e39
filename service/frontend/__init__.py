"""The frontend room: everything a gRPC process runs, and never PyTorch or ONNX Runtime.

Imports run one way, top to bottom:

    server.py         the process: grpc.aio, health (health.py), reflection (reflection.py),
                      the interceptor (interceptors.py), metrics HTTP, start-up and drain;
                      gradient_tier.py is the same server for `cnnserve worker`
    inference.py      cnnserve.v1.Inference      oip.py -> triton.py   inference.GRPCInferenceService
    classify.py       the one classify path: admit -> decode -> infer -> softmax (engine protocol)
    gradients.py      gradient backends: LocalGradients (this process's pool)
    forwarding.py     ForwardedGradients (the gradient tier) and its channel
    convert.py        protobuf <-> domain, conversions only
    calls.py          where a failure becomes a status: unary, streamed, item
    state.py          the models served, the settings, draining

service.engine.protocol is the only piece of the engine room imported here; server.py builds the
ONNX Runtime engine lazily. tests/unit/service/test_no_torch.py holds the line.
"""
