"""Helpers shared by the benchmarks: the CPU model, peak memory, the shared data folder, JSON output,
and this machine's measured peaks (GEMM FLOP/s, copy bandwidth), so that speeds read as ratios (decoding
speeds also as weight bandwidth)."""

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from slmkit.budget import flops_per_token, matmul_params
from slmkit.config import ModelConfig
from slmkit.generate import window_shift

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def peak_rss_mb() -> float:
    # ru_maxrss is in kilobytes on Linux (bytes on macOS).
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / (1024 * 1024)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, 1)


def emit(result: dict) -> None:
    print(json.dumps(result))


def cpu_model() -> str:
    """lscpu's model name: machines differ (Zen 4 and Zen 5 run bf16 ~1.7x apart), so every result names it."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def _best_seconds(fn, device: torch.device, repeat: int) -> float:
    """The fastest of `repeat` timed calls after one warm-up: a peak, so the best, not the median."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def gemm_peak_flops(dtype: torch.dtype, device: torch.device | str = "cpu", n: int = 0, repeat: int = 5) -> float:
    """FLOP/s of one large square matrix product in `dtype` on this machine, now, with torch's
    threads: the roof that the model's FLOP/s are divided by. n = 0: 2048 on CPU, 8192 on a GPU."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return 2 * n**3 / _best_seconds(lambda: torch.mm(a, b), device, repeat)


def copy_bandwidth(device: torch.device | str = "cpu", mb: int = 512, repeat: int = 5) -> float:
    """Bytes/s moved by copying one large tensor into another (read + write counted), far larger than
    the caches: the roof of a decoder that streams its weights once per token."""
    device = torch.device(device)
    src = torch.ones(mb * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / _best_seconds(lambda: dst.copy_(src), device, repeat)


def machine_peaks(device: torch.device | str = "cpu") -> dict:
    """The peaks a bench reports its speeds against, measured in the same run (machines differ, and
    a shared machine's peak moves with its load), with the bench's thread count. They are measured in
    a child process, so that their buffers (1 GB for the copy) never count in the bench's peak RSS."""
    code = (f"import json, sys, torch; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"torch.set_num_threads({torch.get_num_threads()}); from _common import measure_peaks; "
            f"print(json.dumps(measure_peaks({str(device)!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure_peaks(device: torch.device | str = "cpu") -> dict:
    """`machine_peaks`, in this process."""
    return {"gemm_bf16_tflops": round(gemm_peak_flops(torch.bfloat16, device) / 1e12, 3),
            "gemm_fp32_tflops": round(gemm_peak_flops(torch.float32, device) / 1e12, 3),
            "copy_gb_s": round(copy_bandwidth(device) / 1e9, 1)}


def utilisation(flops_per_s: float, dtype: torch.dtype, peaks: dict) -> dict:
    """Achieved model FLOP/s and its share of the GEMM peak of the dtype the model computes in."""
    peak = peaks["gemm_fp32_tflops"] if dtype == torch.float32 else peaks["gemm_bf16_tflops"]
    return {"model_tflops": round(flops_per_s / 1e12, 4), "of_gemm_peak": round(flops_per_s / 1e12 / peak, 3)}


# Bytes per matmul weight of each decoding format: int8 adds one scale per row (negligible), llama.cpp's
# q8_0 one f16 scale per block of 32 weights (34 bytes per 32).
WEIGHT_BYTES = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "int8": 1.0, "q8_0": 34 / 32}


def decoding_rates(m: ModelConfig, tokens_per_s: float, context: float, dtype: torch.dtype, weights: str,
                   peaks: dict) -> dict:
    """Decoding speed as ratios: the model FLOP/s (forward only, `context` = the positions a new token
    attends to on average) against the GEMM peak, and the weights read per token (every matmul weight
    once, in the `weights` format of WEIGHT_BYTES) as GB/s and a share of the copy bandwidth."""
    gb_s = matmul_params(m) * WEIGHT_BYTES[weights] * tokens_per_s / 1e9
    return {**utilisation(tokens_per_s * flops_per_token(m, context, training=False), dtype, peaks),
            "weight_gb_s": round(gb_s, 2), "of_copy_bandwidth": round(gb_s / peaks["copy_gb_s"], 3)}


def decoding_context(prompt_tokens: int, new_tokens: int, block_size: int) -> float:
    """The positions a new token attends to with a cache, on average over the tokens of a request:
    its prompt and the tokens before it, in the window `slm generate` and the server keep (it
    slides back by `window_shift` once the sequence outgrows the context)."""
    seen, total = min(prompt_tokens, block_size), 0
    for _ in range(new_tokens):
        if seen > block_size:
            seen = block_size - window_shift(block_size)
        total += seen
        seen += 1
    return total / max(new_tokens, 1)
