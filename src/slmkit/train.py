"""Pre-training: maximise the log-likelihood of the next token (GPT-1, eq. 1) with AdamW.

One step = grad_accum micro-batches on each of world_size processes. The global batch of step k
is drawn from (seed, k) alone, so a run resumed at step k, or split over more processes, sees the
same data as an uninterrupted single-process run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slmkit.budget import check_fits, training_memory
from slmkit.checkpoint import (
    BEST,
    LAST,
    Checkpoint,
    checkpoint_metadata,
    find_checkpoint,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    unwrap,
)
from slmkit.config import MAX_STEPS, RunConfig
from slmkit.data import (
    PreparedData,
    fixed_offsets,
    gather,
    open_prepared,
    prepare,
    train_batch_offsets,
)
from slmkit.errors import Interrupted, UserError
from slmkit.fileio import (
    FolderLock,
    atomic_write_text,
    first_missing,
    open_run_folder,
    record_files,
    remove_if_only_marker,
)
from slmkit.model import GPT
from slmkit.optim import make_adamw
from slmkit.runlog import METRICS, RunLog, format_seconds, pyplot, read_metrics, save_figure
from slmkit.runtime import (
    StopRequests,
    all_reduce_sum,
    autocast,
    barrier,
    init_distributed,
    keep_freed_memory_for_reuse,
    resolve_dtype,
    shutdown_distributed,
)
from slmkit.schedule import lr_at
from slmkit.tracking import check_outputs, open_trackers, require_loggers
from slmkit.zeroshot import ZeroShotProbe, check_probe_settings

PLOT, SAMPLES, CONFIG, TOKENIZER = "loss.png", "samples.txt", "config.json", "tokenizer.json"
DATA_INFO = "data.json"
RUN_KIND = "run"  # the ownership marker's kind for pre-training run folders


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    best_val_loss: float
    final_val_loss: float | None  # the full validation split, deterministic
    params: int
    tokens_per_s: float
    elapsed: float
    history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: Path, data: PreparedData, resume_from: Checkpoint | None = None,
                 force: bool = False, probe: ZeroShotProbe | None = None, init: Checkpoint | None = None):
        self.cfg, self.run_dir, self.data, self.probe = cfg, run_dir, data, probe
        t = cfg.train
        self.ddp, self.device = init_distributed(t.device)
        self.dtype = resolve_dtype(t.dtype, self.device)
        keep_freed_memory_for_reuse(self.device)
        self.tokenizer = data.tokenizer
        cfg.model.vocab_size = cfg.model.vocab_size or self.tokenizer.vocab_size
        if cfg.model.vocab_size < self.tokenizer.vocab_size:
            raise UserError(
                f"model vocab_size {cfg.model.vocab_size} is smaller than the tokenizer's {self.tokenizer.vocab_size}"
            )
        self.train_tokens, self.val_tokens = data.tokens("train"), data.tokens("val")
        data.check_block_size(cfg.model.block_size)
        self.epochs_note = self._steps_from_epochs() if resume_from is None else None

        estimate = training_memory(cfg.model, cfg.model.vocab_size, t.batch_size, self.dtype != torch.float32)
        check_fits(estimate, _model_words(cfg), self.device.type, force)
        torch.manual_seed(t.seed)  # identical initial weights on every rank
        self.model = GPT(cfg.model)
        if init is not None and resume_from is None:
            self._start_from(init)
        self.model.to(self.device)
        self.params = self.model.num_params()
        self.optimizer = make_adamw(self.model, t.learning_rate, (t.beta1, t.beta2), t.weight_decay, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16 and self.device.type == "cuda")
        self.step, self.best_val = 0, float("inf")
        self.elapsed_before = 0.0
        if resume_from is not None:
            self._restore(resume_from)
        else:
            torch.manual_seed(t.seed + self.ddp.rank)  # dropout masks differ between ranks
        self.train_model: torch.nn.Module = self.model
        if t.compile == "on" or (t.compile == "auto" and self.device.type == "cuda"):
            self.train_model = torch.compile(self.model)
        if self.ddp.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.train_model, device_ids=ids)
        # Only rank 0 writes the run's files and shows progress.
        self.log = RunLog(run_dir if self.ddp.is_main else None, echo=self.ddp.is_main)
        # The fixed evaluation subsets are sized by the global batch, so they do not change when the
        # same global batch is split over more processes.
        n_eval = t.eval_iters * t.batch_size * self.ddp.world_size
        self._val_offsets = fixed_offsets(len(self.val_tokens), cfg.model.block_size, n_eval)
        self._train_eval_offsets = fixed_offsets(len(self.train_tokens), cfg.model.block_size, n_eval)

    def _steps_from_epochs(self) -> str | None:
        """--epochs as max_iters, now that the train split's size is known; a resumed run keeps the
        max_iters saved in its checkpoint, so it ends where it was going to. Returns the line to log."""
        t = self.cfg.train
        if t.epochs <= 0:
            return None
        per_step = t.batch_size * t.grad_accum * self.ddp.world_size * self.cfg.model.block_size
        steps = max(1, math.ceil(t.epochs * len(self.train_tokens) / per_step))
        if steps > MAX_STEPS:
            raise UserError(f"epochs {t.epochs:g} of {len(self.train_tokens):,} train tokens is {steps:,} steps; "
                            f"at most {MAX_STEPS:,}")
        t.max_iters = steps
        return (f"epochs {t.epochs:g} = {steps:,} steps of {per_step:,} tokens over {len(self.train_tokens):,} "
                "train tokens (max_iters)")

    # -- state -------------------------------------------------------------------------------

    def _start_from(self, ckpt: Checkpoint) -> None:
        """--init-from: the weights of another run; the optimizer, schedule and step count start afresh."""
        if ckpt.tokenizer.fingerprint() != self.tokenizer.fingerprint():
            raise UserError(f"--init-from: {ckpt.path} was trained with a different tokenizer than this dataset's")
        load_weights(self.model, ckpt)

    def _restore(self, ckpt: Checkpoint) -> None:
        if ckpt.tokenizer.fingerprint() != self.tokenizer.fingerprint():
            raise UserError(f"checkpoint {ckpt.path} was trained with a different tokenizer than this dataset's")
        self.model.load_state_dict(ckpt.model_state(), strict=False)
        if not ckpt.has_optimizer():
            raise UserError(f"checkpoint {ckpt.path} holds no optimizer state; resume needs {LAST}")
        ckpt.restore_optimizer(self.optimizer)
        self.step = int(ckpt.state["step"])
        self.best_val = float(ckpt.state.get("best_val_loss", float("inf")))
        self.elapsed_before = float(ckpt.state.get("elapsed", 0.0))
        if "rng.torch" in ckpt.tensors and self.ddp.world_size == int(ckpt.state.get("world_size", 1)):
            ckpt.restore_rng()
        else:
            torch.manual_seed(self.cfg.train.seed + self.ddp.rank + self.step)

    def _state(self, elapsed: float) -> dict[str, Any]:
        return {
            "step": self.step,
            "best_val_loss": self.best_val,
            "elapsed": elapsed,
            "world_size": self.ddp.world_size,
            "params": self.params,
            "data": self.data.meta.get("source"),
        }

    def save(self, name: str, elapsed: float, with_optimizer: bool) -> None:
        if self.ddp.is_main:
            save_checkpoint(
                self.run_dir / name, self.model, self.cfg, self.tokenizer, self._state(elapsed),
                optimizer=self.optimizer if with_optimizer else None,
            )

    # -- math --------------------------------------------------------------------------------

    def _batch(self, tokens: np.ndarray, offsets: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = gather(tokens, offsets, self.cfg.model.block_size)
        x, y = torch.from_numpy(x), torch.from_numpy(y)
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    def _step_offsets(self, step: int) -> np.ndarray:
        """This rank's [grad_accum, batch_size] share of the global batch of `step`."""
        t = self.cfg.train
        total = t.grad_accum * self.ddp.world_size * t.batch_size
        offsets = train_batch_offsets(t.seed, step, len(self.train_tokens), self.cfg.model.block_size, total)
        return offsets.reshape(t.grad_accum, self.ddp.world_size, t.batch_size)[:, self.ddp.rank]

    def train_step(self, step: int) -> float:
        t = self.cfg.train
        lr = lr_at(step, t)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total_loss = torch.zeros((), device=self.device)
        for micro, offsets in enumerate(self._step_offsets(step)):
            x, y = self._batch(self.train_tokens, offsets)
            last = micro == t.grad_accum - 1
            # Under DDP, gradients are all-reduced on the last micro-batch only.
            sync = self.train_model.no_sync() if (self.ddp.enabled and not last) else _null()
            with sync:
                with autocast(self.device, self.dtype):
                    _, loss = self.train_model(x, y)
                self.scaler.scale(loss / t.grad_accum).backward()
            total_loss += loss.detach() / t.grad_accum
        if t.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return total_loss

    @torch.no_grad()
    def fixed_loss(self, tokens: np.ndarray, offsets: np.ndarray) -> float:
        """Mean loss over a fixed set of windows, shared out across ranks."""
        self.model.eval()
        mine = offsets[self.ddp.rank :: self.ddp.world_size]
        acc = torch.zeros(2, device=self.device, dtype=torch.float64)
        bs = self.cfg.train.batch_size
        for i in range(0, len(mine), bs):
            x, y = self._batch(tokens, mine[i : i + bs])
            with autocast(self.device, self.dtype):
                _, loss = self.model(x, y)
            acc += torch.tensor([loss.item() * y.numel(), y.numel()], device=self.device, dtype=torch.float64)
        all_reduce_sum(acc, self.ddp)
        self.model.train()
        return float(acc[0] / acc[1])

    # -- the loop ----------------------------------------------------------------------------

    def fit(self, stop_after_step: int | None = None, progress: bool = True,
            on_eval: Callable[[int, float], bool | None] | None = None) -> TrainResult:
        """Train to max_iters. `on_eval(step, val_loss)` runs after each evaluation (metrics and
        checkpoints written): a truthy return stops training there; an exception propagates.
        SIGINT/SIGTERM stop at the next step boundary with a checkpoint (see StopRequests)."""
        t = self.cfg.train
        self.model.train()
        self.log.echo = progress and self.ddp.is_main
        if self.epochs_note:
            self.log.text(self.epochs_note)
        self.log.text(self.banner())
        if self.probe is not None:
            self.log.text(self.probe.describe() + " (the console shows their mean, normalised: 0 = random guessing)")
        if self.cfg.train.zeroshot and self.step == 0:  # every rank: the losses are all-reduced
            # A curve of zero-shot behaviour starts at the untrained model (GPT-1's Fig. 2 starts at 0 updates).
            self.log.record({"step": 0, **self.evaluation()})
        bar = self.log.progress(t.max_iters, self.step)
        start = time.perf_counter()
        first_step = self.step
        self._window = (time.perf_counter(), 0)
        history: list[dict[str, Any]] = []
        with StopRequests() as stops:
            while self.step < t.max_iters:
                loss_t = self.train_step(self.step)
                self.step += 1
                elapsed = self.elapsed_before + time.perf_counter() - start
                record, saved = self._after_step(loss_t, elapsed)
                if len(record) > 1:
                    history.append(record)
                    info = self._progress_info(record)
                    done = self.step - first_step
                    if done >= 10 or "val_loss" in record:  # an estimate from the first steps, then refined
                        info["eta"] = format_seconds((time.perf_counter() - start) / done * (t.max_iters - self.step))
                    bar.update(self.step, info, line=True)
                signum = stops.requested(self.ddp, self.device)
                if signum is not None:
                    if not saved:
                        self.save(LAST, elapsed, with_optimizer=True)
                    bar.close()
                    name = signal.Signals(signum).name
                    raise Interrupted(f"{name}: stopped and saved at step {self.step}; continue with: "
                                      f"slm train --resume {self.run_dir}", signum)
                if stop_after_step is not None and self.step >= stop_after_step:
                    break
                if "val_loss" in record and on_eval is not None and on_eval(self.step, record["val_loss"]):
                    break
        bar.close()
        barrier(self.ddp)
        elapsed = self.elapsed_before + time.perf_counter() - start
        # Throughput over the whole session, evaluations excluded.
        speeds = [h["tokens_per_s"] for h in history if "tokens_per_s" in h]
        return TrainResult(
            run_dir=self.run_dir, step=self.step, best_val_loss=self.best_val, final_val_loss=None,
            params=self.params, tokens_per_s=float(np.median(speeds)) if speeds else 0.0,
            elapsed=elapsed, history=history,
        )

    def _after_step(self, loss_t: torch.Tensor, elapsed: float) -> tuple[dict[str, Any], bool]:
        """Log, evaluate and checkpoint after a finished step; returns (record, whether LAST was saved).

        The record reaches metrics.jsonl before the checkpoint: a kill between the two leaves a
        record past the checkpoint, which resume drops and writes again, never a missing one."""
        t = self.cfg.train
        done = self.step == t.max_iters
        log_now = self.step % t.log_interval == 0 or done
        eval_now = self.step % t.eval_interval == 0 or done
        ckpt_now = eval_now or bool(t.checkpoint_interval and self.step % t.checkpoint_interval == 0)
        record: dict[str, Any] = {"step": self.step}
        window_start, window_steps = self._window
        window_steps += 1
        if log_now or eval_now:
            loss = float(all_reduce_sum(loss_t.clone(), self.ddp)) / self.ddp.world_size
            now = time.perf_counter()
            tokens_per_step = t.batch_size * t.grad_accum * self.ddp.world_size * self.cfg.model.block_size
            tok_s = window_steps * tokens_per_step / max(now - window_start, 1e-9)
            window_start, window_steps = now, 0
            record.update(loss=loss, lr=lr_at(self.step - 1, t), tokens_per_s=round(tok_s, 1),
                          elapsed=round(elapsed, 3))
        new_best = False
        if eval_now:
            record.update(self.evaluation())
            new_best = record["val_loss"] < self.best_val
            if new_best:
                self.best_val = record["val_loss"]
            window_start = time.perf_counter()  # evaluation time does not count as training speed
        self._window = (window_start, window_steps)
        if len(record) > 1:
            self.log.record(record)
        if new_best:
            self.save(BEST, elapsed, with_optimizer=False)
        if ckpt_now:
            self.save(LAST, elapsed, with_optimizer=True)
        if eval_now and self.ddp.is_main:
            plot_losses(self.run_dir)
        return record, ckpt_now

    def evaluation(self) -> dict[str, float]:
        """Validation and training loss on their fixed subsets, and the zero-shot probes."""
        out = {"val_loss": self.fixed_loss(self.val_tokens, self._val_offsets),
               "train_eval_loss": self.fixed_loss(self.train_tokens, self._train_eval_offsets)}
        if self.probe is not None:
            out.update(self.probe(self.model, self.device, self.dtype))
        return out

    @staticmethod
    def _progress_info(record: dict[str, Any]) -> dict[str, Any]:
        # Beside the validation loss goes the training loss on a fixed subset in eval mode, measured
        # the same way: the gap between the two is the overfitting, which a dropout-on minibatch
        # loss would blur.
        return {"loss": f"{record['loss']:.4f}" if "loss" in record else None,
                "train": f"{record['train_eval_loss']:.4f}" if "train_eval_loss" in record else None,
                "val": f"{record['val_loss']:.4f}" if "val_loss" in record else None,
                "zero-shot": f"{np.mean(probes):+.3f}" if (probes := _normalized(record)) else None,
                "tok/s": f"{record['tokens_per_s']:,.0f}" if "tokens_per_s" in record else None}

    def banner(self) -> str:
        """One line before the first step: what runs where, and for how long."""
        t, m = self.cfg.train, self.cfg.model
        per_step = t.batch_size * t.grad_accum * self.ddp.world_size * m.block_size
        precision = "float32" if self.dtype == torch.float32 else f"{str(self.dtype).removeprefix('torch.')} autocast"
        start = f"resuming at step {self.step:,} of" if self.step else "training for"
        procs = f" x {self.ddp.world_size} processes" if self.ddp.enabled else ""
        return (f"{start} {t.max_iters:,} steps: {self.params / 1e6:.2f}M parameters on {self.device} in {precision}, "
                f"{per_step:,} tokens per step ({t.batch_size} x {t.grad_accum} sequences{procs} of {m.block_size} "
                f"tokens), {per_step * t.max_iters / 1e6:.2f}M tokens in all, evaluating every {t.eval_interval:,} "
                f"-> {self.run_dir}")


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _normalized(record: dict[str, Any]) -> list[float]:
    """The zero-shot probes' normalised scores in an evaluation record (see ZeroShotProbe)."""
    return [v for k, v in record.items() if k.startswith("zeroshot/") and k.endswith("/normalized")]


