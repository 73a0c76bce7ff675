"""Wavelength, GSD-aware (Scale-MAE) and temporal (SatMAE) sincos encodings."""

from __future__ import annotations

import datetime

import pytest
import torch

from eoforge.models.pos_embed import sincos_1d, sincos_2d
from eoforge.models.sincos import (
    calendar,
    sincos_2d_gsd,
    sincos_2d_temporal,
    sincos_wavelength,
    temporal_encoding,
)

LIKE = torch.zeros((), dtype=torch.float32)


def unix(*args: int) -> int:
    return int(datetime.datetime(*args, tzinfo=datetime.UTC).timestamp())


def test_sincos_wavelength_is_sincos_of_nanometres():
    wavelengths = torch.tensor([[442.7, 5.5e7], [1613.7, 2202.4]])  # [B, C]
    code = sincos_wavelength(wavelengths, 128)
    assert code.shape == (2, 2, 128) and code.dtype == torch.float32
    assert torch.allclose(code[1, 0], sincos_1d(torch.tensor([1613.7]), 128)[0].float())


def test_gsd_at_reference_is_plain_sincos_2d():
    code = sincos_2d_gsd(3, 5, 32, torch.tensor([10.0, 10.0]), 10.0, LIKE)
    assert code.shape == (2, 15, 32)
    assert torch.allclose(code[0], sincos_2d(3, 5, 32)) and torch.allclose(code[1], code[0])


def test_doubling_gsd_doubles_positions():
    # Patch (i, j) at twice the reference GSD sits where patch (2i, 2j) sits at the reference.
    doubled = sincos_2d_gsd(3, 4, 32, torch.tensor([20.0]), 10.0, LIKE)[0]  # [12, 32]
    fine = sincos_2d(6, 8, 32).reshape(6, 8, 32)
    assert torch.allclose(doubled.reshape(3, 4, 32), fine[::2, ::2], atol=1e-6)


def test_gsd_is_per_sample():
    code = sincos_2d_gsd(2, 2, 16, torch.tensor([5.0, 30.0]), 10.0, LIKE)
    assert torch.allclose(code[1], sincos_2d_gsd(2, 2, 16, 30.0, 10.0, LIKE)[0])
    assert not torch.allclose(code[0], code[1])


def test_calendar_matches_datetime():
    times = torch.randint(-(2**31), 2**32, (500,), generator=torch.Generator().manual_seed(0))
    times = torch.cat([times, torch.tensor([unix(2000, 2, 29, 23), unix(2100, 3, 1), -1])])
    year, month, hour = (part.tolist() for part in calendar(times))
    for t, y, m, h in zip(times.tolist(), year, month, hour, strict=True):
        expected = datetime.datetime(1970, 1, 1) + datetime.timedelta(seconds=t)
        assert (y, m, h) == (expected.year, expected.month, expected.hour), t


def _parts(code: torch.Tensor, dim: int = 96) -> tuple[torch.Tensor, ...]:
    third = dim // 3  # year | month | hour
    return code[..., :third], code[..., third : 2 * third], code[..., 2 * third :]


def test_temporal_encoding_separates_year_month_hour():
    base = unix(2020, 6, 15, 10)
    times = torch.tensor([base, unix(2021, 6, 15, 10), unix(2020, 7, 15, 10), base + 3600])
    year, month, hour = _parts(temporal_encoding(times, 96, LIKE))
    changed = [
        [not torch.allclose(part[i], part[0]) for part in (year, month, hour)] for i in (1, 2, 3)
    ]
    assert changed == [[True, False, False], [False, True, False], [False, False, True]]
    # The day within the month and the minutes within the hour are not encoded.
    next_day = temporal_encoding(torch.tensor([base + 86_400 + 59]), 96, LIKE)[0]
    assert torch.equal(next_day[32:], torch.cat([month[0], hour[0]]))


def test_month_and_hour_are_cyclic_year_is_not():
    months = torch.tensor([unix(2020, m, 1) for m in (12, 1, 2)])
    _, month, _ = _parts(temporal_encoding(months, 96, LIKE))
    assert torch.allclose((month[0] - month[1]).norm(), (month[1] - month[2]).norm(), atol=1e-5)
    hours = torch.tensor([unix(2020, 1, 1, h) for h in (23, 0, 1)])
    _, _, hour = _parts(temporal_encoding(hours, 96, LIKE))
    assert torch.allclose((hour[0] - hour[1]).norm(), (hour[1] - hour[2]).norm(), atol=1e-5)
    years = torch.tensor([unix(2000, 1, 1), unix(2012, 1, 1), unix(2024, 1, 1)])
    year, _, _ = _parts(temporal_encoding(years, 96, LIKE))
    assert (year[0] - year[1]).norm() > 0.5 and (year[0] - year[2]).norm() > 0.5


def test_temporal_encoding_split_for_odd_widths():
    code = temporal_encoding(torch.tensor([unix(2020, 1, 1)]), 68, LIKE)  # 22 + 22 + 24
    assert code.shape == (1, 68)


def test_sincos_2d_temporal_layout():
    times = torch.tensor([[unix(2019, 3, 1), unix(2019, 9, 1, 12)]])  # [B=1, T=2]
    code = sincos_2d_temporal(2, 3, 96, times, LIKE)
    assert code.shape == (1, 2 * 6, 96)
    spatial = sincos_2d(2, 3, 48)
    assert torch.allclose(code[0, :6, :48], spatial) and torch.allclose(code[0, 6:, :48], spatial)
    temporal = temporal_encoding(times[0], 48, LIKE)  # [T, 48]
    assert torch.allclose(code[0, 6:, 48:], temporal[1].expand(6, -1))
    assert sincos_2d_temporal(2, 3, 96, times[:, 0], LIKE).shape == (1, 6, 96)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_encodings_follow_like_dtype(dtype):
    like = torch.zeros((), dtype=dtype)
    times = torch.tensor([unix(2020, 1, 1)])
    assert sincos_2d_gsd(2, 2, 16, torch.tensor([10.0]), 10.0, like).dtype == dtype
    assert temporal_encoding(times, 96, like).dtype == dtype
    assert sincos_2d_temporal(2, 2, 96, times, like).dtype == dtype
    assert sincos_wavelength(torch.tensor([500.0]), 16, like).dtype == dtype
