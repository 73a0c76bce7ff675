"""The per-sensor views of a batch (ARCHITECTURE's batch contract), as objectives read them.

A batch is ``{sensor: view, ..., "meta": {...}}``; a view may carry ``valid`` (pixels holding data)
and ``present`` ([B], False for samples that lack the sensor: their image is zeros). Objectives
count a pixel only where both hold, so an absent sensor never enters a loss as zeros.
"""

from __future__ import annotations

import torch


def sensor_views(batch: dict) -> list[tuple[str, dict]]:
    """(sensor, view) for every sensor entry of a batch (everything except ``meta``)."""
    return [(k, v) for k, v in batch.items() if k != "meta"]


def single_date_views(batch: dict, objective: str) -> list[tuple[str, dict]]:
    """(sensor, view) for every single-date view (image [B, C, H, W]) of a batch.

    Raises:
        ValueError: naming ``objective`` and the sensors when every view is a time series.
    """
    views = [(s, v) for s, v in sensor_views(batch) if v["image"].dim() == 4]
    if not views:
        raise ValueError(
            f"{objective} reads single-date images [B, C, H, W]; the views of "
            f"{[s for s, _ in sensor_views(batch)]} are time series (seasonal_contrast trains "
            "on those)"
        )
    return views


def present_mask(view: dict) -> torch.Tensor:
    """bool [B]: which samples carry this view (all of them without a ``present`` entry)."""
    image = view["image"]
    present = view.get("present")
    if present is None:
        return torch.ones(image.shape[0], dtype=torch.bool, device=image.device)
    return present.to(image.device, torch.bool)


def valid_mask(view: dict) -> torch.Tensor:
    """bool, the image's shape ([B, C, H, W] or [B, T, C, H, W]): valid pixels of the samples
    that carry this view."""
    image = view["image"]
    valid = view.get("valid")
    valid = torch.ones_like(image, dtype=torch.bool) if valid is None else valid.to(torch.bool)
    present = present_mask(view).reshape(-1, *[1] * (image.ndim - 1))
    return valid & present