def plot_losses(run_dir: Path) -> None:
    """loss.png: training and validation loss measured alike (fixed subsets, eval mode), the noisy
    minibatch loss behind them, and the learning rate on a second axis. With --zeroshot, a second
    panel beside it as GPT-1's Fig. 2 right: each task's zero-shot score, normalised between random
    guessing (0) and its reference (1), and their mean, against pre-training steps."""
    plt = pyplot()
    records = read_metrics(run_dir)

    def series(key: str) -> list[tuple[int, float]]:
        return [(r["step"], r[key]) for r in records if key in r]

    probes = sorted({k for r in records for k in r if k.startswith("zeroshot/") and k.endswith("/normalized")})
    fig, axes = plt.subplots(1, 2 if probes else 1, figsize=(13, 4.4) if probes else (7.5, 4.4), squeeze=False)
    ax = axes[0][0]
    for key, label, style in (("loss", "minibatch loss (dropout on)", dict(alpha=0.25, color="tab:gray")),
                              ("train_eval_loss", "train loss (fixed subset)", dict(marker="o", color="tab:blue")),
                              ("val_loss", "val loss (fixed subset)", dict(marker="o", color="tab:orange"))):
        points = series(key)
        if points:
            ax.plot(*zip(*points, strict=True), label=label, **style)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(Path(run_dir).name)
    ax.grid(alpha=0.3)
    lr = series("lr")
    if lr:
        ax_lr = ax.twinx()
        ax_lr.plot(*zip(*lr, strict=True), color="tab:green", alpha=0.5, linewidth=1)
        ax_lr.set_ylabel("learning rate", color="tab:green")
        ax_lr.tick_params(axis="y", colors="tab:green")
    ax.legend(loc="upper right")
    if probes:
        _plot_probes(axes[0][1], records, probes)
    fig.tight_layout()
    save_figure(fig, Path(run_dir) / PLOT, dpi=100)


