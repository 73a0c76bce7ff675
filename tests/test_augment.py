"""Aligned augmentation and percentile clipping on real samples: BigEarthNet S1+S2 pairs and the
SSL4EO-S12 two-date Sentinel-2 series, read through shards and ShardStream."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from real_batches import paired_s1s2_batch, seasonal_batch

from eoforge.datasets.augment import AugmentConfig, augment_sample
from eoforge.datasets.errors import DataError
from eoforge.datasets.shards import decode_group, iter_tar_samples, list_shards
from eoforge.datasets.stats import Normaliser

SIZE = 64
# Crops of at most half the tile, resized back to the tile: every axis is upsampled, so an
# output pixel is the bilinear interpolation of the input at its source coordinate.
UPSAMPLING = AugmentConfig(crop_scale=(0.2, 0.5))


def unbatch(batch: dict) -> dict:
    """The first sample of a batch, in the sample contract."""
    sample = {"meta": {key: values[0] for key, values in batch["meta"].items()}}
    for sensor, view in batch.items():
        if sensor == "meta":
            continue
        sample[sensor] = {
            key: value if key == "band_ids" else value[0] for key, value in view.items()
        }
        sample[sensor]["gsd"] = float(view["gsd"][0])
    return sample


@pytest.fixture(scope="module")
def samples(sample_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("augment")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nodata reports of the SSL4EO scenes; not the point here
        pair = paired_s1s2_batch(sample_data, root, "bigearthnet", size=SIZE, batch_size=1)
        series = seasonal_batch(sample_data, root, size=SIZE)
    return {"pair": unbatch(pair), "series": unbatch(series), "root": root}


def with_coordinates(sample: dict) -> dict:
    """Each view (each date) gains two last channels: the row and column index of its pixel."""
    out = {"meta": sample["meta"]}
    rows, cols = torch.meshgrid(
        torch.arange(SIZE, dtype=torch.float32),
        torch.arange(SIZE, dtype=torch.float32),
        indexing="ij",
    )
    for sensor, view in sample.items():
        if sensor == "meta":
            continue
        lead = view["image"].shape[:-3]
        grid = torch.stack([rows, cols]).expand(*lead, 2, SIZE, SIZE)  # [(T,) 2, H, W]
        out[sensor] = {
            **view,
            "image": torch.cat([view["image"], grid], dim=-3),
            "valid": torch.cat([view["valid"], torch.ones_like(grid, dtype=torch.bool)], dim=-3),
        }
    return out


def undo_flips_and_rotation(x: torch.Tensor, record: dict) -> torch.Tensor:
    """Back to the resized crop's orientation (the transform applies flips, then rotation)."""
    x = torch.rot90(x, -record["rot90"], dims=(-2, -1))
    dims = [d for d, flipped in ((-2, record["vflip"]), (-1, record["hflip"])) if flipped]
    return x.flip(dims) if dims else x


