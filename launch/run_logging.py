"""Run logging: console and per-rank log files, TensorBoard scalars and image grids."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torchvision.utils import make_grid

SAR_MIN_NM = 1e6
TRUE_COLOUR_NM = (665.0, 560.0, 490.0)


def get_logger(log_dir: Path | None = None, rank: int = 0) -> logging.Logger:
    """The ``eoforge`` logger: INFO to stdout on rank 0, everything to ``logs/rank<r>.log``."""
    logger = logging.getLogger("eoforge")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    fmt = LevelFormatter(f"%(asctime)s [rank {rank}] %(message)s", "%H:%M:%S")
    if rank == 0:
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(fmt)
        logger.addHandler(console)
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(log_dir / f"rank{rank}.log")
        file.setFormatter(fmt)
        logger.addHandler(file)
    return logger


class LevelFormatter(logging.Formatter):
    """Marks warnings and errors (``warning: ...``) so that they stand out among the step lines
    of a console or a rank log; INFO lines stay as they are."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        if record.levelno >= logging.WARNING:
            marked = f"{record.levelname.lower()}: {record.message}"
            record = logging.makeLogRecord({**record.__dict__, "message": marked})
        return super().formatMessage(record)


def false_colour_bands(band_ids: Sequence[str], wavelengths: Sequence[float]) -> list[int]:
    """Three band indices for a false-colour composite.

    Optical: the bands nearest 665/560/490 nm (true colour). SAR only: VV, VH, VV again
    (the usual VV/VH/VV composite). Fewer than three bands repeat.
    """
    optical = [i for i, wl in enumerate(wavelengths) if wl < SAR_MIN_NM]
    if optical:
        return [
            min(optical, key=lambda i: abs(wavelengths[i] - target)) for target in TRUE_COLOUR_NM
        ]
    pol = {b.partition(":")[2].upper(): i for i, b in enumerate(band_ids)}
    first, second = pol.get("VV", 0), pol.get("VH", len(band_ids) - 1)
    return [first, second, first]


def reconstruction_grid(images: dict) -> torch.Tensor:
    """Rows of input | masked input | reconstruction as one [3, H', W'] image.

    ``images`` holds "input", "masked", "reconstruction" ([b, C, H, W], one band set),
    "band_ids" and "wavelengths" ([b, C] or [C]).
    """
    wl = images["wavelengths"]
    wl = (wl[0] if wl.dim() == 2 else wl).tolist()
    idx = false_colour_bands(images["band_ids"], wl)
    # One stretch for all three columns, taken from the input, so colours are comparable.
    ref = images["input"][:, idx].float().cpu()
    flat = ref.flatten(2)
    lo = flat.quantile(0.02, dim=2)[..., None, None]
    hi = flat.quantile(0.98, dim=2)[..., None, None]
    columns = [
        ((images[key][:, idx].float().cpu() - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
        for key in ("input", "masked", "reconstruction")
    ]
    tiles = torch.stack(columns, dim=1).flatten(0, 1)  # [b*3, 3, H, W], row = one sample
    return make_grid(tiles, nrow=3, padding=2, pad_value=1.0)


class TensorBoard:
    """A SummaryWriter on rank 0; a no-op elsewhere."""

    def __init__(self, log_dir: Path, enabled: bool, purge_step: int | None = None):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events logged after the checkpoint a run resumes from, so the
            # resumed curve has neither gaps nor duplicate steps.
            self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer:
            for key, value in values.items():
                if value is not None:
                    self.writer.add_scalar(key, value, step)

    def image(self, step: int, tag: str, image: torch.Tensor) -> None:
        if self.writer:
            self.writer.add_image(tag, image, step)

    def close(self) -> None:
        if self.writer:
            self.writer.flush()
            self.writer.close()
