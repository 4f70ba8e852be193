#!/usr/bin/env bash
# The GPU checks and benchmarks (run where a CUDA GPU is present; figures in docs/benchmarks.md), in
# order of value: each step runs under its own time cap (`timeout`) and writes its own file in OUT_DIR,
# and the next step runs whatever the last one did. A summary (step, exit, seconds, file) ends the run
# and is kept in OUT_DIR/summary.txt.
#
# On the GPU machine (python3.12 with torch + CUDA, numpy, pillow, safetensors, pyyaml, scikit-image,
# scikit-learn, pandas, pyarrow, tqdm, prometheus-client, pytest, matplotlib; no network, and not
# pydantic-settings and what it needs, which verify and bench import):
#   here, first:  loadtest/gpu_wheels.sh     # ~3 MB of wheels into .whl/ (git-ignored: send it along)
#   there:        python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#                 loadtest/gpu_checks.sh OUT_DIR [extra bench args...]
#   (this script runs that install itself when .whl/ is there and pydantic_settings does not import)
#
# Time: one device call may run 10 minutes and a lent GPU gives about 15 device-minutes in all, machine
# start included, so by default the whole run fits one call: BUDGET_S=570 seconds, of which the final
# training step keeps TRAIN_MINUTES * 60 + TRAIN_SLACK_S (6 min + 45 s; gpu-job sizes itself to
# TRAIN_MINUTES, which may be fractional, and this is its cap). Every other step's cap is cut to what
# is left of the budget before that; a step with less than MIN_STEP_S (30) left is skipped, and says so. With the defaults that is
# about 2.5 minutes for the GPU's identity, verify and the bfloat16 bench. TRAIN_MINUTES=0 skips training
# and gives the other steps the whole budget; ONLY="verify bench_bf16 train" (step names) runs just those.
# Measured on an H200 (2026-12-04): verify 16 s, bench_bf16 --no-simulate 45 s (81 s at --max-batch 256
# with 1,024 requests), one bulk_bf16 round 40 s, speed_bf16 17 s, gpu-job 250 s for TRAIN_MINUTES=4.5.
# In order (each cap an environment variable, the header it prints lists them):
#   env                    nvidia-smi and torch's view of the GPU
#   verify                 the reference fixtures on CUDA: ALIT in bfloat16 and float32 (packed, then
#                          cohort and padded), KARL and One-D-Piece in both; all three in bfloat16 with
#                          --batch-mode varlen (flash attention's variable-length kernel)
#   bench_bf16             alit-serve bench --device cuda --model preset:alit_small --quick --flops at 256 px:
#                          per-stage profile, FLOP utilisation, per-strategy saturation throughput, p50/p99
#                          at 40 % and 70 % load
#   bench_bf16_padded      the same with --batch-mode padded: one attention call per step over mixed lengths
#                          (key masks) instead of packed mode's one per distinct length, which the H200 run
#                          suggests costs continuous batching its 7-10 % at saturation
#   bench_bf16_varlen      the same with --batch-mode varlen: packed tokens and ONE variable-length flash
#                          attention call per layer, neither padding FLOPs nor a call per length
#   bench_bf16_refill025   the same with --refill-at 0.25 (saturated: cohorts once a quarter of the batch is
#                          left, the CPU's default) against the GPU's default 1.0 (every free slot at once):
#                          which wins on a GPU is not measured yet (docs/benchmarks.md, "Saturation")
#   bench_bf16_measured    the same with --admission measured (a CPU's default: images in flight below
#                          saturation capped at the step-cost curve's knee) against the GPU's max_batch
#                          (docs/benchmarks.md, "Latency, paired"); its JSON records the knee
#   bulk_bf16              tokenize-dataset against the engine alone (loadtest/bulk_vs_engine.py), same model,
#                          dtype and images: GPU_IMAGES (500) of make_folders.py --gpu, made in the background
#   speed_bf16             every speed setting (ALIT_CHANNELS_LAST, ALIT_CUDA_GRAPHS) against the default
#                          on CUDA in bfloat16: the VQGAN stacks' outputs (PASS/FAIL at the dtype's
#                          tolerance) and ms per image at batch 32, 7 and 1 (`python -m service.model.speed`)
#   speed_bf16_compile     the same for ALIT_COMPILE=vqgan and all three settings together
#   bench_bf16_all         the same with --channels-last --compile vqgan --cuda-graphs
#   bench_float32          the bench in float32
#   speed_float32          the settings' check in float32 (strict: tolerance 1e-4), compile excepted
#   bench_bf16_<one>       the bench with each setting alone: cuda_graphs, channels_last, compile_vqgan
#   profile_steps_bf16     loadtest/profile_steps.py: where a scheduler step's time goes (cProfile), bfloat16
#   families_<dtype>       alit_small vs karl_small vs one_d_piece_s256 at the same targets, bfloat16 and
#                          float32 (random weights: the cost columns mean something, tokens / L1 / target met do not)
#   train                  python -m service.training gpu-job --budget-minutes TRAIN_MINUTES [--corpus
#                          runs/corpus when carried], into OUT_DIR/train_run and OUT_DIR/train_export
# Usage: loadtest/gpu_checks.sh OUT_DIR [extra bench args...]
# PACK_DIR=DIR (e.g. the device call's $OUT, which brings back at most 8 files of 16 MB): at the end,
# everything but checkpoints and the crop pool as DIR/gpu_checks.tgz, and the trained model directory as
# DIR/train_export.tar.part-aa, -ab, ... (15 MB pieces; `cat train_export.tar.part-* | tar x` here).
set -uo pipefail
out=${1:?output directory}; shift
mkdir -p "$out" && out=$(cd "$out" && pwd) || exit 2
cd "$(dirname "$0")/.." || exit 2
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1  # a step cut at its cap still leaves its output so far
start=$SECONDS
budget=${BUDGET_S:-570}
train_minutes=${TRAIN_MINUTES:-6}
only=${ONLY:-}
train_keep=$(awk -v m="$train_minutes" -v s="${TRAIN_SLACK_S:-45}" 'BEGIN { print (m > 0) ? int(m * 60 + s) : 0 }')
min_step=${MIN_STEP_S:-30}
summary=()