def bilinear_at(image: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``image`` [..., H, W] sampled at fractional (rows, cols) [h, w] -> [..., h, w]."""
    r0, c0 = rows.floor().long(), cols.floor().long()
    r1, c1 = (r0 + 1).clamp(max=image.shape[-2] - 1), (c0 + 1).clamp(max=image.shape[-1] - 1)
    fr, fc = rows - r0, cols - c0
    top = image[..., r0, c0] * (1 - fc) + image[..., r0, c1] * fc
    bottom = image[..., r1, c0] * (1 - fc) + image[..., r1, c1] * fc
    return top * (1 - fr) + bottom * fr


def crop_grid(record: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Source (row, col) of every output pixel of an upsampling resized crop, [H, W] each
    (bilinear with pixel centres aligned; edge rows/columns clamp at the crop's edge)."""
    top, left, crop_h, crop_w = record["crop"]
    out_h, out_w = record["size"]
    rows = top + ((torch.arange(out_h) + 0.5) * crop_h / out_h - 0.5).clamp(0, crop_h - 1)
    cols = left + ((torch.arange(out_w) + 0.5) * crop_w / out_w - 0.5).clamp(0, crop_w - 1)
    return torch.meshgrid(rows, cols, indexing="ij")


@pytest.mark.parametrize("which", ["pair", "series"])
def test_one_transform_for_every_sensor_and_date(samples, which):
    sample = with_coordinates(samples[which])
    sensors = ("S2L2A", "S1GRD") if which == "pair" else ("S2L2A",)
    records = set()
    for seed in range(6):
        out = augment_sample(sample, torch.Generator().manual_seed(seed), UPSAMPLING)
        record = out["meta"]["augment"]
        records.add(json.dumps(record))
        assert record["size"] == [SIZE, SIZE] and max(record["crop"][2:]) < SIZE
        rows, cols = crop_grid(record)
        # Every sensor and every date carries one coordinate field: one transform for all.
        coords = out[sensors[0]]["image"][..., -2:, :, :]  # [(T,) 2, H, W]
        for sensor in sensors:
            assert torch.equal(out[sensor]["image"][..., -2:, :, :], coords)
        if which == "series":
            assert torch.equal(coords[0], coords[1])
        for sensor in sensors:
            view = out[sensor]
            assert view["image"].shape == sample[sensor]["image"].shape
            assert view["band_ids"] == sample[sensor]["band_ids"]
            image = undo_flips_and_rotation(view["image"], record)  # [(T,) C + 2, H, W]
            valid = undo_flips_and_rotation(view["valid"], record)
            torch.testing.assert_close(image[..., -2, :, :], rows.expand_as(image[..., -2, :, :]))
            torch.testing.assert_close(image[..., -1, :, :], cols.expand_as(image[..., -1, :, :]))
            # The real pixels moved with the coordinates: each valid output pixel is the input
            # sampled (bilinearly) at its source coordinate, for every sensor and date.
            expected = bilinear_at(sample[sensor]["image"][..., :-2, :, :], rows, cols)
            mask = valid[..., :-2, :, :]
            assert mask.float().mean() > 0.9
            torch.testing.assert_close(
                image[..., :-2, :, :][mask], expected[mask], atol=1e-4, rtol=1e-4
            )
            # Output pixels are smaller than the input's: the view's gsd follows.
            scale = (record["crop"][2] * record["crop"][3] / SIZE**2) ** 0.5
            assert view["gsd"] == pytest.approx(sample[sensor]["gsd"] * scale)
    assert len(records) == 6  # the draws differ between seeds


def test_fixed_generator_gives_a_fixed_transform(samples):
    sample = samples["pair"]
    before = {k: v["image"].clone() for k, v in sample.items() if k != "meta"}
    cfg = AugmentConfig(out_size=32)
    first = augment_sample(sample, torch.Generator().manual_seed(7), cfg)
    again = augment_sample(sample, torch.Generator().manual_seed(7), cfg)
    other = augment_sample(sample, torch.Generator().manual_seed(8), cfg)
    assert first["meta"] == again["meta"] and first["meta"] != other["meta"]
    for sensor in ("S2L2A", "S1GRD"):
        assert first[sensor]["image"].shape == (len(sample[sensor]["band_ids"]), 32, 32)
        assert torch.equal(first[sensor]["image"], again[sensor]["image"])
        assert torch.equal(first[sensor]["valid"], again[sensor]["valid"])
        assert torch.equal(sample[sensor]["image"], before[sensor])  # the input is untouched
    # meta keeps every field and only gains the record.
    assert {k: v for k, v in first["meta"].items() if k != "augment"} == sample["meta"]
    assert "augment" not in sample["meta"]
    assert augment_sample(sample, torch.Generator(), AugmentConfig(enabled=False)) is sample


def test_flips_and_rotations_move_valid_masks_exactly(samples):
    # No crop: flips and rotations are exact permutations of pixels and of the valid mask.
    series = samples["series"]
    # An asymmetric invalid block on the second date only, so that a wrong flip, rotation or
    # date order would show.
    valid = series["S2L2A"]["valid"].clone()  # [T, C, H, W]
    valid[1, :, 0:10, 5:20] = False
    image = torch.where(valid, series["S2L2A"]["image"], torch.zeros(()))
    view = {**series["S2L2A"], "image": image, "valid": valid}
    sample = {**series, "S2L2A": view}
    cfg = AugmentConfig(crop=False, hflip=1.0, vflip=0.0)
    for seed in range(4):
        out = augment_sample(sample, torch.Generator().manual_seed(seed), cfg)
        record = out["meta"]["augment"]
        assert record["crop"] == [0, 0, SIZE, SIZE] and record["hflip"]
        for key in ("image", "valid"):
            expected = torch.rot90(view[key].flip(-1), record["rot90"], dims=(-2, -1))
            assert torch.equal(out["S2L2A"][key], expected)
        assert out["S2L2A"]["gsd"] == view["gsd"]


def test_resampling_never_mixes_invalid_pixels_into_valid_ones(samples):
    sample = samples["pair"]
    s1 = sample["S1GRD"]
    # A block of S1 pixels becomes invalid and holds garbage that must never reach a valid pixel.
    valid = s1["valid"].clone()
    valid[:, 20:36, 24:40] = False
    image = torch.where(valid, s1["image"], torch.tensor(1e6))
    damaged = {**sample, "S1GRD": {**s1, "image": image, "valid": valid}}
    coords = with_coordinates(damaged)
    low = s1["image"].amin(dim=(-2, -1))[:, None, None]
    high = s1["image"].amax(dim=(-2, -1))[:, None, None]
    for seed in range(8):
        out = augment_sample(coords, torch.Generator().manual_seed(seed), AugmentConfig())
        view = out["S1GRD"]
        image, mask = view["image"][:2], view["valid"][:2]  # the real VV, VH channels
        rows, cols = view["image"][-2], view["image"][-1]  # source coordinate per output pixel
        inside = (rows > 19) & (rows < 36) & (cols > 23) & (cols < 40)
        # Valid outputs are convex combinations of valid inputs only; invalid outputs are 0.
        assert ((image >= low - 1e-4) & (image <= high + 1e-4))[mask].all()
        assert (image[~mask] == 0).all()
        assert not (mask & inside).any()  # the block stays invalid
        far = (rows < 18) | (rows > 37) | (cols < 22) | (cols > 41)
        assert mask[:, far].all()  # pixels whose sources are far from it stay valid
        assert out["S2L2A"]["valid"].all()  # the all-valid S2 view stays all valid


def test_views_on_different_grids_are_refused(samples):
    sample = samples["pair"]
    s1 = sample["S1GRD"]
    coarse = {**s1, "image": s1["image"][:, ::2, ::2], "valid": s1["valid"][:, ::2, ::2]}
    with pytest.raises(DataError, match="different grids") as error:
        augment_sample({**sample, "S1GRD": coarse}, torch.Generator(), AugmentConfig())
    assert "'S1GRD': (32, 32)" in str(error.value) and "'S2L2A': (64, 64)" in str(error.value)
    broken = {**s1, "valid": s1["valid"][:1]}
    with pytest.raises(DataError, match="view S1GRD"):
        augment_sample({**sample, "S1GRD": broken}, torch.Generator(), AugmentConfig())


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("crop_scale", (0.0, 1.0)),
        ("crop_scale", (0.5, 1.5)),
        ("crop_ratio", (2.0, 1.0)),
        ("hflip", 1.5),
        ("vflip", -0.1),
        ("out_size", (0, 8)),
    ],
)
def test_config_rejects_bad_options(option, value):
    with pytest.raises(ValueError, match=option):
        AugmentConfig(**{option: value})


