"""Training throughput of a preset on random tokens: tokens/s, ms/iter, peak RSS, and the model
FLOP/s as a share of this machine's GEMM peak measured in the same run (JSON).

    python bench/bench_train_speed.py --preset shakespeare-char --iters 20
"""

import argparse
import time

import torch
from _common import cpu_model, emit, machine_peaks, peak_rss_mb, utilisation

from slmkit.budget import flops_per_token
from slmkit.config import GELU_FORMS, preset_config
from slmkit.model import GPT
from slmkit.runtime import autocast, can_fuse_adamw, keep_freed_memory_for_reuse, resolve_device, resolve_dtype


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="shakespeare-char")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=0, help="micro-batch size; 0 = the preset's")
    ap.add_argument("--grad-accum", type=int, default=0, help="micro-batches per step; 0 = the preset's")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--vocab-size", type=int, default=65)
    ap.add_argument("--dropout", type=float, default=-1.0, help="override the preset's dropout")
    ap.add_argument("--attn-dropout", type=float, default=None, help="override the preset's attention dropout")
    ap.add_argument("--gelu", choices=GELU_FORMS, help="override the preset's GELU")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (compile time is not timed)")
    args = ap.parse_args()
    cfg = preset_config(args.preset)
    cfg.model.vocab_size = cfg.model.vocab_size or args.vocab_size
    if args.dropout >= 0:
        cfg.model.dropout = args.dropout
    if args.attn_dropout is not None:
        cfg.model.attn_dropout = args.attn_dropout
    if args.gelu:
        cfg.model.gelu = args.gelu
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    keep_freed_memory_for_reuse(device)  # as the trainer does
    torch.manual_seed(0)
    model = GPT(cfg.model).to(device).train()
    opt = torch.optim.AdamW(model.optimizer_groups(0.1), lr=1e-3, fused=can_fuse_adamw(device))
    step_model = torch.compile(model) if args.compile else model
    B, T = args.batch_size or cfg.train.batch_size, cfg.model.block_size
    accum = args.grad_accum or cfg.train.grad_accum
    x = torch.randint(0, cfg.model.vocab_size, (B, T), device=device)
    y = torch.randint(0, cfg.model.vocab_size, (B, T), device=device)
    for i in range(args.warmup + args.iters):
        if i == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        for _ in range(accum):  # the preset's micro-batches per optimizer step
            with autocast(device, dtype):
                _, loss = step_model(x, y)
            (loss / accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - start) / args.iters
    tokens_per_s = B * T * accum / dt
    peaks = machine_peaks(device)  # after the timed steps, so that they run on a cold start as users' do
    flops = tokens_per_s * flops_per_token(cfg.model, T, training=True)
    emit({"bench": "train_speed", "preset": args.preset, "params_m": round(model.num_params() / 1e6, 3),
          "batch_size": B, "block_size": T, "dropout": cfg.model.dropout, "device": str(device),
          "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
          "grad_accum": accum, "compile": args.compile, "attn_dropout": cfg.model.attention_dropout,
          "gelu": cfg.model.gelu,
          "ms_per_iter": round(dt * 1000, 1), "tokens_per_s": round(tokens_per_s),
          **utilisation(flops, dtype, peaks), "peaks": peaks, "cpu": cpu_model(), "peak_rss_mb": peak_rss_mb()})


if __name__ == "__main__":
    main()
