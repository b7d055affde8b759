#!/usr/bin/env bash
# GPT-1's Fig. 2 (right), small: zero-shot behaviours of the language model during pre-training.
#
# Pre-trains a 1.07M-parameter BPE GPT on the shared Gutenberg corpus (53 novels, ~7.7M tokens seen)
# with `slm train --zeroshot`: at every evaluation (every 250 steps, and at step 0) the GPT-1 §5 rules
# score SST-2, CoLA and Story Cloze dev, plus the RTE rule that is not from the paper. Each curve is
# normalised between random guessing (0) and GPT-1's fine-tuned score (1), as the paper normalises
# between random and the state of the art. Output: OUT/loss.png (loss and the zero-shot panel),
# OUT/metrics.jsonl; then plot.py writes curves.png and results.md here.
#
#   experiments/zeroshot_curves/run.sh [OUT]          # default OUT: runs/zeroshot_curves
#   THREADS=1 experiments/zeroshot_curves/run.sh      # on a machine shared with other jobs
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
SHARED=${SHARED:-$HERE/../../../shared/data}
OUT=${1:-runs/zeroshot_curves}
T=$SHARED/tasks
[ -d "$T" ] || { echo "needs the shared data folder at $SHARED" >&2; exit 1; }
if [ -n "${THREADS:-}" ]; then export OMP_NUM_THREADS=$THREADS; fi

start=$(date +%s)
slm train --out-dir "$OUT" --overwrite --dataset "$SHARED/corpus/gutenberg/train.txt" \
    --tokenizer bpe --bpe-vocab-size 2048 --val-fraction 0.02 \
    --n-layer 4 --n-head 4 --n-embd 128 --block-size 96 --dropout 0.1 --ln pre \
    --batch-size 32 --max-iters 2500 --lr 3e-3 --warmup-iters 100 --weight-decay 0.01 \
    --eval-interval 250 --eval-iters 10 --log-interval 50 --device cpu --no-final-eval \
    --zeroshot "sst2:$T/sst2/dev.tsv,cola:$T/cola/dev.tsv,storycloze:$T/storycloze/dev.csv,rte:$T/rte/dev.tsv" \
    --zeroshot-calibrate "$T/cola/train.tsv" --zeroshot-limit 2000 \
    --zeroshot-ref "sst2=0.913,cola=0.454,storycloze=0.865,rte=0.56"
echo "wall seconds: $(( $(date +%s) - start ))" >&2
python "$HERE/plot.py" "$OUT" "$HERE"
