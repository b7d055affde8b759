"""Learning-rate schedules: a linear warmup to the peak, then a decay to a floor that is held after
the decay length.

Pre-training decays along a cosine; GPT-1's fine-tuning (section 3.2) warms up over 0.2% of the
steps and then decays linearly to 0. Both shapes share one signature, `Schedule`, so a loop names
its shape and passes the same four numbers. Every value is the rate for the 0-based `step` about
to be taken; the formulas are those the runs were trained and checkpointed with, so a resumed run
continues on exactly the rates it would have had.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from slmkit.config import TrainConfig

# (step, peak, warmup, decay_steps, floor) -> learning rate
Schedule = Callable[[int, float, int, int, float], float]


def warmup_cosine(step: int, peak: float, warmup: int, decay_steps: int, floor: float = 0.0) -> float:
    """Warmup to `peak`, then cosine decay to `floor` at `decay_steps`, held there after.

    The ramp is (step + 1) / (warmup + 1) of the peak, so it never quite reaches it: the cosine
    starts at the peak on step `warmup`, and the rate rises without a flat step in between."""
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    if step >= decay_steps:
        return floor
    progress = (step - warmup) / max(1, decay_steps - warmup)
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - floor)


def warmup_linear(step: int, peak: float, warmup: int, decay_steps: int, floor: float = 0.0) -> float:
    """Warmup to `peak`, then linear decay to `floor` at `decay_steps`, held there after (GPT-1's
    fine-tuning, with floor 0).

    The ramp is (step + 1) / warmup of the peak: the last warmup step already runs at the peak,
    and so does the first step of the decay."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return floor + (peak - floor) * max(0.0, (decay_steps - step) / max(1, decay_steps - warmup))


def lr_at(step: int, t: TrainConfig) -> float:
    """Pre-training's rate: `warmup_cosine` over lr_decay_iters (0: max_iters) down to floor_lr."""
    return warmup_cosine(step, t.learning_rate, t.warmup_iters, t.lr_decay_iters or t.max_iters, t.floor_lr)
