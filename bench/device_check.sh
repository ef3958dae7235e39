#!/usr/bin/env bash
# The device check (issue 12): on a lent GPU machine, through the device tool, in under 8 minutes.
# Prepare here with bench/device_wheels.sh (it prints the calls), then:
#
#   bash bench/device_check.sh stage   # once per .devwheels/ort-NN part carried: the parts of the
#                                      # onnxruntime-gpu wheel wait in $STAGE on the warm machine
#   bash bench/device_check.sh         # carry .devwheels/small: join + verify + install the wheels,
#                                      # then `pytest -m gpu` and the ResNet-50 and proxy rows on CUDA
#
# What it writes under $OUT (the device tool brings it back): pytest-gpu.log, bench.log,
# bench.json, machine.txt. Record the tables in BENCHMARKS.md by hand ("GPU device check").
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=/root/cnnserve-devwheels  # outside the checkout: kept while the machine stays warm
OUT=${OUT:-/tmp/cnnserve-device-out}
mkdir -p "$OUT"

if [ "${1:-}" = stage ]; then
    mkdir -p "$STAGE"
    cp -v .devwheels/ort-* "$STAGE"/
    ls -l "$STAGE"
    exit 0
fi

name=$(cat .devwheels/small/ort.name) || { echo "carry .devwheels/small (bench/device_wheels.sh)"; exit 2; }
cat "$STAGE"/ort-* > "/tmp/$name" 2>/dev/null
if ! (cd /tmp && sha256sum -c --quiet "$OLDPWD/.devwheels/small/ort.sha256"); then
    echo "the onnxruntime-gpu wheel is incomplete: staged parts are"; ls -l "$STAGE"
    exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "/tmp/$name" .devwheels/small/*.whl || exit 2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
# ONNX Runtime's CUDA provider needs CUDA 13's libraries (cudart, cuBLAS, cuDNN, cuFFT, cuRAND):
# the image's torch brought them as nvidia-* wheels; point the loader at their folders.
site=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
LD_LIBRARY_PATH=$(find "$site/nvidia" -name 'lib*.so*' -printf '%h\n' 2>/dev/null | sort -u | paste -sd:)
export LD_LIBRARY_PATH

{
    date -u
    nvidia-smi -L
    nproc
    python3 -c "import onnxruntime as o, torch, grpc; print('onnxruntime', o.__version__, o.get_available_providers()); print('torch', torch.__version__, torch.cuda.is_available()); print('grpc', grpc.__version__)"
    python3 -c "from service.engine.providers import cuda_status; print(cuda_status(0))"
} 2>&1 | tee "$OUT/machine.txt"

status=0
timeout 240 python3 -m pytest -p no:cacheprovider -m gpu -q tests/integration/test_gpu.py 2>&1 \
    | tee "$OUT/pytest-gpu.log" || status=1
timeout 270 python3 -m bench --parts resnet,proxy --quick --resnet-frontends 1,8 \
    --resnet-concurrency 16,64 --proxy-frontends 1,4,8 --no-write --json "$OUT/bench.json" 2>&1 \
    | tee "$OUT/bench.log" || status=1
exit $status