def _plot_probes(ax, records: list[dict[str, Any]], probes: list[str]) -> None:
    for key in probes:
        points = [(r["step"], r[key]) for r in records if key in r]
        ax.plot(*zip(*points, strict=True), marker=".", label=key.split("/")[1], alpha=0.8)
    mean = [(r["step"], float(np.mean(_normalized(r)))) for r in records if _normalized(r)]
    if len(probes) > 1:
        ax.plot(*zip(*mean, strict=True), color="black", linewidth=2, label="mean")
    ax.axhline(0.0, color="gray", linewidth=1, linestyle="--")
    ax.set_xlabel("step")
    ax.set_ylabel("zero-shot score, normalised\n(0 = random guessing, 1 = reference)")
    ax.set_title("zero-shot behaviours during pre-training")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")


RUN_FILES = (CONFIG, TOKENIZER, DATA_INFO, METRICS, PLOT, LAST, BEST, SAMPLES)


def legacy_run_files(folder: Path) -> list[str] | None:
    """A run folder written before ownership markers: it holds one of our checkpoints (recognised by
    its header; the checkpoint is read and checked in full only when it is used)."""
    for name in (LAST, BEST):
        if (folder / name).is_file() and not (folder / name).is_symlink():
            if checkpoint_metadata(folder / name) is None:
                return None
            return [n for n in RUN_FILES if (folder / n).exists()]
    return None


