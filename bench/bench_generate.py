"""Generation speed, batch 1, with and without the KV cache (JSON).

    python bench/bench_generate.py --preset shakespeare-char --tokens 500
    python bench/bench_generate.py --run runs/shakespeare-char      # a trained model
"""

import argparse
import statistics
import time

import torch
from _common import emit, peak_rss_mb

from slmkit.config import WEIGHT_FORMATS, preset_config
from slmkit.generate import GenerationConfig, generate_ids
from slmkit.model import GPT
from slmkit.runtime import resolve_device, resolve_dtype


def timed(model, prompt, gen, device, dtype) -> float:
    start = time.perf_counter()
    n = sum(1 for _ in generate_ids(model, prompt, gen, device, dtype))
    return n / (time.perf_counter() - start)


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
    result["kv_cache_tokens_per_s"] = round(statistics.median(runs), 1)
    result["kv_cache_tokens_per_s_range"] = [round(min(runs), 1), round(max(runs), 1)]
    if not args.skip_no_cache:
        gen.use_cache = False
        result["no_cache_tokens_per_s"] = round(timed(model, prompt, gen, device, dtype), 1)
        result["speedup"] = round(result["kv_cache_tokens_per_s"] / result["no_cache_tokens_per_s"], 2)
    result["peak_rss_mb"] = peak_rss_mb()
    emit(result)


if __name__ == "__main__":
    main()
