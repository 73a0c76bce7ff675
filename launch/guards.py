"""Guards of the training loop against non-finite losses."""

from __future__ import annotations

import logging

import torch

from eoforge.launch.distributed import any_rank

log = logging.getLogger("eoforge")


class NonFiniteGuard:
    """Skips a micro-batch whose loss is NaN or Inf on any rank, before it reaches the weights,
    and counts it; ``limit`` in a row make ``exhausted`` true (the loop then saves and stops).

    Reading the loss is the one host synchronisation of a training step: the check cannot wait
    for a logging step, because by then the weights would carry the NaN.
    """

    def __init__(self, limit: int, skipped: int = 0):
        self.limit = limit
        self.skipped = skipped  # in the whole run, carried across resumes
        self.in_a_row = 0

    def skip(self, loss: torch.Tensor, step: int) -> bool:
        """Whether to skip the micro-batch of ``loss`` (the same answer on every rank)."""
        if not any_rank(not torch.isfinite(loss).item()):
            self.in_a_row = 0
            return False
        self.skipped += 1
        self.in_a_row += 1
        log.warning(
            f"step {step}: non-finite loss on some rank; micro-batch skipped "
            f"({self.in_a_row} in a row, {self.skipped} in all)"
        )
        return True

    @property
    def exhausted(self) -> bool:
        return self.in_a_row >= self.limit