def write_run_files(run_dir: Path, cfg: RunConfig, data: PreparedData, resolved: dict[str, str]) -> None:
    """config.json (with the device and dtype actually used), tokenizer.json and data.json."""
    from slmkit.tokenizers import save_tokenizer

    record_files(run_dir, RUN_KIND, RUN_FILES)
    saved = cfg.to_dict()
    saved["resolved"] = resolved
    atomic_write_text(run_dir / CONFIG, json.dumps(saved, indent=2))
    save_tokenizer(data.tokenizer, run_dir / TOKENIZER)
    atomic_write_text(run_dir / DATA_INFO, json.dumps({"prepared_dir": str(data.dir), **data.meta}, indent=2))


def claim_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> FolderLock:
    """Lock the run folder for this process and check it may be written (see fileio)."""
    lock = open_run_folder(run_dir, RUN_KIND, overwrite and not resume, "--out-dir", legacy=legacy_run_files)
    try:
        links = [n for n in RUN_FILES if (run_dir / n).is_symlink()]
        if links:
            raise UserError(f"{run_dir / links[0]} is a symbolic link; slmkit does not write through links it "
                            "did not make (remove it)")
        if resume and not (run_dir / LAST).is_file():
            raise UserError(f"--resume: {run_dir} holds no {LAST} to continue from")
        if not resume and ((run_dir / LAST).exists() or (run_dir / BEST).exists()):
            raise UserError(f"{run_dir} already holds a trained run; use --resume to continue it, --overwrite to "
                            "start over, or another --out-dir")
    except BaseException:
        lock.release()
        raise
    return lock


