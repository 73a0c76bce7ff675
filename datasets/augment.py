"""Geometric augmentation that keeps the sensors and dates of one sample aligned.

``augment_sample`` draws one random resized crop, one horizontal and one vertical flip decision
and one rotation by a multiple of 90 degrees from a ``torch.Generator`` and applies them
identically to every sensor view of a sample and to every date of a time series, so that
co-registered pixels stay co-registered. Views follow the sample contract (``image`` float32
[C, H, W] or [T, C, H, W], ``valid`` bool of the same shape) and must share one grid (H, W).

Resampling never mixes invalid pixels into valid ones: invalid pixels are zero-filled before the
image is resampled (bilinear, anti-aliased when shrinking), the indicator of invalid pixels is
resampled with the same non-negative weights, and an output pixel is valid only where that
indicator is exactly 0, i.e. where every input pixel that contributes to it was valid. Invalid
output pixels are 0, as the normaliser leaves them. A crop that is not resized is an exact copy.

The view's ``gsd`` follows the resampling (the crop's pixel size scaled by crop size / output
size, geometric mean of the two axes); ``meta`` is returned unchanged but for ``meta["augment"]``,
the record of the applied transform::

    {"crop": [top, left, height, width] (input pixels), "size": [H, W] (after the resize,
     before rotation), "hflip": bool, "vflip": bool, "rot90": k (counter-clockwise quarter turns)}

Order: crop + resize, horizontal flip, vertical flip, rotation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from eoforge.datasets.errors import DataError

CROP_TRIES = 10  # as torchvision's RandomResizedCrop: then fall back to a central crop


@dataclass(frozen=True)
class AugmentConfig:
    """What ``augment_sample`` draws.

    Attributes:
        enabled: False returns samples untouched.
        crop: draw a random resized crop.
        crop_scale: range of the crop's area as a fraction of the tile's area.
        crop_ratio: range of the crop's aspect ratio (width / height), drawn log-uniformly.
        out_size: (H, W) or one side of the output; None keeps the input size.
        hflip: probability of a horizontal (left-right) flip.
        vflip: probability of a vertical (up-down) flip.
        rot90: rotate by a uniformly drawn multiple of 90 degrees. For a non-square output only
            0 or 180 degrees are drawn, so that every sample keeps one shape (one batch key).
    """

    enabled: bool = True
    crop: bool = True
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    out_size: int | tuple[int, int] | None = None
    hflip: float = 0.5
    vflip: float = 0.5
    rot90: bool = True

    def __post_init__(self) -> None:
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"crop_scale={self.crop_scale}: need 0 < low <= high <= 1")
        low, high = self.crop_ratio
        if not 0 < low <= high:
            raise ValueError(f"crop_ratio={self.crop_ratio}: need 0 < low <= high")
        for name in ("hflip", "vflip"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)}: a probability in [0, 1]")
        if self.out_size is not None and min(self.size_of(1, 1)) < 1:
            raise ValueError(f"out_size={self.out_size}: sides must be >= 1")

    def size_of(self, height: int, width: int) -> tuple[int, int]:
        """The output (H, W) of a tile of ``height`` x ``width`` pixels."""
        if self.out_size is None:
            return height, width
        if isinstance(self.out_size, int):
            return self.out_size, self.out_size
        out_h, out_w = self.out_size
        return int(out_h), int(out_w)


def augment_sample(sample: dict, generator: torch.Generator, cfg: AugmentConfig) -> dict:
    """One random crop/flip/rotation applied identically to every view and date of ``sample``.

    Args:
        sample: a sample in the sample contract (see ``eoforge.datasets.reader``).
        generator: source of every random draw; a fixed seed gives a fixed transform.
        cfg: what to draw.

    Returns:
        A new sample: transformed ``image``/``valid`` per view, ``gsd`` of the output pixels,
        other view fields as given, and ``meta`` with the transform recorded under ``"augment"``.

    Raises:
        DataError: when the views are not on one grid, or a view's valid mask does not match its
            image.
    """
    if not cfg.enabled:
        return sample
    sensors = [key for key in sample if key != "meta"]
    if not sensors:
        raise DataError("sample has no sensor view to augment")
    height, width = _common_grid(sample, sensors)
    out_h, out_w = cfg.size_of(height, width)
    top, left, crop_h, crop_w = (
        _draw_crop(height, width, cfg, generator) if cfg.crop else (0, 0, height, width)
    )
    hflip = bool(torch.rand((), generator=generator) < cfg.hflip)
    vflip = bool(torch.rand((), generator=generator) < cfg.vflip)
    rot90 = 0
    if cfg.rot90:
        # Quarter turns would swap H and W of a non-square output: only half turns keep its shape.
        choices = 4 if out_h == out_w else 2
        rot90 = int(torch.randint(choices, (), generator=generator)) * (4 // choices)

    out = {}
    for sensor in sensors:
        view = sample[sensor]
        image = view["image"][..., top : top + crop_h, left : left + crop_w]
        valid = view["valid"][..., top : top + crop_h, left : left + crop_w]
        image, valid = _resize(image, valid, (out_h, out_w))
        dims = []
        if hflip:
            dims.append(-1)
        if vflip:
            dims.append(-2)
        if dims:
            image, valid = image.flip(dims), valid.flip(dims)
        if rot90:
            image = torch.rot90(image, rot90, dims=(-2, -1))
            valid = torch.rot90(valid, rot90, dims=(-2, -1))
        scale = math.sqrt((crop_h * crop_w) / (out_h * out_w))  # input pixels per output pixel
        out[sensor] = {
            **view,
            "image": image.contiguous(),
            "valid": valid.contiguous(),
            "gsd": float(view["gsd"]) * scale,
        }
    out["meta"] = {
        **sample.get("meta", {}),
        "augment": {
            "crop": [top, left, crop_h, crop_w],
            "size": [out_h, out_w],
            "hflip": hflip,
            "vflip": vflip,
            "rot90": rot90,
        },
    }
    return out


def _common_grid(sample: dict, sensors: list[str]) -> tuple[int, int]:
    """The (H, W) every view shares; co-registered views are on one grid."""
    grids = {}
    for sensor in sensors:
        view = sample[sensor]
        image, valid = view["image"], view["valid"]
        if image.ndim not in (3, 4) or valid.shape != image.shape:
            raise DataError(
                f"view {sensor}: image {tuple(image.shape)} and valid {tuple(valid.shape)} must "
                "share one [C, H, W] or [T, C, H, W] shape"
            )
        grids[sensor] = tuple(image.shape[-2:])
    if len(set(grids.values())) > 1:
        raise DataError(
            f"views on different grids cannot be augmented together: {grids}; co-registered "
            "sensors share one grid (build them with eoforge.datasets.pairs.build_paired_shards)"
        )
    return grids[sensors[0]]


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def _draw_crop(
    height: int, width: int, cfg: AugmentConfig, generator: torch.Generator
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop with area and aspect ratio drawn from the config's ranges
    (torchvision's RandomResizedCrop draw, from ``generator``)."""
    area = height * width
    log_low, log_high = math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1])
    for _ in range(CROP_TRIES):
        target = area * _uniform(*cfg.crop_scale, generator)
        ratio = math.exp(_uniform(log_low, log_high, generator))
        crop_w = round(math.sqrt(target * ratio))
        crop_h = round(math.sqrt(target / ratio))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(torch.randint(height - crop_h + 1, (), generator=generator))
            left = int(torch.randint(width - crop_w + 1, (), generator=generator))
            return top, left, crop_h, crop_w
    # No draw fits: the largest central crop whose ratio is within range.
    ratio = width / height
    if ratio < cfg.crop_ratio[0]:
        crop_w, crop_h = width, round(width / cfg.crop_ratio[0])
    elif ratio > cfg.crop_ratio[1]:
        crop_h, crop_w = height, round(height * cfg.crop_ratio[1])
    else:
        crop_h, crop_w = height, width
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def _resize(
    image: torch.Tensor, valid: torch.Tensor, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample ``image``/``valid`` [..., h, w] to [..., *size] without mixing invalid pixels
    into valid ones (module docstring)."""
    if tuple(image.shape[-2:]) == size:
        return image, valid
    lead = image.shape[:-2]
    # Every channel and date in one call: [1, L, h, w] with L = prod(lead).
    flat_image = image.reshape(1, -1, *image.shape[-2:])
    flat_valid = valid.reshape(1, -1, *valid.shape[-2:])
    filled = torch.where(flat_valid, flat_image, torch.zeros((), dtype=flat_image.dtype))
    invalid = (~flat_valid).to(flat_image.dtype)
    # Bilinear weights are non-negative, so the resampled invalid indicator is exactly 0 where
    # (and only where) every contributing input pixel was valid.
    resized = F.interpolate(filled, size=size, mode="bilinear", align_corners=False, antialias=True)
    touched = F.interpolate(
        invalid, size=size, mode="bilinear", align_corners=False, antialias=True
    )
    out_valid = touched == 0  # [1, L, H, W]
    out_image = torch.where(out_valid, resized, torch.zeros((), dtype=resized.dtype))
    return out_image.reshape(*lead, *size), out_valid.reshape(*lead, *size)
