#!/usr/bin/env bash
# Prepares, on this machine, what bench/gpu_node.sh needs on a lent GPU machine (see docs/BENCHMARKS.md,
# "GPU"): .gpu (model repository with an fp16 variant, a redis-server copy, the step graphs, the service's
# wheels for Python 3.12) and the onnxruntime-gpu package as a tar.xz in parts small enough to carry one
# per call (.whl0, .whl1, ...; the last part goes in .gpu). Takes a few minutes (xz).
set -euo pipefail
PY=${PY:-.venv/bin/python}
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64"
PLATFORMS="$PLATFORMS --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64"
mkdir -p .git/info
for path in /.gpu/ /.whl0/ /.whl1/ /.whl2/ /.whl3/ /.whl4/ /.whl5/ /.whl6/ /.whl7/; do
  grep -qx "$path" .git/info/exclude 2>/dev/null || echo "$path" >> .git/info/exclude
done
rm -rf .gpu .whl[0-9]
"$PY" -m bench.gpu_service prepare --out .gpu
"$PY" -m bench.gpu_step prepare --out .gpu/graphs
# The service's own dependencies, at the versions of the lock file (the GPU image has other versions).
mkdir -p .gpu/wheels
for name in annotated-types grpcio grpcio-health-checking grpcio-reflection hdrhistogram hiredis pbr prometheus_client \
  protobuf pydantic pydantic-settings pydantic_core python-dotenv redis typing-inspection typing_extensions; do
  pin=$(grep -i "^${name//[-_]/[-_]}==" requirements/lock.txt)
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS \
    -d .gpu/wheels "$pin"
done
work=$(mktemp -d)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS \
  -d "$work" "$(grep -i '^onnxruntime-gpu==' requirements/lock.txt)"
(cd "$work" && mkdir x && cd x && unzip -q ../onnxruntime_gpu-*.whl && rm -f onnxruntime/capi/libonnxruntime_providers_tensorrt.so \
  && tar -cf - onnxruntime onnxruntime_gpu-*.dist-info | xz -T0 -6 > ../ort.tar.xz && cd .. && split -b 48m -d ort.tar.xz ort.part-)
parts=("$work"/ort.part-*)
for i in $(seq 0 $((${#parts[@]} - 2))); do mkdir -p ".whl$i"; mv "${parts[$i]}" ".whl$i/"; done
mv "${parts[-1]}" .gpu/  # the last part travels with the final call
rm -rf "$work"
du -sh .gpu .whl[0-9]