def default_preset(device: str) -> str | None:
    """The preset used when none is given: on a CPU the fast CPU recipe (the defaults describe a
    10.8M-parameter model that needs hours there); elsewhere the defaults."""
    from slmkit.runtime import resolve_device

    return "cpu-fast" if resolve_device(device).type == "cpu" else None


# What `--resume` may change: how long and how often, where it runs and what it probes; never the
# model, the data or the optimisation that the saved state belongs to.
RESUME_OVERRIDABLE = {"max_iters", "eval_interval", "log_interval", "device", "dtype", "compile",
                      "zeroshot", "zeroshot_ref", "zeroshot_calibrate", "zeroshot_limit", "logger",
                      "sample_tokens", "checkpoint_interval", "lr_decay_iters", "final_eval"}


def resume_config(run_dir: Path, overrides: dict[str, dict[str, Any]]) -> RunConfig:
    """The saved configuration of `run_dir` with the allowed `overrides`.

    A longer `max_iters` keeps the learning-rate schedule of the original length: the cosine ends
    where it was going to, and the extra steps run at the floor learning rate. Re-stretching the
    cosine over the new length would send the learning rate back up mid-run, undoing the anneal.
    `--lr-decay-iters N` sets another decay length explicitly."""
    from slmkit.config import apply_overrides

    run_dir = Path(run_dir)
    if not (run_dir / LAST).is_file():
        raise UserError(f"--resume: {run_dir} holds no {LAST} to continue from")
    cfg = load_checkpoint(run_dir / LAST).config
    fixed = sorted(n for values in overrides.values() for n in values if n not in RESUME_OVERRIDABLE)
    if fixed:
        raise UserError(f"--resume continues the saved configuration; cannot change: {', '.join(fixed)}")
    saved_length = cfg.train.lr_decay_iters or cfg.train.max_iters
    apply_overrides(cfg, overrides, source="command line")
    t = cfg.train
    if t.max_iters != saved_length and "lr_decay_iters" not in overrides.get("train", {}) and not t.lr_decay_iters:
        t.lr_decay_iters = saved_length
        if t.max_iters > saved_length:
            print(f"note: the learning-rate schedule keeps its original length ({saved_length:,} steps); steps "
                  f"{saved_length + 1:,}-{t.max_iters:,} run at the floor rate {t.floor_lr:.3g} (--lr-decay-iters N "
                  "decays over N steps instead)", file=sys.stderr)
    cfg.validate()
    return cfg


