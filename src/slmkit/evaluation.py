"""Deterministic language-model evaluation: loss, perplexity, bits per character, per-token scores."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from slmkit.data import full_split_windows
from slmkit.runtime import autocast


@dataclass
class LMScore:
    nll: float  # total negative log-likelihood in nats
    tokens: int  # predicted tokens
    chars: int  # characters of the text the tokens stand for (for bits per character)

    @property
    def loss(self) -> float:
        return self.nll / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))

    @property
    def bits_per_char(self) -> float:
        return self.nll / math.log(2) / max(self.chars, 1)

    def as_dict(self) -> dict[str, float | int]:
        return {
            "loss": self.loss,
            "perplexity": self.perplexity,
            "bits_per_char": self.bits_per_char,
            "nll": self.nll,
            "tokens": self.tokens,
            "chars": self.chars,
        }


@torch.no_grad()
def token_logprobs(
    model: torch.nn.Module,
    tokens: np.ndarray,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool = False,
) -> np.ndarray:
    """log P(token[i] | previous tokens in its window) for i = 1..n-1, through consecutive windows.

    Windows of block_size tokens are scored in batches; every token but the first is predicted
    exactly once, so the result does not depend on any random choice. `progress` shows a bar on
    a terminal (a whole split can take minutes).
    """
    block = model.config.block_size
    windows = list(full_split_windows(len(tokens), block))
    out = np.zeros(max(len(tokens) - 1, 0), dtype=np.float64)
    was_training = model.training
    model.eval()
    bar = _bar(len(windows), progress)
    for i in range(0, len(windows), batch_size):
        group = windows[i : i + batch_size]
        width = max(length for _, length in group)
        x = torch.zeros(len(group), width, dtype=torch.long)
        y = torch.full((len(group), width), -1, dtype=torch.long)
        for row, (start, length) in enumerate(group):
            chunk = torch.from_numpy(np.asarray(tokens[start : start + length + 1], dtype=np.int64))
            x[row, :length] = chunk[:-1]
            y[row, :length] = chunk[1:]
        x, y = x.to(device), y.to(device)
        with autocast(device, dtype):
            logits, _ = model(x)
        logp = F.log_softmax(logits.float(), dim=-1)
        picked = logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1).cpu().double().numpy()
        for row, (start, length) in enumerate(group):
            out[start : start + length] = picked[row, :length]
        if bar is not None:
            bar.update(len(group))
    if bar is not None:
        bar.close()
    model.train(was_training)
    return out


def _bar(total: int, enabled: bool):
    if not (enabled and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="window", desc="evaluating", leave=False, dynamic_ncols=True)


def score_tokens(
    model: torch.nn.Module,
    tokens: np.ndarray,
    chars: int,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool = False,
) -> LMScore:
    logp = token_logprobs(model, tokens, batch_size, device, dtype, progress)
    return LMScore(nll=float(-logp.sum()), tokens=int(logp.size), chars=chars)
