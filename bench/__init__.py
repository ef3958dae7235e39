"""cnnserve benchmarks: every served number next to an in-process baseline measured in the same run.

`make bench` (`python -m bench`) builds or reuses ./artifacts/bench_repository (LeNet-5 trained,
ResNet-50 random), then measures

* resnet50: raw ONNX Runtime in-process (bench.raw_ort) vs the real server subprocess with JPEG
  requests at concurrency 1 (latency) and 16 (throughput), plus the server's batch-size histogram;
* lenet5: Classify requests/s vs a bare grpc.aio echo server (bench.load) driven by the same
  client, and ClassifyStream images/s;
* gradients: bench.gradients (ours vs raw PyTorch), and classification p99 while a style-transfer
  job runs next to the server;
* startup (only with `--parts startup`; bench.startup): seconds from spawn to health SERVING, per
  model load and warm-up, and the idle RSS of the server's process tree, for all six demo models,
  ResNet-50 alone and lenet5 next to VGG-19 (issue 13);

and writes the results table to BENCHMARKS.md. `python -m bench --help` for the parts and --quick.
"""
