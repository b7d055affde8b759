"""slmkit against llama.cpp on the same model: generation speed at batch 1 on CPU (JSON).

A GPT-2 124M-shaped model (12 layers, 768 wide, 12 heads, context 1024, GPT-2's vocabulary) with random
weights (GPT-2's init) is written as a run, exported with `slm export --format gguf` in bf16 and q8_0,
and each engine then reads a 64-token prompt and generates 256 tokens greedily (no sampling cost on
either side), the prompt included in the time:

    slmkit bf16      generate_ids, dtype bf16 (weights prepacked for oneDNN)
    slmkit int8      generate_ids, --weights int8 (weight-only int8 linears, bf16 activations)
    llama.cpp bf16   llama-cpp-python on the bf16 file
    llama.cpp q8_0   llama-cpp-python on the q8_0 file (8-bit blocks of 32 with an f16 scale)

Runs alternate between the engines (a slow spell of a shared machine hits all of them alike) and the
median of `--repeat` runs is reported, with the CPU model, and for each engine (`rates`) its model
FLOP/s against the bf16 GEMM peak (model_tflops, of_gemm_peak) and the weights it reads per token as
GB/s and a share of the copy bandwidth (weight_gb_s, of_copy_bandwidth), with the peaks measured in the
same run (`peaks`). Needs the gguf package, llama-cpp-python (pip install 'slmkit[gguf,llama]') and the
GPT-2 vocabulary in ../shared/data/vocab/gpt2.

    python bench/bench_vs_llamacpp.py --threads 2 --repeat 5
"""

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import SHARED_DATA, cpu_model, decoding_context, decoding_rates, emit, machine_peaks, peak_rss_mb

from slmkit.config import preset_config
from slmkit.generate import GenerationConfig, generate_ids
from slmkit.interop.common import write_run
from slmkit.interop.gguf import export_gguf
from slmkit.model import GPT
from slmkit.tokenizers import named_tokenizer

# Each engine's weight format (a WEIGHT_BYTES key of _common): the q8_0 file quantizes every matrix,
# the tied head's token embedding included, as --weights int8 does every linear, the head included.
WEIGHTS = {"slmkit_bf16": "bfloat16", "slmkit_int8": "int8", "llamacpp_bf16": "bfloat16", "llamacpp_q8_0": "q8_0"}


def make_run(out: Path, vocab_dir: Path) -> None:
    tok = named_tokenizer("gpt2", str(vocab_dir))
    cfg = preset_config("gpt2-124m")
    cfg.model.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    model = GPT(cfg.model)
    write_run(out, {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}, cfg, tok,
              {"format": "random"})


def prompt_ids(tok, n: int) -> list[int]:
    text = (SHARED_DATA / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:4000]
    ids = tok.encode(text)[:n]
    if len(ids) < n:
        raise SystemExit(f"the prompt text gives only {len(ids)} tokens")
    return ids


def slmkit_runner(model: GPT, weights: str, prompt: list[int], n: int):
    gen = GenerationConfig(max_new_tokens=n, temperature=0, stop_at_eot=False, weights=weights)
    cpu = torch.device("cpu")

    def run() -> list[int]:
        return list(generate_ids(model, prompt, gen, cpu, torch.bfloat16))

    return run


def llama_runner(path: Path, threads: int, n_ctx: int, prompt: list[int], n: int):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                          n_batch=len(prompt), verbose=False)

    def run() -> list[int]:
        llm.reset()
        out = []
        for tok in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
            out.append(tok)
            if len(out) == n:
                break
        return out

    return run


def agree(a: list[int], b: list[int]) -> int:
    """How many leading tokens two continuations share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per engine (alternating); medians reported")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=256, help="new tokens per run")
    ap.add_argument("--vocab-dir", default=str(SHARED_DATA / "vocab" / "gpt2"))
    ap.add_argument("--workdir", help="keep the run and the GGUF files here (default: a temporary folder)")
    args = ap.parse_args()
    import llama_cpp  # fail before the minutes of export when it is missing

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        run = work / "gpt2-124m-random"
        if not (run / "ckpt_best.safetensors").exists():
            make_run(run, Path(args.vocab_dir))
        files, export_s = {}, {}
        for dtype in ("bf16", "q8_0"):
            files[dtype] = work / f"model-{dtype}.gguf"
            if not files[dtype].exists():  # a --workdir of an earlier run keeps its files
                t0 = time.perf_counter()
                export_gguf(run, files[dtype], dtype=dtype)
                export_s[dtype] = round(time.perf_counter() - t0, 1)
        sizes_mb = {dtype: round(f.stat().st_size / 1e6, 1) for dtype, f in files.items()}

        from slmkit.checkpoint import load_model

        model, tok, ckpt = load_model(run)
        prompt = prompt_ids(tok, args.prompt_tokens)
        n_ctx = ckpt.config.model.block_size
        engines = {
            # two model objects: each keeps its own prepared decoding copy, so alternating never rebuilds one
            "slmkit_bf16": slmkit_runner(model, "auto", prompt, args.tokens),
            "slmkit_int8": slmkit_runner(copy.deepcopy(model), "int8", prompt, args.tokens),
            "llamacpp_bf16": llama_runner(files["bf16"], args.threads, n_ctx, prompt, args.tokens),
            "llamacpp_q8_0": llama_runner(files["q8_0"], args.threads, n_ctx, prompt, args.tokens),
        }
        outputs = {name: run_() for name, run_ in engines.items()}  # warm-up (and the decoding copies)
        times: dict[str, list[float]] = {name: [] for name in engines}
        for _ in range(args.repeat):
            for name, run_ in engines.items():
                start = time.perf_counter()
                out = run_()
                times[name].append(time.perf_counter() - start)
                assert len(out) == args.tokens, (name, len(out))
        peaks = machine_peaks("cpu")  # after the timed runs

    def tps(name: str) -> float:
        return args.tokens / statistics.median(times[name])

    # Decoding FLOPs of the new tokens only (the prompt's prefill is in the time, not in the count), all
    # against the bf16 GEMM peak: no engine computes in fp32, and no int8 peak is measured.
    context = decoding_context(args.prompt_tokens, args.tokens, n_ctx)
    rates = {name: decoding_rates(ckpt.config.model, tps(name), context, torch.bfloat16, weights, peaks)
             for name, weights in WEIGHTS.items()}

    result = {
        "bench": "vs_llamacpp", "cpu": cpu_model(), "threads": args.threads, "torch": torch.__version__,
        "llama_cpp_python": llama_cpp.__version__, "model": "gpt2-124m shape, random weights",
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.tokens, "repeat": args.repeat,
        "export_s": export_s, "gguf_mb": sizes_mb,
        "tokens_per_s": {name: round(tps(name), 1) for name in engines},
        "tokens_per_s_range": {name: [round(args.tokens / max(t), 1), round(args.tokens / min(t), 1)]
                               for name, t in times.items()},
        "rates": rates, "peaks": peaks,
        "ratio_int8_vs_q8_0": round(tps("slmkit_int8") / tps("llamacpp_q8_0"), 2),
        "ratio_bf16_vs_bf16": round(tps("slmkit_bf16") / tps("llamacpp_bf16"), 2),
        # greedy continuations of the same weights: the bf16 ones should agree for a good stretch
        "same_first_tokens_bf16": agree(outputs["slmkit_bf16"], outputs["llamacpp_bf16"]),
        "same_first_tokens_int8_q8_0": agree(outputs["slmkit_int8"], outputs["llamacpp_q8_0"]),
        "peak_rss_mb": peak_rss_mb(),
    }
    emit(result)


if __name__ == "__main__":
    main()
