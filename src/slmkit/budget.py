"""Budgets: estimate what a model will need before allocating any of it, memory and arithmetic.

A typo such as `n_layer = 1e30` or `--n-embd 81920` would otherwise grow the process until the
kernel kills it (or the machine swaps to a halt). The estimates here are closed-form, cost nothing,
and are checked against the memory the machine has free; `--force` goes ahead anyway.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from slmkit.config import ModelConfig
from slmkit.errors import UserError

GiB = 1024**3
# Bytes kept per activation element and layer for backward, following Korthikanti et al. (2022):
# ~34 bytes per (token x width) per layer in 16-bit with a fused (flash) attention kernel.
ACTIVATION_BYTES_PER_TOKEN_WIDTH = 34
TORCH_BASELINE_BYTES = 400 * 1024**2  # the interpreter, torch and its kernels, measured ~0.4 GB


def param_count(m: ModelConfig, vocab_size: int | None = None) -> int:
    """Parameters of the GPT `m` describes (the tied head counted once), computed, not built."""
    e, inner, bias = m.n_embd, m.mlp_width, int(m.bias)
    vocab = vocab_size if vocab_size is not None else m.vocab_size
    attention = e * 3 * e + bias * 3 * e + e * e + bias * e
    mlp = e * inner + bias * inner + inner * e + bias * e
    norms = 2 * (e + bias * e)
    final_norm = (e + bias * e) if m.ln == "pre" else 0
    return vocab * e + m.block_size * e + m.n_layer * (attention + mlp + norms) + final_norm


def matmul_params(m: ModelConfig, vocab_size: int | None = None) -> int:
    """Weights that take part in a matrix product per token: every linear layer plus the output head
    (tied or not); not the position table, biases or norms, which cost no multiplications."""
    e, inner = m.n_embd, m.mlp_width
    vocab = vocab_size if vocab_size is not None else m.vocab_size
    return m.n_layer * (4 * e * e + 2 * e * inner) + vocab * e


def flops_per_token(m: ModelConfig, context: float, training: bool, vocab_size: int | None = None) -> float:
    """Model FLOPs per token (PaLM, Chowdhery et al. 2022, appendix B; nanoGPT's MFU uses the same):
    2 per matmul weight forward, plus 2 x 2 x n_embd per layer for each attended position (q.k and
    the weighted sum of v), the backward costing twice the forward. `context` is the number of
    positions a token attends to: block_size for a training sequence (PaLM's convention, though a
    causal token sees half on average), the current length when decoding with a cache."""
    forward = 2 * matmul_params(m, vocab_size) + 4 * m.n_layer * m.n_embd * context
    return 3 * forward if training else forward


@dataclass
class MemoryEstimate:
    weights: int
    optimizer: int
    activations: int
    baseline: int = TORCH_BASELINE_BYTES

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + self.activations + self.baseline

    def describe(self) -> str:
        return (f"~{self.total / GiB:.1f} GiB (weights and gradients {self.weights / GiB:.1f}, optimizer "
                f"{self.optimizer / GiB:.1f}, activations {self.activations / GiB:.1f})")


def training_memory(m: ModelConfig, vocab_size: int, micro_batch: int, half_precision: bool) -> MemoryEstimate:
    """Per process: fp32 weights + gradients, two AdamW moments, one micro-batch's activations."""
    p = param_count(m, vocab_size)
    scale = 1 if half_precision else 2  # fp32 activations take twice the bytes
    tokens = micro_batch * m.block_size
    per_layer = tokens * m.n_embd * ACTIVATION_BYTES_PER_TOKEN_WIDTH * scale
    if m.attention_dropout > 0:
        per_layer += tokens * m.n_head * m.block_size * 5 * scale  # the math path keeps T x T weights
    logits = tokens * vocab_size * 4 * 3  # fp32 logits, their softmax and its gradient
    return MemoryEstimate(weights=8 * p, optimizer=8 * p, activations=m.n_layer * per_layer + logits)


def inference_memory(m: ModelConfig, vocab_size: int) -> MemoryEstimate:
    return MemoryEstimate(weights=4 * param_count(m, vocab_size), optimizer=0, activations=0)


def available_memory(device_type: str = "cpu") -> int | None:
    """Bytes the machine (or the GPU) can still give this process; None when unknown."""
    if device_type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(estimate: MemoryEstimate, what: str, device_type: str = "cpu", force: bool = False) -> None:
    """Refuse, in one line, a job whose estimate exceeds the free memory (unless `force`)."""
    if force:
        return
    free = available_memory(device_type)
    if free is not None and estimate.total > free:
        where = "GPU memory" if device_type == "cuda" else "memory"
        raise UserError(
            f"{what} needs {estimate.describe()} but only {free / GiB:.1f} GiB of {where} is free; "
            "make the model or batch smaller, or pass --force to try anyway"
        )