def train(
    cfg: RunConfig,
    run_dir: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    stop_after_step: int | None = None,
    prepared_dir: str | None = None,
    final_eval: bool | None = None,
    on_eval: Callable[[int, float], bool | None] | None = None,
    force: bool = False,
    note: str | None = None,
) -> TrainResult:
    """Pre-train (or continue) a model; the library entry point behind `slm train`.

    `final_eval` (None: cfg.train.final_eval) scores the whole validation split after the last step;
    `force` trains even when the memory estimate exceeds the free memory; `note` is printed with
    the start banner (once everything is checked, so an error stays the only line)."""
    from slmkit.evaluation import score_tokens

    run_dir = Path(run_dir)
    cfg.validate()
    t = cfg.train
    if t.zeroshot:
        check_probe_settings(t.zeroshot, t.zeroshot_ref, t.zeroshot_calibrate)
    elif t.zeroshot_ref or t.zeroshot_calibrate or t.zeroshot_limit:
        raise UserError("--zeroshot-ref, --zeroshot-calibrate and --zeroshot-limit go with --zeroshot TASK:FILE,...")
    require_loggers(t.logger)  # a tracker that is not installed fails here, before any folder is made
    # A first estimate without the embedding (the vocabulary is not known yet): an absurd size is
    # refused before any data is prepared or any folder created.
    check_fits(training_memory(cfg.model, 0, cfg.train.batch_size, True), _model_words(cfg), force=force)
    created = first_missing(run_dir)
    lock = None
    trainer = None
    ok = False
    try:
        if int(os.environ.get("RANK", "0")) == 0:
            lock = claim_run_dir(run_dir, resume, overwrite)
            check_outputs(run_dir, t.logger)
        # A resumed run encodes its text with the tokenizer it was trained with, whatever the cache
        # holds (a BPE retrained on the same text may come out different).
        saved = load_checkpoint(run_dir / LAST) if resume else None
        if saved is not None:
            check_same_data(saved.config, cfg)
        # --init-from: the starting weights come with their tokenizer, which then encodes the new text.
        init = load_checkpoint(find_checkpoint(t.init_from)) if t.init_from and saved is None else None
        if init is not None:
            check_init_architecture(init, cfg)
        saved_tokenizer = saved.tokenizer if saved is not None else init.tokenizer if init is not None else None
        data = open_prepared(prepared_dir) if prepared_dir else prepare(cfg.data, tokenizer=saved_tokenizer)
        probe = None
        if t.zeroshot and int(os.environ.get("RANK", "0")) == 0:  # rank 0 alone logs, so it alone probes
            probe = ZeroShotProbe(t.zeroshot, data.tokenizer, t.zeroshot_ref, t.zeroshot_calibrate, t.zeroshot_limit)
        trainer = Trainer(cfg, run_dir, data, saved, force=force, probe=probe, init=init)  # checkpoints read once
        del saved, saved_tokenizer, init  # their tensors (weights, AdamW moments) are copied in: free them
        if trainer.ddp.is_main:
            write_run_files(run_dir, cfg, data, {"device": str(trainer.device), "dtype": str(trainer.dtype)})
            if resume:
                trainer.log.truncate_after(trainer.step)
            else:  # a start killed before its first checkpoint may have logged steps; this run redoes them
                trainer.log.truncate_after(-1)
            # Experiment trackers (--logger): rank 0 alone, as it alone writes the run's files.
            trainer.log.extra += open_trackers(t.logger, run_dir, {**cfg.to_dict(), "n_params": trainer.params},
                                               ("val_loss", "final_val_loss"), trainer.step if resume else None)
        barrier(trainer.ddp)
        trainer.log.echo = progress and trainer.ddp.is_main
        if note:
            trainer.log.text(note)
        result = trainer.fit(stop_after_step=stop_after_step, progress=progress, on_eval=on_eval)
        if trainer.ddp.is_main and trainer.step >= cfg.train.max_iters:
            if cfg.train.final_eval if final_eval is None else final_eval:
                val = trainer.val_tokens
                trainer.log.text(f"final evaluation on the whole validation split ({len(val):,} tokens; skip it "
                                 "with --no-final-eval)")
                chars = int(data.meta["chars"]["val"] * (len(val) - 1) / max(len(val), 1))
                score = score_tokens(trainer.model, val, chars, cfg.train.batch_size, trainer.device, trainer.dtype,
                                     progress=progress)
                result.final_val_loss = score.loss
                trainer.log.record({"step": trainer.step, "final_val_loss": score.loss,
                                    "final_val_bpc": score.bits_per_char})
            if cfg.train.sample_tokens > 0:
                samples = write_samples(trainer.model, trainer.tokenizer, run_dir / SAMPLES, cfg.train.sample_tokens,
                                        trainer.device, trainer.dtype, cfg.train.seed)
                trainer.log.artifact(SAMPLES, samples, trainer.step)
        ok = True
        return result
    except BaseException:
        if created is not None and trainer is None:
            if lock is not None:
                lock.release()
                lock = None
            remove_if_only_marker(run_dir, created)  # a failed start leaves no empty run folder behind
        raise
    finally:
        if trainer is not None:
            trainer.log.close(ok)
            shutdown_distributed(trainer.ddp)
        if lock is not None:
            lock.release()


