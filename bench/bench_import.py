"""Import / export speed and peak memory for full-size models; prints one JSON object.

    python bench/bench_import.py                      # GPT-2 124M (HF dir) and GPT-1 117M (release format)
    python bench/bench_import.py --only hf --repeat 3

Fixtures are written first with random weights (an HF gpt2 directory via `export_hf`, the GPT-1 release
files via the same layout the importer reads). Each measurement runs in a fresh process: peak memory is
that process's VmHWM (peak resident set), and `extra_mb` is the peak minus the resident size just before
the import started (Python + torch + slmkit loaded), compared with the size of the float32 weights.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"

CHILD = r"""
import json, sys, time
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
import torch
import slmkit.interop as I
from slmkit.checkpoint import load_checkpoint
kind, src, out = sys.argv[1:]
base = rss("VmRSS:")
t0 = time.perf_counter()
if kind == "hf":
    I.import_hf(src, out, overwrite=True)
elif kind == "openai-gpt1":
    I.import_openai_gpt1(src, out, overwrite=True)
else:
    I.export_hf(src, out, overwrite=True)
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "baseline_rss_mb": base, "peak_rss_mb": rss("VmHWM:")}))
"""


def make_hf_gpt2(folder: Path) -> int:
    from slmkit.checkpoint import save_checkpoint
    from slmkit.config import preset_config
    from slmkit.interop import export_hf
    from slmkit.model import GPT
    from slmkit.tokenizers import GPT2Tokenizer

    cfg = preset_config("gpt2-124m")
    torch.manual_seed(0)
    model = GPT(cfg.model)
    tok = GPT2Tokenizer.from_files(SHARED / "vocab" / "gpt2")
    save_checkpoint(folder / "src-run" / "ckpt_best.safetensors", model, cfg, tok, {"step": 0})
    export_hf(folder / "src-run", folder / "hf-gpt2", overwrite=True)
    return model.num_params()


def make_release(folder: Path) -> int:
    from slmkit.config import preset_config
    from slmkit.interop.openai_gpt1 import release_layout

    cfg = preset_config("gpt1").model
    layout = release_layout(cfg)
    shapes = [list(s) for _, _, s, _ in layout]
    n = sum(int(np.prod(s)) for s in shapes)
    flat = np.random.default_rng(0).standard_normal(n, dtype=np.float32) * 0.02
    folder.mkdir(parents=True, exist_ok=True)
    for i, part in enumerate(np.array_split(flat, 10)):
        np.save(folder / f"params_{i}.npy", part)
    (folder / "params_shapes.json").write_text(json.dumps(shapes))
    for name in ("encoder_bpe_40000.json", "vocab_40000.bpe"):
        (folder / name).write_bytes((SHARED / "vocab" / "gpt1" / name).read_bytes())
    return n + 3 * cfg.n_embd


def measure(kind: str, src: Path, out: Path, params: int, repeat: int) -> dict:
    runs = []
    for _ in range(repeat):
        r = subprocess.run([sys.executable, "-c", CHILD, kind, str(src), str(out)], capture_output=True, text=True,
                           check=True)
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    best = min(runs, key=lambda r: r["seconds"])
    model_mb = params * 4 / 2**20
    extra = max(r["peak_rss_mb"] - r["baseline_rss_mb"] for r in runs)
    return {"params": params, "model_mb": round(model_mb, 1), "seconds_best": round(best["seconds"], 3),
            "seconds_all": [round(r["seconds"], 3) for r in runs],
            "peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs), 1),
            "baseline_rss_mb": round(best["baseline_rss_mb"], 1), "extra_mb": round(extra, 1),
            "extra_over_model": round(extra / model_mb, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=("hf", "openai-gpt1", "export"), help="one measurement only")
    ap.add_argument("--repeat", type=int, default=2, help="runs per measurement (best time, worst memory)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results: dict = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        t0 = time.perf_counter()
        if args.only in (None, "hf", "export"):
            n = make_hf_gpt2(d)
            if args.only in (None, "hf"):
                results["import_hf_gpt2_124m"] = measure("hf", d / "hf-gpt2", d / "run-gpt2", n, args.repeat)
            if args.only in (None, "export"):
                results["export_hf_gpt2_124m"] = measure("export", d / "src-run", d / "hf-out", n, args.repeat)
        if args.only in (None, "openai-gpt1"):
            n = make_release(d / "release")
            results["import_openai_gpt1_117m"] = measure("openai-gpt1", d / "release", d / "run-gpt1", n,
                                                         args.repeat)
        results["total_seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
