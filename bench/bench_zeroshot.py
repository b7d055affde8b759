"""Zero-shot SST-2 dev (872 sentences, " positive" vs " negative" after " very") with a shakespeare-char-sized
model (6 layers, 6 heads, 384 wide, block 256, random weights): time, examples/s and the CPU model, as JSON,
with the tokens scored per example and the model FLOP/s against this machine's GEMM peak measured in the same
run (model_tflops, of_gemm_peak, peaks).

    python bench/bench_zeroshot.py [--threads 2] [--dtype auto|float32|bfloat16] [--batch-size 32]
"""

import argparse
import string
import sys
import time

import torch
from _common import SHARED_DATA, cpu_model, emit, machine_peaks, peak_rss_mb, utilisation

from slmkit.api import LanguageModel
from slmkit.budget import flops_per_token
from slmkit.config import RunConfig
from slmkit.model import GPT
from slmkit.tokenizers import CharTokenizer
from slmkit.zeroshot import Group, prepare_task, run_zeroshot


def scored_tokens(groups: list[Group], block: int) -> tuple[int, float]:
    """(tokens through the model, mean length of a context and one candidate): each context goes
    through once, then all its candidates (cut to the block from the left, as score_groups does)."""
    sizes = [(min(len(g.context), block - max(map(len, g.candidates))), [len(c) for c in g.candidates])
             for g in groups]
    tokens = sum(ctx + sum(cands) for ctx, cands in sizes)
    return tokens, sum(ctx + sum(cands) / len(cands) for ctx, cands in sizes) / len(sizes)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--data", default=str(SHARED_DATA / "tasks" / "sst2" / "dev.tsv"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    chars = sorted(set(string.printable) | {chr(c) for c in range(0xA0, 0x180)})
    tok = CharTokenizer(chars)
    m = RunConfig().model
    m.n_layer, m.n_head, m.n_embd, m.block_size, m.dropout, m.vocab_size = 6, 6, 384, 256, 0.0, tok.vocab_size
    torch.manual_seed(0)
    lm = LanguageModel(GPT(m), tok, device="cpu", dtype=args.dtype)
    t0 = time.perf_counter()
    r = run_zeroshot(lm, "sst2", args.data, batch_size=args.batch_size, log=lambda s: print(s, file=sys.stderr))
    dt = time.perf_counter() - t0
    peaks = machine_peaks("cpu")  # after the timed part
    tokens, context = scored_tokens(prepare_task("sst2", args.data, tok).groups, m.block_size)
    # Scoring is a forward pass; PaLM's FLOPs per token with the sequence's length as context (the head
    # runs on candidate tokens only, so this over-counts it on context tokens: ~1% of the FLOPs here).
    flops = tokens / dt * flops_per_token(m, context, training=False)
    emit({"bench": "zeroshot_sst2_dev", "examples": r.examples, "skipped": r.skipped, "seconds": round(dt, 2),
          "examples_per_s": round(r.examples / dt, 1), "tokens_per_example": round(tokens / r.examples, 1),
          "tokens_per_s": round(tokens / dt), **utilisation(flops, lm.dtype, peaks), "peaks": peaks,
          "accuracy_random_weights": round(r.metrics["accuracy"], 4),
          "threads": args.threads, "dtype": str(lm.dtype).removeprefix("torch."), "batch_size": args.batch_size,
          "model": "6 layers, 6 heads, 384 wide, block 256 (random weights)", "cpu": cpu_model(),
          "peak_rss_mb": peak_rss_mb()})


if __name__ == "__main__":
    main()
