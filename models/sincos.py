"""Sine-cosine encodings of wavelength, ground sampling distance and acquisition time (SPECS).

* ``sincos_wavelength``: DOFA's continuous wavelength code, a 1-D sincos of the centre
  wavelength in nm (DOFA writes it as micrometres * 1000, which is the same number).
* ``sincos_2d_gsd``: Scale-MAE's GSD-aware 2-D sincos; patch positions are scaled by
  ``gsd / reference_gsd``, so a patch covers the same ground distance in encoding units at
  every resolution.
* ``temporal_encoding`` / ``sincos_2d_temporal``: SatMAE's time code, sincos of the year, the
  month and the hour of acquisition, appended to the 2-D sincos.

Everything is computed in float64 and returned in the dtype and device of ``like``: under bf16
engines DeepSpeed casts parameters, never the tensors a forward creates.
"""

from __future__ import annotations

import math

import torch

from eoforge.models.pos_embed import sincos_1d

SECONDS_PER_DAY = 86_400
EPOCH_YEAR = 1970


def sincos_wavelength(
    wavelengths: torch.Tensor, dim: int, like: torch.Tensor | None = None
) -> torch.Tensor:
    """Sincos code of centre wavelengths in nm, any shape [...] -> [..., dim].

    Args:
        wavelengths: centre wavelengths in nm.
        dim: code width (even).
        like: tensor whose dtype and device the code takes; float32 on the wavelengths' device
            when None.
    """
    code = sincos_1d(wavelengths.reshape(-1), dim).reshape(*wavelengths.shape, dim)
    if like is None:
        return code.float()
    return code.to(device=like.device, dtype=like.dtype)


