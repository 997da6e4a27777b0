#!/usr/bin/env bash
# The GPU node measurements, on a lent GPU machine (device tool), from the repository root. Earlier calls
# carried the onnxruntime-gpu package (tar.xz, split) part by part into /tmp/ortparts; this call carries
# .gpu: `python -m bench.gpu_service prepare --out .gpu`, the step graphs (`python -m bench.gpu_step
# prepare --out .gpu/graphs`), the service's wheels for Python 3.12 (.gpu/wheels) and the last part.
# Writes under $OUT: the GPU's name, the step figures on CUDA and on the CPU (gpu*.json, gpu*.md), and
# the whole service's figures (service.json, service.md). See docs/BENCHMARKS.md ("GPU").
# A rehearsal on a machine without a GPU: REHEARSE=1 PY=.venv/bin/python bench/gpu_node.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
PY=${PY:-python3}
PROVIDER=${PROVIDER:-cuda}
mkdir -p "$OUT" /tmp/site /tmp/ortparts /tmp/logs
if [ -z "${REHEARSE:-}" ]; then
  cp .gpu/ort.part-* /tmp/ortparts/ || exit 1
  ls -l /tmp/ortparts
  if [ ! -d /tmp/site/onnxruntime ]; then
    cat /tmp/ortparts/ort.part-* > /tmp/ort.tar.xz || exit 1
    "$PY" -c "import tarfile; tarfile.open('/tmp/ort.tar.xz').extractall('/tmp/site', filter='data')" || exit 1
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpu/wheels/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu-name.txt"
fi
"$PY" -c "import onnxruntime as ort; ort.preload_dlls(); print(ort.__version__, ort.__file__, ort.get_available_providers())"
scale=${SCALE:-1}
steps=$((200 / scale))
if [ -z "${SKIP_STEP:-}" ]; then  # SKIP_STEP=1: the whole service only
timeout 120 "$PY" -m bench.gpu_step measure --graphs .gpu/graphs --provider "$PROVIDER" --steps "$steps" \
  --json "$OUT/gpu.json" > "$OUT/gpu.md" 2>&1
tail -32 "$OUT/gpu.md"
timeout 60 "$PY" -m bench.gpu_step measure --graphs .gpu/graphs --provider cpu --batches 1,8,64,256 \
  --steps $((100 / scale)) --json "$OUT/gpu-cpu.json" > "$OUT/gpu-cpu.md" 2>&1
tail -12 "$OUT/gpu-cpu.md"
fi
providers=${PROVIDERS:-cuda,cpu}
[ -n "${REHEARSE:-}" ] && providers=cpu
timeout 300 "$PY" -m bench.gpu_service measure --prepared .gpu --providers "$providers" --scale "$scale" \
  --json "$OUT/service.json" --logs /tmp/logs > "$OUT/service.md" 2>&1
tail -45 "$OUT/service.md"
tar -czf "$OUT/logs.tgz" -C /tmp logs