if [[ -d .whl ]] && ! "$py" -c "import pydantic_settings" 2>/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

drivers=$(mktemp -d)
trap 'rm -rf "$drivers"' EXIT
# every verify in one process (one torch start-up), each run's table and exit code in turn
cat > "$drivers/verify_all.py" <<'PY'
import sys
import traceback

from service.cli import main

runs = [("alit-reference", dtype, "packed") for dtype in ("bfloat16", "float32")]
runs += [(f, dtype, None) for f in ("karl-reference", "one-d-piece-reference") for dtype in ("bfloat16", "float32")]
runs += [("alit-reference", dtype, mode) for mode in ("cohort", "padded") for dtype in ("bfloat16", "float32")]
runs += [(f, "bfloat16", "varlen") for f in ("alit-reference", "karl-reference", "one-d-piece-reference")]
failed = 0
for fixture, dtype, mode in runs:
    argv = ["verify", f"tests/fixtures/{fixture}", "--device", "cuda", "--dtype", dtype]
    argv += ["--batch-mode", mode] if mode else []
    print("== " + " ".join(argv), flush=True)
    try:
        rc = main(argv)
    except Exception:
        traceback.print_exc()
        rc = 3
    print(f"exit {rc}", flush=True)
    failed += rc != 0
sys.exit(1 if failed else 0)
PY

# the bulk step's image folder (loadtest/make_folders.py --gpu), made on this machine's CPUs while the
# first steps hold the GPU: thousands of images are too many megabytes to travel with the checkout
folders=${FOLDERS_DIR:-/tmp/alit-folders}
gpu_images=${GPU_IMAGES:-500}  # 1,000 took 40 s a round on the H200: 3 rounds of 500 fit BULK_CAP
folders_pid=
if [[ -z $only || " $only " == *" bulk_bf16 "* ]] && [[ ! -d $folders/gpu ]]; then
  "$py" loadtest/make_folders.py "$folders" --bulk 0 --gpu "$gpu_images" > "$out/folders.txt" 2>&1 &
  folders_pid=$!
fi

