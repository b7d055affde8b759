#!/usr/bin/env bash
# Reference sweep: n_layer x n_embd x learning_rate on tiny Shakespeare, 40 s of training per trial
# (equal wall time; max_iters is sized per trial so its warmup + cosine schedule fits), from the
# cpu-tiny preset (4 heads, block 64, batch 32, char tokenizer). 18 trials, about 15 minutes on
# 2 CPU cores. The sweep lives in runs/shakespeare_sweep; its report, table and plots are copied here.
#
#   bash experiments/shakespeare_sweep/run.sh            # DATA=/path/to/input.txt to point at the file
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
DATA="${DATA:-$REPO/../shared/data/tinyshakespeare/input.txt}"
OUT="${OUT:-$REPO/runs/shakespeare_sweep}"
SECONDS_PER_TRIAL="${SECONDS_PER_TRIAL:-40}"
# One PyTorch thread: on the shared 2-core machine two threads per process fought the other
# users' processes (473 vs 6,700 tokens/s measured for cpu-tiny). Set OMP_NUM_THREADS=2 on an idle machine.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
data_args=(--dataset tinyshakespeare)
[ -f "$DATA" ] && data_args+=(--data-path "$DATA")   # else slmkit downloads (and checks) the file

if [ -f "$OUT/sweep.json" ]; then
  slm sweep --resume "$OUT"                           # an interrupted run continues where it stopped
else
  slm sweep --base cpu-tiny "${data_args[@]}" \
    --grid "n_layer=2,4,6" --grid "n_embd=64,128,192" --grid "learning_rate=2e-3,4e-3" \
    --trial-seconds "$SECONDS_PER_TRIAL" --eval-interval 50 --eval-iters 10 \
    --device cpu --dtype float32 --sample-tokens 0 --out "$OUT"
fi

mkdir -p "$HERE/plots"
cp "$OUT/report.md" "$OUT/results.csv" "$OUT/sample.txt" "$HERE/"
cp "$OUT"/plots/*.png "$HERE/plots/"
echo "copied the report, table and plots to $HERE"