# What a run started --init-from another may set differently: the dropout, a regulariser of training rather
# than part of the weights. The tokenizer is the other run's too (the embedding rows are its tokens).
INIT_CHANGEABLE_MODEL = {"dropout", "attn_dropout"}
INIT_FIXED_DATA = {"tokenizer", "bpe_vocab_size", "vocab_dir", "data_path"}


def init_config(source: str, overrides: dict[str, dict[str, Any]]) -> RunConfig:
    """The configuration of a run that continues pre-training from `source`'s weights: its architecture,
    tokenizer and training settings, with `overrides` (the command line's) on top.

    A new --dataset without --val-data validates on the new corpus, not on the old run's validation
    text. Changing the architecture or the tokenizer is refused: the weights would not fit."""
    from slmkit.config import apply_overrides

    cfg = load_checkpoint(find_checkpoint(source)).config
    fixed = sorted([n for n in overrides.get("model", {}) if n not in INIT_CHANGEABLE_MODEL]
                   + [n for n in overrides.get("data", {}) if n in INIT_FIXED_DATA])
    if fixed:
        raise UserError(f"--init-from keeps {source}'s architecture and tokenizer; cannot change: {', '.join(fixed)}")
    if "dataset" in overrides.get("data", {}) and "val_data" not in overrides["data"]:
        cfg.data.val_data = ""
    t = cfg.train  # the old run's probes and trackers are not this run's choice
    t.zeroshot, t.zeroshot_ref, t.zeroshot_calibrate, t.zeroshot_limit, t.logger = "", "", "", 0, ""
    apply_overrides(cfg, overrides, source="command line")
    cfg.train.init_from = str(source)
    cfg.validate()
    return cfg


