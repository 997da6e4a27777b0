#!/usr/bin/env bash
# Runs on a lent GPU machine (device tool), from the repository root, after the host has carried:
#   .whl/onnxruntime_gpu-*.whl.part-*   the onnxruntime-gpu wheel (cp312, CUDA 13) split into < 60 MiB parts,
#                                        sent in successive calls while the machine stays warm
#   .graphs/*.onnx                       from `python -m bench.gpu_step prepare --out .graphs`
# Writes gpu.json and gpu.md under $OUT. See docs/BENCHMARKS.md ("GPU") for the whole procedure.
set -euo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/site
wheel=$(ls .whl/*.whl.part-* | head -1 | sed 's/\.part-.*//')
[ -f "/tmp/$(basename "$wheel")" ] || cat "$wheel".part-* > "/tmp/$(basename "$wheel")"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "/tmp/$(basename "$wheel")"
export PYTHONPATH=/tmp/site:$PWD
# The CUDA 13 and cuDNN 9 libraries come as nvidia-* pip packages on that image: let ONNX Runtime find them.
python3 - <<'PY'
import onnxruntime as ort
ort.preload_dlls()
print(ort.__version__, ort.get_available_providers())
PY
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -m bench.gpu_step measure --graphs .graphs --provider cuda --json "$OUT/gpu.json" | tee "$OUT/gpu.md"
