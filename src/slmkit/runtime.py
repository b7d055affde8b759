"""Devices, precision and processes: which hardware runs the math, in which dtype, in how many ranks."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
from dataclasses import dataclass
from functools import cache

import torch
import torch.distributed as dist

from slmkit.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but PyTorch sees no CUDA GPU here")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was asked for, but MPS is not available here")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"unsupported device {name!r}; use auto, cpu, cuda or mps")
    return dev


@cache
def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: there bf16 matmuls run several times faster than fp32 (README: measured)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype (float32 = no autocast). auto: bf16 where it is faster, else fp32."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if device.type == "cpu" and cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32  # MPS autocast support varies between releases: stay exact
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; use auto, float32, bfloat16 or float16")
    if name == "float16" and device.type == "cpu":
        raise UserError("float16 autocast is not supported on CPU; use bfloat16 or float32")
    return DTYPES[name]


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def can_fuse_adamw(device: torch.device) -> bool:
    """torch's fused AdamW kernel (one kernel for all parameters) exists for CUDA and CPU."""
    return device.type in ("cuda", "cpu")


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory_for_reuse(device: torch.device) -> bool:
    """Have glibc keep freed activation buffers in the process instead of handing them back to the OS.

    A training step allocates and frees hundreds of MB of activations. By default glibc serves big
    blocks with fresh mmaps and trims its heap on free, so every step page-faults its activations in
    again. Serving blocks up to 32 MB from a heap trimmed only above 1 GB keeps them mapped (the
    README's "How it works" gives the measured effect). Only the heap's free list changes; the
    peak RSS does not grow. A no-op for other devices and away from Linux/glibc.
    """
    return device.type == "cpu" and _glibc_keeps_freed_memory()


@cache
def _glibc_keeps_freed_memory() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))


@dataclass
class Distributed:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> tuple[Distributed, torch.device]:
    """Join the process group that torchrun describes in the environment (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed(), resolve_device(device_name)
    ddp = Distributed(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world)
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", ddp.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return ddp, device


def all_reduce_sum(t: torch.Tensor, ddp: Distributed) -> torch.Tensor:
    if ddp.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(ddp: Distributed) -> None:
    if ddp.enabled:
        dist.barrier()


def shutdown_distributed(ddp: Distributed) -> None:
    if ddp.enabled and dist.is_initialized():
        dist.destroy_process_group()


class StopRequests:
    """SIGINT (Ctrl-C) and SIGTERM (schedulers, `timeout`) while training.

    The first signal only sets `signum`: the loop finishes the step it is in (its evaluation and
    checkpoint included), saves, and exits. Stopping mid-step would save an RNG state that already
    covers part of the next step, or weights half updated, and resume would not be exact. A second
    Ctrl-C raises KeyboardInterrupt at once; the last checkpoint on disk is still whole.
    """

    def __init__(self, enabled: bool = True):
        self.signum: int | None = None
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if self.enabled:
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.getsignal(s)
                signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name} received: finishing this step, then saving "
              "(Ctrl-C again stops at once)", file=sys.stderr, flush=True)

    def requested(self, ddp: Distributed, device: torch.device) -> int | None:
        """The signal to stop for, agreed by every rank (one of them may have been signalled alone)."""
        if ddp.enabled:
            flag = torch.tensor([self.signum or 0], dtype=torch.int64, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return int(flag) or None
        return self.signum

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)  # type: ignore[arg-type]