def check_init_architecture(init: Checkpoint, cfg: RunConfig) -> None:
    """The run's model must be the one whose weights it starts from (dropout aside)."""
    theirs, ours = dataclasses.asdict(init.config.model), dataclasses.asdict(cfg.model)
    for name, value in ours.items():
        if name in INIT_CHANGEABLE_MODEL or (name == "vocab_size" and value == 0):
            continue
        if theirs.get(name) != value:
            raise UserError(f"--init-from {cfg.train.init_from}: the model must be that run's, whose {name} is "
                            f"{theirs.get(name)}, not {value}")


def check_same_data(saved: RunConfig, cfg: RunConfig) -> None:
    """A resumed run continues on the data it was trained on (where a local copy lives may move)."""
    movable = {"data_path", "cache_dir"}
    changed = sorted(k for k, v in saved.data.__dict__.items() if k not in movable and getattr(cfg.data, k) != v)
    if changed:
        raise UserError(f"--resume continues the saved data settings; cannot change: {', '.join(changed)}")


def _model_words(cfg: RunConfig) -> str:
    return f"training this {cfg.model.n_layer}-layer, {cfg.model.n_embd}-wide model"


def write_samples(model, tokenizer, path: Path, max_new_tokens: int, device, dtype, seed: int, n: int = 3) -> str:
    """samples.txt: `n` samples from the model; returns its text."""
    from slmkit.generate import GenerationConfig, generate_text

    model = unwrap(model)
    model.eval()
    prompt_ids = [tokenizer.special["eot"]] if "eot" in tokenizer.special else tokenizer.encode("\n")[:1] or [0]
    gen = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.8, top_k=200, seed=seed, num_samples=n)
    texts = generate_text(model, tokenizer, prompt_ids=prompt_ids, gen=gen, device=device, dtype=dtype)
    text = "".join(f"--- sample {i + 1} ---\n{t}\n" for i, t in enumerate(texts))
    atomic_write_text(path, text)
    return text

