"""Fine-tuning and evaluation throughput (examples/s) of a small model, per task family; prints JSON.

    python bench/bench_finetune.py                   # CPU, 4 layers x 128 wide, 64-token inputs
    python bench/bench_finetune.py --device cuda --n-layer 12 --n-embd 768 --batch-size 32

Inputs are synthetic (random words of a char vocabulary) so that the numbers need no data files:
each text segment is --seg-len tokens long. Similarity runs 2 sequences per example, multiple
choice --choices; all of them go through the transformer in one call per batch. The "looped"
figure evaluates multiple choice one example at a time, for comparison with batched evaluation.

Each figure is given twice: per wall-clock second, and per CPU second of this process
(`*_per_cpu_s`, from time.process_time). On a machine shared with other jobs, whose processes get
paused and resumed, the CPU-second figure is the stable one (with --threads 1 it is the speed of
one core).

Beside the wall-clock figures: `tokens_per_example`, and for training and evaluation the model FLOP/s
and their share of this machine's GEMM peak (`*_utilisation`: model_tflops, of_gemm_peak), with the
peaks measured in the same run (`peaks`) and the CPU model (`cpu`).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from _common import cpu_model, machine_peaks, utilisation

from slmkit.budget import flops_per_token
from slmkit.config import ModelConfig
from slmkit.finetune import Example, FineTuneModel, add_special_tokens, collate, encode_examples, spec_from_flags
from slmkit.finetune.loop import run_outputs
from slmkit.finetune.transforms import Encoded
from slmkit.model import GPT
from slmkit.runtime import autocast, resolve_device, resolve_dtype
from slmkit.tokenizers import CharTokenizer


def make_examples(n: int, family: str, seg_len: int, choices: int, rng: np.random.Generator) -> list[Example]:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz "))

    def text(length: int) -> str:
        return "".join(rng.choice(letters, size=length)).strip() or "a"

    out = []
    for i in range(n):
        if family == "classification":
            out.append(Example([text(seg_len)], [], i % 2, i + 1))
        elif family in ("entailment", "similarity"):
            out.append(Example([text(seg_len // 2), text(seg_len // 2)], [], i % 2, i + 1))
        else:
            out.append(Example([text(seg_len * 3 // 4)], [text(seg_len // 4) for _ in range(choices)],
                               i % choices, i + 1))
    return out


def tokens_of(encoded: list[Encoded]) -> tuple[float, float]:
    """(tokens per example, tokens per sequence) on average, padding not counted."""
    lengths = [len(s) for e in encoded for s in e.seqs]
    return sum(lengths) / len(encoded), sum(lengths) / len(lengths)


def rate(examples_per_s: float, encoded: list[Encoded], m: ModelConfig, training: bool, dtype: torch.dtype,
         peaks: dict) -> dict:
    """Model FLOP/s against the GEMM peak: PaLM's FLOPs of the real (unpadded) tokens, each attending
    to its sequence's length (training: forward and backward; evaluation: forward only)."""
    per_example, context = tokens_of(encoded)
    return utilisation(examples_per_s * per_example * flops_per_token(m, context, training), dtype, peaks)


SPECS = {
    "classification": lambda k: spec_from_flags("b-cls", "classification", "tsv", "0", "1", labels="0,1"),
    "entailment": lambda k: spec_from_flags("b-ent", "entailment", "tsv", "0,1", "2", labels="0,1"),
    "similarity": lambda k: spec_from_flags("b-sim", "similarity", "tsv", "0,1", "2", labels="0,1"),
    "multiple_choice": lambda k: spec_from_flags("b-mc", "multiple_choice", "tsv", "0", str(k + 1),
                                                 labels=",".join(str(i + 1) for i in range(k)),
                                                 choice_columns=",".join(str(i + 1) for i in range(k))),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--seg-len", type=int, default=64, help="tokens per example's text")
    ap.add_argument("--choices", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6, help="timed training steps per family")
    ap.add_argument("--eval-examples", type=int, default=256)
    ap.add_argument("--families", default=",".join(SPECS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    rng = np.random.default_rng(0)
    base = CharTokenizer(list("abcdefghijklmnopqrstuvwxyz "))
    peaks = machine_peaks(device)  # before the timed steps, never among them
    report: dict = {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "cpu": cpu_model(),
                    "peaks": peaks, "threads": torch.get_num_threads(), "batch_size": args.batch_size,
                    "seg_len": args.seg_len, "families": {}}
    for family in args.families.split(","):
        torch.manual_seed(0)
        gpt = GPT(ModelConfig(vocab_size=base.vocab_size, n_layer=args.n_layer, n_head=args.n_head,
                              n_embd=args.n_embd, block_size=args.block_size, dropout=0.1))
        tok = add_special_tokens(gpt, base)
        spec = SPECS[family](args.choices)
        model = FineTuneModel(gpt, spec).to(device)
        report["params"] = sum(p.numel() for p in model.parameters())
        n_train = args.batch_size * (args.steps + 1)
        train_enc, _ = encode_examples(spec, tok, make_examples(n_train, family, args.seg_len, args.choices, rng),
                                       args.block_size)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        per_example, per_sequence = tokens_of(train_enc)
        row: dict = {"sequences_per_example": len(train_enc[0].seqs), "tokens_per_sequence": int(per_sequence),
                     "tokens_per_example": round(per_example, 1)}
        for lm_coef in (0.5, 0.0):
            model.train()
            times, cpu = [], []
            for step in range(args.steps + 1):  # step 0 warms up
                batch = collate(train_enc[step * args.batch_size:(step + 1) * args.batch_size]).to(device)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0, c0 = time.perf_counter(), time.process_time()
                with autocast(device, dtype):
                    loss, _, _ = model.loss(batch, lm_coef)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if step:
                    times.append(time.perf_counter() - t0)
                    cpu.append(time.process_time() - c0)
            train_per_s = args.batch_size / float(np.median(times))
            row[f"train_examples_per_s_lm{lm_coef}"] = round(train_per_s, 1)
            row[f"train_examples_per_cpu_s_lm{lm_coef}"] = round(args.batch_size / float(np.median(cpu)), 1)
            row[f"train_utilisation_lm{lm_coef}"] = rate(train_per_s, train_enc, gpt.config, True, dtype, peaks)
        eval_enc, _ = encode_examples(spec, tok, make_examples(args.eval_examples, family, args.seg_len,
                                                               args.choices, rng), args.block_size)
        run_outputs(model, spec, eval_enc[: args.batch_size], args.batch_size, device, dtype)  # warm-up
        t0, c0 = time.perf_counter(), time.process_time()
        run_outputs(model, spec, eval_enc, 64, device, dtype)
        eval_per_s = len(eval_enc) / (time.perf_counter() - t0)
        row["eval_examples_per_s"] = round(eval_per_s, 1)
        row["eval_examples_per_cpu_s"] = round(len(eval_enc) / (time.process_time() - c0), 1)
        row["eval_utilisation"] = rate(eval_per_s, eval_enc, gpt.config, False, dtype, peaks)
        if family == "multiple_choice":
            few = eval_enc[:32]
            t0, c0 = time.perf_counter(), time.process_time()
            for e in few:
                run_outputs(model, spec, [e], 1, device, dtype)
            looped_per_s = len(few) / (time.perf_counter() - t0)
            row["eval_examples_per_s_looped"] = round(looped_per_s, 1)
            row["eval_examples_per_cpu_s_looped"] = round(len(few) / (time.process_time() - c0), 1)
            row["eval_utilisation_looped"] = rate(looped_per_s, few, gpt.config, False, dtype, peaks)
        report["families"][family] = row
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