plan_only=0
step() {  # NAME CAP FILE CMD...: CMD under `timeout` with CAP cut to the budget left, output in OUT_DIR/FILE
  local name=$1 cap=$2 file=$3; shift 3
  if [[ -n $only && " $only " != *" $name "* ]]; then return 0; fi
  if (( plan_only )); then
    printf '  %-28s %5s s  %s\n' "$name" "$cap" "$file"
    return 0
  fi
  local left=$(( start + budget - train_keep - SECONDS ))
  if [[ $name == train ]]; then left=$cap; fi
  if (( left < min_step )); then
    echo "== $name: skipped, ${left} s of the budget left" | tee "$out/$file"
    summary+=("$(printf '%-28s skipped (budget)' "$name")")
    return 0
  fi
  (( cap > left )) && cap=$left
  echo "== $name (cap ${cap} s) -> $out/$file"
  local t0=$SECONDS rc
  { echo "\$ $*"; echo "(cap ${cap} s)"; } > "$out/$file"
  timeout --kill-after=15 "$cap" "$@" >> "$out/$file" 2>&1
  rc=$?
  local took=$(( SECONDS - t0 )) note=""
  (( rc == 124 || rc == 137 )) && note=" (timed out)"
  echo "exit $rc$note after ${took} s" >> "$out/$file"
  tail -n 4 "$out/$file" | sed 's/^/   | /'
  summary+=("$(printf '%-28s exit %3d%s  %4d s  %s' "$name" "$rc" "$note" "$took" "$file")")
}

bench_cmd=("$py" -m service.cli bench --device cuda --model preset:alit_small --quick --flops)
speed_cmd=("$py" -m service.model.speed --device cuda --model preset:alit_small --sizes "32,7,1")

