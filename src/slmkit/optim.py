"""The optimiser of every loop (pre-training, fine-tuning, and sweeps through pre-training): AdamW
with GPT-1's weight-decay rule. The learning rate it is given each step comes from slmkit.schedule."""

from __future__ import annotations

from typing import Any

import torch

from slmkit.runtime import can_fuse_adamw


def optimizer_groups(module: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two parameter groups: weight decay on matrices (dim >= 2) only, none on biases and layer norms'
    gains (GPT-1's "non bias or gain weights"). Frozen parameters are left out.

    The order of parameters within each group is `module.parameters()`'s: a saved optimizer state
    is matched to parameters by that order, so it must not change between a run and its resume."""
    params = [p for p in module.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def make_adamw(module: torch.nn.Module, lr: float, betas: tuple[float, float], weight_decay: float,
               device: torch.device, eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over `optimizer_groups(module, weight_decay)`, fused into one kernel where torch has one."""
    return torch.optim.AdamW(optimizer_groups(module, weight_decay), lr=lr, betas=betas, eps=eps,
                             fused=can_fuse_adamw(device))
