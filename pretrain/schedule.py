"""The step-indexed parts of a run: learning rate and per-step seeds, pure functions of the step
so that a resumed run replays exactly what an uninterrupted one does; and the checks that a
schedule fits its run (warnings, not errors: a run may mean it)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def lr_at(step: int, peak: float, warmup: int, total: int, floor: float) -> float:
    """Linear warmup then half-cosine decay to ``floor``: a pure function of the step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def step_seed(seed: int, step: int, rank: int, *tags: int) -> int:
    """Independent, reproducible seed per (run seed, step, rank, tags): resume replays the same
    masks; validation batches use the tag 1."""
    return int(np.random.SeedSequence([seed, step, rank, *tags]).generate_state(1)[0])


# A peak learning rate below this trains nothing in the steps of a run.
MIN_PEAK_LR = 1e-5
# The loss has not moved when its smoothed value changes by less than STALL_TOLERANCE over the
# first STALL_WINDOW log intervals after warm-up.
STALL_WINDOW = 6
STALL_TOLERANCE = 0.01


def peak_lr(optim, global_batch: int) -> float:
    """optim.lr, else optim.blr x global_batch / 256 (MAE's scaling rule)."""
    return optim.lr if optim.lr is not None else optim.blr * global_batch / 256


def schedule_warnings(optim, steps: int, global_batch: int) -> list[str]:
    """What does not fit a run of ``steps`` optimizer steps of ``global_batch`` samples: a
    warm-up as long as the run, or a peak lr below MIN_PEAK_LR; each names the setting and a
    value that fits."""
    messages = []
    warmup, peak = optim.warmup(steps), peak_lr(optim, global_batch)
    if warmup >= steps:
        fit = max(1, steps // 10)
        setting = (
            f"optim.warmup_fraction={optim.warmup_fraction}"
            if optim.warmup_fraction is not None
            else f"optim.warmup_steps={warmup}"
        )
        messages.append(
            f"{setting} is not shorter than the run (steps={steps}): the lr reaches at most "
            f"{lr_at(steps - 1, peak, warmup, steps, optim.min_lr):.1e} of its peak {peak:.1e}; "
            f"set optim.warmup_steps={fit} or optim.warmup_fraction=0.1"
        )
    if peak < MIN_PEAK_LR:
        if optim.lr is not None:
            setting, fit = f"optim.lr={optim.lr:.1e}", f"optim.lr={MIN_PEAK_LR * 10:.0e}"
        else:
            setting = f"optim.blr={optim.blr:.1e} x global batch {global_batch} / 256"
            fit = f"optim.blr={MIN_PEAK_LR * 256 / global_batch:.1e} or more"
        messages.append(
            f"peak lr {peak:.1e} ({setting}) is below {MIN_PEAK_LR:.0e}: too small to train; "
            f"set {fit}"
        )
    return messages


def loss_has_not_moved(
    losses: Sequence[float], window: int = STALL_WINDOW, tolerance: float = STALL_TOLERANCE
) -> bool:
    """Whether the first ``window`` logged losses after warm-up (each the mean of one log
    interval) show no learning: the smoothed loss, the mean of each half of the window, changes
    by less than ``tolerance`` of its value from the first half to the second. False until
    ``window`` losses are there."""
    if len(losses) < window:
        return False
    half = window // 2
    before = sum(losses[:half]) / half
    after = sum(losses[window - half : window]) / half
    return abs(after - before) < tolerance * abs(before)


def stalled_loss_warning(losses: Sequence[float], optim, global_batch: int) -> str:
    """The warning for a loss that has not moved after warm-up, naming a higher lr to try."""
    peak = peak_lr(optim, global_batch)
    fit = (
        f"optim.lr={optim.lr * 10:.1e}"
        if optim.lr is not None
        else f"optim.blr={optim.blr * 10:.1e}"
    )
    return (
        f"the loss has not moved in the {len(losses)} log intervals after warm-up "
        f"({losses[0]:.4f} -> {losses[-1]:.4f}, under {STALL_TOLERANCE:.0%} change of its "
        f"smoothed value) at peak lr {peak:.1e}; the lr may be too small: try {fit}"
    )