def sincos_2d_gsd(
    grid_h: int,
    grid_w: int,
    dim: int,
    gsd: torch.Tensor | float,
    reference_gsd: float,
    like: torch.Tensor,
) -> torch.Tensor:
    """Scale-MAE's GSD-aware 2-D sincos: [B, grid_h * grid_w, dim] for gsd [B] in metres.

    Row and column indices are multiplied by ``gsd / reference_gsd`` before the usual 2-D sincos
    (half the channels the row, half the column, rows major), so ``gsd == reference_gsd`` gives
    exactly ``pos_embed.sincos_2d``.

    Args:
        grid_h, grid_w: patch grid.
        dim: code width (multiple of 4).
        gsd: ground sampling distance per sample, [B] (a float means B = 1).
        reference_gsd: the GSD at which positions are the plain patch indices.
        like: tensor whose dtype and device the code takes.
    """
    if dim % 4:
        raise ValueError(f"embedding dim {dim} must be divisible by 4 for 2-D sincos")
    scale = torch.as_tensor(gsd, dtype=torch.float64, device=like.device).reshape(-1, 1)
    scale = scale / reference_gsd  # [B, 1]
    rows = torch.arange(grid_h, device=like.device).repeat_interleave(grid_w)  # [N]
    cols = torch.arange(grid_w, device=like.device).repeat(grid_h)  # [N]
    batch, n = scale.shape[0], grid_h * grid_w
    row_code = sincos_1d((scale * rows).reshape(-1), dim // 2).reshape(batch, n, -1)
    col_code = sincos_1d((scale * cols).reshape(-1), dim // 2).reshape(batch, n, -1)
    return torch.cat([row_code, col_code], dim=-1).to(like.dtype)  # [B, N, dim]


def calendar(time: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unix seconds (int64, any shape) -> (year, month 1-12, hour 0-23) in UTC, all int64.

    Integer arithmetic only (the proleptic Gregorian civil-from-days algorithm of H. Hinnant),
    so it runs batched on any device and is exact for any date.
    """
    time = time.to(torch.int64)
    days = torch.div(time, SECONDS_PER_DAY, rounding_mode="floor")
    hour = torch.div(time - days * SECONDS_PER_DAY, 3600, rounding_mode="floor")
    z = days + 719_468  # days since 0000-03-01: leap days fall at the end of a year
    era = torch.div(z, 146_097, rounding_mode="floor")  # 400-year cycles
    doe = z - era * 146_097  # day of era, [0, 146096]
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365  # year of era
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)  # day of the March-based year
    mp = (5 * doy + 2) // 153  # month, March = 0
    month = torch.where(mp < 10, mp + 3, mp - 9)
    year = yoe + era * 400 + (month <= 2).long()
    return year, month, hour


def sincos_periodic(values: torch.Tensor, period: float, dim: int) -> torch.Tensor:
    """Fourier code of a cyclic quantity [L] -> [L, dim]: harmonics k = 1..dim/2 of ``period``.

    Unlike ``sincos_1d`` it is exactly periodic, so December sits next to January and 23 h
    next to 0 h.
    """
    harmonics = torch.arange(1, dim // 2 + 1, dtype=torch.float64, device=values.device)
    angles = values.to(torch.float64)[:, None] * harmonics[None, :] * (2 * math.pi / period)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def temporal_encoding(time: torch.Tensor, dim: int, like: torch.Tensor) -> torch.Tensor:
    """SatMAE's time code: [sincos(year) ‖ sincos(month) ‖ sincos(hour)], time [B] -> [B, dim].

    The three parts are equal when ``dim`` is divisible by 6 (768 -> 256 each); otherwise
    month and hour get ``2 * (dim // 6)`` channels and the year the rest. The year is encoded
    as years since 1970 by the ordinary (non-periodic) sincos; month (0-11) and hour (0-23, UTC)
    are cyclic and use ``sincos_periodic`` with periods 12 and 24.

    Args:
        time: acquisition times as int64 unix seconds, [B] (or any shape [...] -> [..., dim]).
        dim: code width (even).
        like: tensor whose dtype and device the code takes.
    """
    if dim % 2 or dim < 6:
        raise ValueError(f"temporal encoding dim {dim} must be even and at least 6")
    cyclic = 2 * (dim // 6)
    year, month, hour = calendar(time.reshape(-1).to(like.device))
    code = torch.cat(
        [
            sincos_1d(year - EPOCH_YEAR, dim - 2 * cyclic),
            sincos_periodic(month - 1, 12, cyclic),
            sincos_periodic(hour, 24, cyclic),
        ],
        dim=1,
    )  # [B, dim]
    return code.reshape(*time.shape, dim).to(like.dtype)


def sincos_2d_temporal(
    grid_h: int, grid_w: int, dim: int, time: torch.Tensor, like: torch.Tensor
) -> torch.Tensor:
    """SatMAE's spatio-temporal code: [2-D sincos ‖ temporal_encoding] per frame and patch.

    Half the channels (rounded down to a multiple of 4) hold the 2-D sincos, the rest the time
    code, as SatMAE's 384 + 3 * 128 at D = 768.

    Args:
        grid_h, grid_w: patch grid.
        dim: code width.
        time: int64 unix seconds, [B] for single frames or [B, T] for a time series.
        like: tensor whose dtype and device the code takes.

    Returns:
        [B, N, dim] for time [B]; [B, T * N, dim] (frame major) for time [B, T].
    """
    spatial_dim = (dim // 2) // 4 * 4
    frames = time if time.dim() == 2 else time[:, None]  # [B, T]
    batch, steps = frames.shape
    n = grid_h * grid_w
    spatial = sincos_2d_gsd(grid_h, grid_w, spatial_dim, 1.0, 1.0, like)  # [1, N, Ds]
    temporal = temporal_encoding(frames, dim - spatial_dim, like)  # [B, T, Dt]
    code = torch.cat(
        [
            spatial[:, None].expand(batch, steps, n, -1),
            temporal[:, :, None].expand(-1, -1, n, -1),
        ],
        dim=-1,
    )  # [B, T, N, dim]
    return code.reshape(batch, steps * n, dim)
