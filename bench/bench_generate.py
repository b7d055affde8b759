"""Generation speed, batch 1, with and without the KV cache (JSON).

    python bench/bench_generate.py --preset shakespeare-char --tokens 500
    python bench/bench_generate.py --run runs/shakespeare-char      # a trained model

Beside tokens/s it prints where a token's time goes ("per_token_us"): the decoding step's linears
alone, run back to back in decode order on the prepared weights ("weights": streaming them is the
floor), the rest of the step (norms, attention, cache writes, Python), and the rest of generation
(sampling, window slides); then the weight bandwidth that implies against this machine's copy
bandwidth, and the model FLOP/s against its GEMM peak, both measured in the same run.
"""

import argparse
import statistics
import time

import torch
from _common import WEIGHT_BYTES, cpu_model, decoding_context, decoding_rates, emit, machine_peaks, peak_rss_mb

from slmkit.budget import matmul_params
from slmkit.config import WEIGHT_FORMATS, preset_config
from slmkit.generate import GenerationConfig, generate_ids
from slmkit.inference import DecodeStep, decoding_model
from slmkit.model import GPT
from slmkit.runtime import resolve_device, resolve_dtype


def timed(model, prompt, gen, device, dtype) -> float:
    start = time.perf_counter()
    n = sum(1 for _ in generate_ids(model, prompt, gen, device, dtype))
    return n / (time.perf_counter() - start)


def median_us(fn, repeat: int = 200) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def linears_in_decode_order(step: DecodeStep, fast: GPT) -> list:
    """Calls that run each linear of a decoding step once, as `step` does, on inputs of its shape."""
    dtype = fast.transformer.wte.weight.dtype  # the activations' (bf16 with int8 weights)
    row, wide = torch.randn(1, fast.config.n_embd, dtype=dtype), torch.randn(1, fast.config.mlp_width, dtype=dtype)
    calls = []
    for _, _, qkv_proj, out_proj, _, _, fc, fc_proj in step.layers:
        calls += [lambda f=qkv_proj: f.forward_rows(row), lambda f=out_proj: f.forward_add(row, row),
                  lambda f=fc: f.forward_gelu(row, step.gelu), lambda f=fc_proj: f.forward_add(wide, row)]
    return [*calls, lambda: step.head.forward_rows(row)]


def per_token_split(model: GPT, device, dtype, weights: str, prompt: list[int], tokens: int) -> dict:
    """Microseconds per token: the linears alone, the rest of the decoding step, measured at the
    context lengths the run went through."""
    fast = decoding_model(model, device, dtype, weights)
    if not DecodeStep.fits(fast):
        return {}
    step, cache = DecodeStep(fast), fast.new_cache(torch.float32)
    with torch.no_grad():
        fast(torch.tensor([prompt]), cache=cache)
        length = min(len(prompt) + tokens, fast.config.block_size) - 1
        steps = []
        while cache.length < length:
            start = time.perf_counter()
            step(1, cache)
            steps.append(time.perf_counter() - start)
        calls = linears_in_decode_order(step, fast)
        linears = median_us(lambda: [c() for c in calls])
    step_us = statistics.median(steps) * 1e6
    return {"weights": round(linears, 1), "rest_of_step": round(step_us - linears, 1), "step": round(step_us, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="shakespeare-char")
    ap.add_argument("--run", help="a trained run directory instead of random weights")
    ap.add_argument("--tokens", type=int, default=500)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--skip-no-cache", action="store_true")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs with the cache; the median is reported")
    ap.add_argument("--weights", default="auto", choices=WEIGHT_FORMATS, help="as slm generate --weights")
    args = ap.parse_args()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.run:
        from slmkit.checkpoint import load_model

        model, _, _ = load_model(args.run, device)
    else:
        cfg = preset_config(args.preset).model
        cfg.vocab_size = cfg.vocab_size or 65
        torch.manual_seed(0)
        model = GPT(cfg).to(device).eval()
    prompt = list(range(args.prompt_tokens))
    gen = GenerationConfig(max_new_tokens=args.tokens, temperature=1.0, top_k=50, stop_at_eot=False,
                           weights=args.weights)
    warm = GenerationConfig(max_new_tokens=20, temperature=0, weights=args.weights)
    timed(model, prompt, warm, device, dtype)  # warm up (and prepare the decoding copy of the weights)
    result = {"bench": "generate", "preset": args.run or args.preset, "tokens": args.tokens,
              "block_size": model.config.block_size, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
              "weights": args.weights, "threads": torch.get_num_threads(),
              "repeat": args.repeat}
    runs = [timed(model, prompt, gen, device, dtype) for _ in range(args.repeat)]
    tokens_per_s = statistics.median(runs)
    result["kv_cache_tokens_per_s"] = round(tokens_per_s, 1)
    result["kv_cache_tokens_per_s_range"] = [round(min(runs), 1), round(max(runs), 1)]
    split = per_token_split(model, device, dtype, args.weights, prompt, args.tokens)
    if split:
        split["rest_of_generation"] = round(1e6 / tokens_per_s - split["step"], 1)
        result["per_token_us"] = split
    # Every token streams every matmul weight once and attends to the tokens before it in its window.
    cfg, fmt = model.config, "int8" if args.weights == "int8" else str(dtype).replace("torch.", "")
    weight_bytes = matmul_params(cfg) * WEIGHT_BYTES[fmt]
    peaks = machine_peaks(device)
    result["weight_mb"] = round(weight_bytes / 1e6, 1)
    context = decoding_context(args.prompt_tokens, args.tokens, cfg.block_size)
    result.update(decoding_rates(cfg, tokens_per_s, context, dtype, fmt, peaks))
    if split:
        result["weight_gb_s_in_linears"] = round(weight_bytes / split["weights"] / 1e3, 1)
    result["peaks"], result["cpu"] = peaks, cpu_model()
    if not args.skip_no_cache:
        gen.use_cache = False
        result["no_cache_tokens_per_s"] = round(timed(model, prompt, gen, device, dtype), 1)
        result["speedup"] = round(result["kv_cache_tokens_per_s"] / result["no_cache_tokens_per_s"], 2)
    result["peak_rss_mb"] = peak_rss_mb()
    emit(result)


if __name__ == "__main__":
    main()
