#!/usr/bin/env bash
# One short device check for a lent GPU (see docs/benchmarks.md): the GPU test, then the geometry
# and kernel benchmarks on CUDA, each log written to $OUT (default ./gpu-out). About 5–8 minutes
# on an H100 with a warm pip cache; set up the environment first as the README says.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" > "$OUT/torch.txt" 2>&1
timeout 240 python -m pytest -q -s tests/test_gpu.py > "$OUT/test_gpu.txt" 2>&1; echo "test_gpu rc=$?" >> "$OUT/test_gpu.txt"
timeout 150 python benchmarks/barrier.py --device cuda --quick > "$OUT/barrier.txt" 2>&1
timeout 90 python benchmarks/hessian.py --device cuda --quick > "$OUT/hessian.txt" 2>&1
tail -n 3 "$OUT"/*.txt
