"""Fault injection: make a run fail at a chosen point, to test that it recovers.

``EOFORGE_FAULT`` holds one or more comma-separated faults ``KIND@STEPS[xCOUNT][:RANK]``:

- ``kill@N``: the process kills itself with SIGKILL right after optimizer step N (between
  checkpoints: nothing is flushed, nothing is saved).
- ``kill_in_save@N``: SIGKILL while the checkpoint of step N is being written: after DeepSpeed
  has written its files, before the checkpoint is marked complete and renamed into place.
- ``nan_loss@N`` or ``nan_loss@N-M``: at each of steps N..M, the loss of the first micro-batch
  tried is NaN (as if the model diverged on a bad batch); ``nan_loss@NxK``: of the first K tried.

``:RANK`` limits a fault to one rank (default: every rank). Steps count from 1 as in the logs.
Nothing happens when the variable is unset, and the checks cost a dictionary lookup.

Example::

    EOFORGE_FAULT=kill_in_save@20:0 eoforge launch local --nproc 2 -- pretrain --config demo
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import torch

ENV = "EOFORGE_FAULT"
KINDS = ("kill", "kill_in_save", "nan_loss")


@dataclass(frozen=True)
class Fault:
    kind: str
    first: int
    last: int
    count: int
    rank: int | None

    def hits(self, kind: str, step: int, rank: int, attempt: int = 0) -> bool:
        return (
            self.kind == kind
            and self.first <= step <= self.last
            and attempt < self.count
            and (self.rank is None or self.rank == rank)
        )


def parse_faults(text: str) -> list[Fault]:
    """``EOFORGE_FAULT``'s value -> faults; a malformed entry is a ValueError naming it."""
    faults = []
    for entry in filter(None, (part.strip() for part in text.split(","))):
        try:
            kind, _, where = entry.partition("@")
            where, _, rank = where.partition(":")
            steps, _, count = where.partition("x")
            first, _, last = steps.partition("-")
            fault = Fault(
                kind, int(first), int(last or first), int(count or 1), int(rank) if rank else None
            )
        except ValueError:
            fault = None
        if fault is None or kind not in KINDS or fault.last < fault.first:
            raise ValueError(
                f"{ENV}={text!r}: {entry!r} is not KIND@STEP[-STEP][xCOUNT][:RANK] with KIND one of "
                f"{', '.join(KINDS)}"
            )
        faults.append(fault)
    return faults


def _active(kind: str, step: int, rank: int, attempt: int = 0) -> bool:
    text = os.environ.get(ENV)
    return bool(text) and any(f.hits(kind, step, rank, attempt) for f in parse_faults(text))


def kill_point(kind: str, step: int, rank: int) -> None:
    """SIGKILL this process if ``EOFORGE_FAULT`` names ``kind`` at ``step`` for ``rank``."""
    if _active(kind, step, rank):
        os.kill(os.getpid(), signal.SIGKILL)


def poison_loss(loss: torch.Tensor, step: int, rank: int, attempt: int) -> torch.Tensor:
    """``loss``, or NaN of its shape where ``EOFORGE_FAULT`` names ``nan_loss`` at ``step`` for
    this ``attempt`` (micro-batches tried before it in the step). The NaN stays in the graph, as a
    real divergence would."""
    if _active("nan_loss", step, rank, attempt):
        return loss * float("nan")
    return loss
