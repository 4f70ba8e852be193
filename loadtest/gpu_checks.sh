#!/usr/bin/env bash
# The GPU checks and benchmarks (run where a CUDA GPU is present; figures in docs/benchmarks.md):
#   verify against the reference fixtures in float32 and bfloat16 (ALIT: every batch mode; KARL and
#   One-D-Piece: their fixtures too);
#   the engine benchmark with alit_small-sized random weights at 256 px, float32 and bfloat16,
#   with FLOP utilisation against a measured matmul peak;
#   families at the same targets: alit_small vs karl_small vs one_d_piece_s256 (random weights, 256 px)
#   through the engine,
#   bfloat16 and float32, each capped at FAMILIES_TIMEOUT seconds (default 600).
# Usage: loadtest/gpu_checks.sh OUT_DIR [extra bench args...]
set -uo pipefail
out=${1:?output directory}; shift
mkdir -p "$out"
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"
for dtype in float32 bfloat16; do
  for mode in packed cohort padded; do
    echo "== verify --device cuda --dtype $dtype --batch-mode $mode"
    "$py" -m service.cli verify tests/fixtures/alit-reference --device cuda --dtype "$dtype" --batch-mode "$mode"
    echo "exit $?"
  done
  for fixture in karl-reference one-d-piece-reference; do
    echo "== verify tests/fixtures/$fixture --device cuda --dtype $dtype"
    "$py" -m service.cli verify "tests/fixtures/$fixture" --device cuda --dtype "$dtype"
    echo "exit $?"
  done
done 2>&1 | tee "$out/verify_cuda.txt"
for dtype in float32 bfloat16; do
  "$py" -m service.cli bench --device cuda --dtype "$dtype" --model preset:alit_small --quick --flops \
    --json "$out/bench_cuda_alit_small_$dtype.json" "$@" 2>&1 | tee "$out/bench_cuda_alit_small_$dtype.txt"
done
# Families at the same targets (docs/benchmarks.md, "Families at the same targets"): every corpus image
# through each model's engine at each max_l1 target. Random weights: the cost columns mean something,
# tokens / L1 / target met do not.
for dtype in bfloat16 float32; do
  timeout "${FAMILIES_TIMEOUT:-600}" "$py" -m service.cli bench --device cuda --dtype "$dtype" \
    --families alit=preset:alit_small,karl=preset:karl_small,one_d_piece=preset:one_d_piece_s256 --targets 0.05,0.1,0.2 \
    --json "$out/families_cuda_$dtype.json" 2>&1 | tee "$out/families_cuda_$dtype.txt"
  echo "exit ${PIPESTATUS[0]}" | tee -a "$out/families_cuda_$dtype.txt"
done
