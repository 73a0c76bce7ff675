"""The step-indexed parts of a run: learning rate and per-step seeds, pure functions of the step
so that a resumed run replays exactly what an uninterrupted one does."""

from __future__ import annotations

import math

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