steps() {
  step env "${ENV_CAP:-60}" gpu.txt bash -c \
    "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \"$py\" -c \
     \"import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))\""
  step verify "${VERIFY_CAP:-180}" verify_cuda.txt env PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" \
    "$py" "$drivers/verify_all.py"
  step bench_bf16 "${BENCH_CAP:-240}" bench_cuda_alit_small_bfloat16.txt "${bench_cmd[@]}" \
    --dtype bfloat16 --json "$out/bench_cuda_alit_small_bfloat16.json" "$@"
  step bench_bf16_padded "${BENCH_CAP:-240}" bench_cuda_alit_small_bfloat16_padded.txt "${bench_cmd[@]}" \
    --batch-mode padded --dtype bfloat16 --json "$out/bench_cuda_alit_small_bfloat16_padded.json" "$@"
  step bench_bf16_varlen "${BENCH_CAP:-240}" bench_cuda_alit_small_bfloat16_varlen.txt "${bench_cmd[@]}" \
    --batch-mode varlen --dtype bfloat16 --json "$out/bench_cuda_alit_small_bfloat16_varlen.json" "$@"
  step bench_bf16_refill025 "${BENCH_CAP:-240}" bench_cuda_alit_small_bfloat16_refill025.txt "${bench_cmd[@]}" \
    --refill-at 0.25 --dtype bfloat16 --json "$out/bench_cuda_alit_small_bfloat16_refill025.json" "$@"
  step bench_bf16_measured "${BENCH_CAP:-240}" bench_cuda_alit_small_bfloat16_measured.txt "${bench_cmd[@]}" \
    --admission measured --dtype bfloat16 --json "$out/bench_cuda_alit_small_bfloat16_measured.json" "$@"
  step bulk_bf16 "${BULK_CAP:-120}" bulk_cuda_alit_small_bfloat16.txt bash -c \
    "${folders_pid:+while kill -0 $folders_pid 2>/dev/null; do sleep 0.5; done; }exec \"$py\" loadtest/bulk_vs_engine.py \"$folders/gpu\" --device cuda \
     --dtype bfloat16 --model preset:alit_small --repeats \"${BULK_REPEATS:-3}\" \
     --json \"$out/bulk_cuda_alit_small_bfloat16.json\""
  step speed_bf16 "${SPEED_CAP:-120}" speed_bf16.txt "${speed_cmd[@]}" --dtype bfloat16 \
    --variants default,channels_last,cuda_graphs --json "$out/speed_bf16.json"
  step speed_bf16_compile "${SPEED_COMPILE_CAP:-240}" speed_bf16_compile.txt "${speed_cmd[@]}" --dtype bfloat16 \
    --variants default,compile_vqgan,all --json "$out/speed_bf16_compile.json"
  step bench_bf16_all "${BENCH_COMPILE_CAP:-360}" bench_cuda_alit_small_bfloat16_all.txt \
    "${bench_cmd[@]}" --channels-last --compile vqgan --cuda-graphs \
    --dtype bfloat16 --json "$out/bench_cuda_alit_small_bfloat16_all.json" "$@"
  step bench_float32 "${BENCH_CAP:-240}" bench_cuda_alit_small_float32.txt "${bench_cmd[@]}" \
    --dtype float32 --json "$out/bench_cuda_alit_small_float32.json" "$@"
  step speed_float32 "${SPEED_F32_CAP:-90}" speed_float32.txt "${speed_cmd[@]}" --dtype float32 \
    --variants default,channels_last,cuda_graphs --json "$out/speed_float32.json"
  step bench_bf16_cuda_graphs "${BENCH_CAP:-240}" bench_cuda_alit_small_bfloat16_cuda_graphs.txt \
    "${bench_cmd[@]}" --cuda-graphs \
    --dtype bfloat16 --json "$out/bench_cuda_alit_small_bfloat16_cuda_graphs.json" "$@"
  step bench_bf16_channels_last "${BENCH_CAP:-240}" bench_cuda_alit_small_bfloat16_channels_last.txt \
    "${bench_cmd[@]}" --channels-last \
    --dtype bfloat16 --json "$out/bench_cuda_alit_small_bfloat16_channels_last.json" "$@"
  step bench_bf16_compile_vqgan "${BENCH_COMPILE_CAP:-360}" bench_cuda_alit_small_bfloat16_compile_vqgan.txt \
    "${bench_cmd[@]}" --compile vqgan \
    --dtype bfloat16 --json "$out/bench_cuda_alit_small_bfloat16_compile_vqgan.json" "$@"
  step profile_steps_bf16 "${PROFILE_CAP:-120}" profile_steps_bfloat16.txt "$py" loadtest/profile_steps.py \
    --device cuda --dtype bfloat16 --model preset:alit_small
  local dtype
  for dtype in bfloat16 float32; do
    step "families_$dtype" "${FAMILIES_TIMEOUT:-600}" "families_cuda_$dtype.txt" "$py" -m service.cli bench \
      --device cuda --dtype "$dtype" \
      --families alit=preset:alit_small,karl=preset:karl_small,one_d_piece=preset:one_d_piece_s256 \
      --targets 0.05,0.1,0.2 --json "$out/families_cuda_$dtype.json"
  done
  if (( train_keep > 0 )); then
    local corpus=()  # the Debian-package corpus, built here (make corpus) and carried: runs/corpus
    [[ -f runs/corpus/corpus.json ]] && corpus=(--corpus runs/corpus)
    step train "$train_keep" train.txt "$py" -m service.training gpu-job --device cuda \
      --budget-minutes "$train_minutes" "${corpus[@]}" --run "$out/train_run" --export "$out/train_export"
  fi
}

echo "GPU checks into $out: budget ${budget} s in all, ${train_keep} s of it kept for training (TRAIN_MINUTES=${train_minutes});"
echo "each step's cap (s; cut to the budget left, skipped under ${min_step} s), in order:"
plan_only=1
steps "$@"
echo "  (caps: ENV_CAP VERIFY_CAP BENCH_CAP BULK_CAP SPEED_CAP SPEED_COMPILE_CAP BENCH_COMPILE_CAP SPEED_F32_CAP"
echo "   PROFILE_CAP FAMILIES_TIMEOUT; the budget: BUDGET_S TRAIN_MINUTES TRAIN_SLACK_S MIN_STEP_S;"
echo "   bulk: GPU_IMAGES BULK_REPEATS FOLDERS_DIR)"
plan_only=0
steps "$@"
printf '%s\n' "== summary after $(( SECONDS - start )) s" "${summary[@]}" | tee "$out/summary.txt"
if [[ -n ${PACK_DIR:-} ]]; then
  mkdir -p "$PACK_DIR"
  tar czf "$PACK_DIR/gpu_checks.tgz" -C "$out" --exclude='*.pt' --exclude='pool_*.npy' --exclude=train_export .
  if [[ -d $out/train_export ]]; then
    tar cf - -C "$out" train_export | split -b 15m - "$PACK_DIR/train_export.tar.part-"
  fi
  ls -l "$PACK_DIR"
fi
