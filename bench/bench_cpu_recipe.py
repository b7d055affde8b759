"""The default CPU recipe end to end on tiny Shakespeare: training wall time and the full-split
validation loss it reaches (JSON), with the training tokens/s as model FLOP/s against this machine's
GEMM peak measured in the same run (model_tflops, of_gemm_peak, peaks). The quality bar: val loss <= 1.88.

    python bench/bench_cpu_recipe.py [--data-path ../shared/data/tinyshakespeare/input.txt]
"""

import argparse
import tempfile

from _common import SHARED_DATA, cpu_model, emit, machine_peaks, peak_rss_mb, utilisation

from slmkit.budget import flops_per_token
from slmkit.config import preset_config
from slmkit.data import prepare
from slmkit.runtime import resolve_device, resolve_dtype
from slmkit.train import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu-fast")
    ap.add_argument("--data-path", default=str(SHARED_DATA / "tinyshakespeare" / "input.txt"))
    ap.add_argument("--max-iters", type=int, default=0, help="0 = the preset's")
    ap.add_argument("--out-dir", default="")
    args = ap.parse_args()
    cfg = preset_config(args.preset)
    cfg.data.dataset, cfg.data.data_path = "tinyshakespeare", args.data_path
    if args.max_iters:
        cfg.train.max_iters = args.max_iters
    cfg.train.sample_tokens = 0
    prepare(cfg.data)  # data preparation is not training time
    out = args.out_dir or tempfile.mkdtemp(prefix="slm-bench-")
    r = train(cfg, out, overwrite=True, progress=False)
    evals = [h for h in r.history if "val_loss" in h]
    device = resolve_device(cfg.train.device)  # as the trainer resolves them
    peaks = machine_peaks(device)  # after training
    # PaLM's training FLOPs (forward and backward) per token at the block size; cfg.model has the vocabulary now
    flops = r.tokens_per_s * flops_per_token(cfg.model, cfg.model.block_size, training=True)
    emit({"bench": "cpu_recipe", "preset": args.preset, "params_m": round(r.params / 1e6, 3), "steps": r.step,
          "train_wall_s": round(r.elapsed, 1), "tokens_per_s": round(r.tokens_per_s),
          **utilisation(flops, resolve_dtype(cfg.train.dtype, device), peaks), "peaks": peaks, "cpu": cpu_model(),
          "val_loss_full_split": round(r.final_val_loss, 4), "best_fixed_subset_val_loss": round(r.best_val_loss, 4),
          "first_step_below_1_88": next((h["step"] for h in evals if h["val_loss"] <= 1.88), None),
          "peak_rss_mb": peak_rss_mb(), "run_dir": out})


if __name__ == "__main__":
    main()