def test_percentile_clipping_bounds_values_per_sensor(samples):
    folder = samples["root"] / "s2s1_bigearthnet"
    stats = json.loads((folder / "stats.json").read_text())
    clipped = Normaliser(stats)
    unclipped = Normaliser(stats, clip=False)
    beyond = 0
    for url in list_shards(folder):
        for raw in iter_tar_samples(url):
            arrays, meta = decode_group(raw)
            for sensor, (image, valid) in arrays.items():
                band_ids = meta["sensors"][sensor]["band_ids"]
                on, off = clipped(image, valid, band_ids), unclipped(image, valid, band_ids)
                for c, band_id in enumerate(band_ids):
                    # Each sensor's bands use their own statistics (band ids name the sensor).
                    row = stats["bands"][band_id]
                    assert band_id.startswith(sensor + ":")
                    low = -row["norm_mean"] / row["norm_std"]  # normalised p1
                    high = (1 - row["norm_mean"]) / row["norm_std"]  # normalised p99
                    x, v = image[c].astype(np.float64), valid[c]
                    assert on[c][v].min() >= low - 1e-5 and on[c][v].max() <= high + 1e-5
                    inside = v & (x >= row["p1"]) & (x <= row["p99"])
                    np.testing.assert_allclose(on[c][inside], off[c][inside], atol=1e-5)
                    manual = ((x - row["p1"]) / (row["p99"] - row["p1"]) - row["norm_mean"]) / row[
                        "norm_std"
                    ]
                    np.testing.assert_allclose(off[c][v], manual[v], rtol=1e-4, atol=1e-4)
                    beyond += int(((off[c] < low - 1e-3) | (off[c] > high + 1e-3))[v].sum())
                    assert (on[c][~v] == 0).all() and (off[c][~v] == 0).all()
    assert beyond > 0  # without clipping the tails extend past the normalised p1/p99


def test_a_run_config_turns_clipping_off(samples):
    from eoforge.pretrain.config import DataConfig
    from eoforge.pretrain.data import build_stream
    from eoforge.pretrain.export import band_card

    folder = samples["root"] / "s2s1_bigearthnet"
    for clip in (True, False):
        cfg = DataConfig(shards=[str(folder)], batch_size=1, clip_percentiles=clip)
        assert build_stream(cfg, [folder], seed=0).normaliser.clip is clip
        _, normalisation, _, _ = band_card([folder], clip=clip)  # what the release card records
        assert {row["clip"] for row in normalisation.values()} == {clip}
    assert DataConfig().clip_percentiles  # the SPECS T1 preprocessing stays the default
