#!/usr/bin/env bash
# Issue 24 item 6's bars, side by side: continuous vs lock-step at saturation (throughput) and at 70 %
# of lock-step's saturation load (p50, p99), on the fixture photos and two folders of our own, with
# continuous batching's cohort refill off (ALIT_REFILL_AT=1.0) and on (0.5). Every run is
# `alit-serve bench --quick --repeats N` (the strategies interleaved in each round, medians), only
# lock-step and continuous, only the 70 % load, more Poisson arrivals than --quick's 96 (p99 of 96 is
# the second-worst request). Needs an idle machine; prints one table row per run.
#
#   python loadtest/make_folders.py runs/folders     # once
#   loadtest/saturation_bars.sh [OUT_DIR] [extra bench args...]   (default runs/bars; THREADS=2 REPEATS=3
#                                                    REFILLS="1.0 0.5")
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/bars}; shift || true
py=${PYTHON:-.venv/bin/python}
mkdir -p "$out"
folders=("tests/fixtures/alit-reference/images" "runs/folders/skimage" "runs/folders/synthetic")
for f in "${folders[@]}"; do [[ -d $f ]] || { echo "missing $f: python loadtest/make_folders.py runs/folders" >&2; exit 2; }; done
printf '| folder | refill_at | lock-step img/s | continuous img/s | cont./lock-step | p50 at 70 %% | p99 at 70 %% |\n|---|---:|---:|---:|---:|---:|---:|\n'
for f in "${folders[@]}"; do
  for refill in ${REFILLS:-1.0 0.5}; do
    name=$(basename "$(dirname "$f")")_$(basename "$f")_$refill
    "$py" -m service.cli bench --images "$f" --quick --no-simulate --strategies continuous,lockstep \
      --load-fractions 0.7 --poisson-requests "${POISSON:-200}" --repeats "${REPEATS:-3}" \
      --threads "${THREADS:-2}" --refill-at "$refill" --json "$out/$name.json" "$@" > "$out/$name.log" 2>&1
    "$py" - "$out/$name.json" "$f" "$refill" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
s, r = d["strategies"], d["ratios"]
tp = lambda k: s[k]["saturation_throughput"]
print(f"| {sys.argv[2]} | {sys.argv[3]} | {tp('lockstep'):.1f} | {tp('continuous'):.1f} | "
      f"{r['continuous_vs_lockstep_throughput']:.2f}x | {r['continuous_vs_lockstep_p50_at_70pct']:.2f}x | "
      f"{r['continuous_vs_lockstep_p99_at_70pct']:.2f}x |", flush=True)
PY
  done
done
