#!/usr/bin/env bash
# The whole GPU job of docs/benchmarks.md in one command (a few minutes on an H200): the GPU
# speed table of the shipped model (bf16 and float32, batch 1 to 8192), the network's points/s
# against the device's bf16 matrix peak, the GPU code paths' tests run on the GPU, and the KeOps
# child-process probe. Results go to $OUT (or ./gpu_out).
#
# On a machine whose Python has CUDA torch but not pcshower's pure-Python needs (the project's
# lent H200 image lacks zuko), carry their wheels in .whl/ (docs/benchmarks.md, "GPU"):
#     pip download --no-deps --only-binary=:all: -d .whl zuko==1.2.0
# and run from the repository root:
#     bash benchmarks/gpu_run.sh
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
python3 - <<'EOF' 2>&1 | tee "$OUT/device.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
EOF
# 1. the GPU code paths, their CPU tests run again with CUDA visible (they pick the GPU where
#    they take a device)
timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/test_models_points.py \
    tests/test_fewstep_models.py tests/test_generate.py 2>&1 | tail -5 | tee "$OUT/tests.txt"
# 2. the KeOps probe must refuse a crashing pykeops in a child process, never crash us
python3 -c "from pcshower.evaluate import _keops; print('keops usable on cuda:', _keops.keops_available('cuda'))" \
    2>&1 | tail -2 | tee "$OUT/keops.txt"
# 3. the speed table: 1 and 16 steps, batch 1 ... 8192, bf16 and float32
for dtype in bfloat16 float32; do
    timeout 600 python3 -m pcshower.cli bench --device cuda --dtype "$dtype" --steps 1 16 \
        --batch-sizes 1 64 1024 8192 --energies 50 --repeats 3 --budget 60 --reference-n 0 \
        --out "$OUT/bench_$dtype" 2>&1 | tail -30
done
# 4. network points/s against the bf16 peak (EPiC: ~2 FLOP per weight per point and call)
python3 benchmarks/gpu_peak.py "$OUT" 2>&1 | tee "$OUT/peak.txt"
echo "wrote $OUT"
