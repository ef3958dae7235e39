#!/usr/bin/env bash
# Here, on the machine without a GPU: fetch the wheels that bench/device_check.sh installs on a lent
# GPU machine, into .devwheels/ (git-ignored, so nothing travels unless a device call carries it).
#
# A device call carries at most 64 MiB and the onnxruntime-gpu wheel is 255 MB (its CUDA provider
# alone is 231 MB compressed), so the wheel is cut into parts of PART_MIB (default 56) MiB:
# .devwheels/ort-00, ort-01, ...; each travels in its own `stage` call and waits on the warm
# machine, outside the checkout. .devwheels/small holds the other wheels the device image lacks,
# the wheel's name and its sha256. Versions are those of this checkout's .venv (`make install`).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=.devwheels
PART_MIB=${PART_MIB:-56}
PINS=$(.venv/bin/python - <<'PY'
from importlib.metadata import version

# What cnnserve needs that the device image ('cuda': torch, numpy, pillow, onnx, onnxscript,
# prometheus-client, pytest, ... are there) lacks or has in another version.
names = [
    "onnxruntime-gpu", "grpcio", "grpcio-health-checking", "grpcio-reflection", "protobuf",
    "pydantic", "pydantic-core", "pydantic-settings", "annotated-types", "typing-inspection",
    "python-dotenv",
]
print(" ".join(f"{name}=={version(name)}" for name in names))
PY
)
rm -rf "$OUT"
mkdir -p "$OUT/download" "$OUT/small"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$OUT/download" $PINS
wheel=$(cd "$OUT/download" && ls onnxruntime_gpu-*.whl)
(cd "$OUT/download" && sha256sum "$wheel") > "$OUT/small/ort.sha256"
echo "$wheel" > "$OUT/small/ort.name"
split -b "${PART_MIB}M" -d "$OUT/download/$wheel" "$OUT/ort-"
rm "$OUT/download/$wheel"
mv "$OUT"/download/*.whl "$OUT/small/"
rmdir "$OUT/download"
echo "wheels for the device in $OUT:"
du -sh "$OUT"/ort-* "$OUT/small"
parts=$(cd "$OUT" && ls -d ort-* | sed 's/^/.devwheels\//' | tr '\n' ' ')
cat <<MSG
Then, with the device tool, one call per part (the machine stays warm 30 s between calls):
$(for p in $parts; do echo "  run(carry=[\"$p\"], command=\"bash bench/device_check.sh stage\")"; done)
and the check itself (under 8 minutes):
  run(carry=[".devwheels/small"], command="bash bench/device_check.sh", timeout_s=540)
MSG
