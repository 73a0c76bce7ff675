"""Multi-sensor and multi-date samples on the real BigEarthNet S1/S2 pairs and the real SSL4EO-S12
two-season location: pairing rules, co-registration, group shards through verify, stats, the
reader and the CLI."""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from real_batches import enmap_batch, paired_s1s2_batch, s2_batch, seasonal_batch

from eoforge.datasets.batching import batch_key, collate
from eoforge.datasets.errors import DataError
from eoforge.datasets.ingest import verify_shards
from eoforge.datasets.pairs import (
    build_paired_shards,
    discover_products,
    pair_products,
    read_group,
)
from eoforge.datasets.reader import ShardStream, to_sample
from eoforge.datasets.shards import (
    decode_group,
    encode_group,
    iter_tar_samples,
    list_shards,
    read_index,
)
from eoforge.datasets.stats import Normaliser, compute_stats
from eoforge.launch.cli import main

BEN = Path("bigearthnet_s1s2") / "v1_tiles_bigearthnet_encoder"
BEN_V2 = Path("bigearthnet_s1s2") / "v1_v2_tiles_rico_hdl"
SSL4EO = Path("ssl4eo_s12_s1s2")
PAIRED_S2 = "S2A_MSIL2A_20170617T113321_36_85"
PAIRED_S1 = "S1A_IW_GRDH_1SDV_20170617T064724_29UPU_36_85"
S2_JUNE, S2_AUGUST = (
    "20200604T054639_20200604T054831_T43RCP",
    "20200813T054639_20200813T054952_T43RCP",
)
S1_JUNE = "S1A_IW_GRDH_1SDV_20200607T010800_20200607T010825_032904_03CFBA_D457"
S1_SEPTEMBER = "S1A_IW_GRDH_1SDV_20200903T131212_20200903T131237_034195_03F8F5_AC1C"


def utc(*args: int) -> int:
    return int(datetime(*args, tzinfo=UTC).timestamp())


def rasterio_read(path: Path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read(1)


def build(src: Path, out: Path, **kwargs) -> tuple[dict, list[str]]:
    """build_paired_shards without a progress bar, returning (summary, warnings)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = build_paired_shards(src, out, "S2L2A", progress=False, **kwargs)
    return summary, [str(w.message) for w in caught]


def described(groups) -> list[tuple[str, ...]]:
    """Each group as (anchor product's folder name, partner folder names...)."""
    return [
        tuple(Path(p.name).name for sensor in sorted(g.members) for p in g.members[sensor])
        for g in groups
    ]


# ---------------------------------------------------------------------------------- pairing


def test_bigearthnet_pairs_follow_the_labels_json_and_the_window(sample_data):
    products = discover_products(sample_data / BEN, "bigearthnet", ["S2L2A", "S1GRD"])
    assert sorted(p.sensor for p in products) == ["S1GRD"] * 6 + ["S2L2A"] * 3
    # The S1 patch's json names its S2 partner; S2 at 11:33, S1 at 06:47 the same day (4.8 h).
    within_day = pair_products(products, "S2L2A", ["S1GRD"], time_window_days=1)
    paired = [g for g in within_day if set(g.members) == {"S2L2A", "S1GRD"}]
    assert len(paired) == 3 and len(within_day) == 6  # + 3 S1 patches whose S2 is not here
    (group,) = [g for g in paired if g.footprint == PAIRED_S2]
    assert Path(group.members["S1GRD"][0].name).name == PAIRED_S1
    lone = [g for g in within_day if g.anchor == "S1GRD"]
    assert all(set(g.members) == {"S1GRD"} for g in lone)
    assert sorted(g.footprint[-5:] for g in lone) == ["61_39", "61_40", "61_41"]

    two_hours = pair_products(products, "S2L2A", ["S1GRD"], time_window_days=2 / 24)
    assert not [g for g in two_hours if len(g.members) == 2]  # 4.8 h apart: outside the window
    assert len(two_hours) == 9  # 3 S2 lacking S1, 6 S1 lacking S2: nothing dropped
    no_lone = pair_products(products, "S2L2A", ["S1GRD"], time_window_days=1, lone_partners=False)
    assert [g.anchor for g in no_lone] == ["S2L2A"] * 3


def test_bigearthnet_v2_footprint_is_tile_row_col(sample_data):
    # v2 names: S2 ..._T33UUP_<row>_<col>, S1 ..._33UUP_<row>_<col>; the reference map is skipped.
    products = discover_products(sample_data / BEN_V2, "bigearthnet", ["S2L2A", "S1GRD"])
    footprints = {(p.sensor, p.footprint) for p in products}
    assert ("S2L2A", "33UUP_75_43") in footprints and ("S1GRD", "33UUP_89_36") in footprints
    assert not any("reference_map" in m.path.name for p in products for m in p.source.members)
    # None of these S1 and S2 patches cover the same footprint, so none is paired.
    groups = pair_products(products, "S2L2A", ["S1GRD"])
    assert all(len(g.members) == 1 for g in groups) and len(groups) == len(products)


def test_ssl4eo_window_picks_the_nearest_partner_within_it(sample_data):
    products = discover_products(sample_data / SSL4EO, "ssl4eo", ["S2L2A", "S1GRD"])
    assert {p.footprint for p in products} == {"0000200"}
    # S2 June 4 / August 13; S1 June 7 / September 3 (3 and 21 days after).
    week = described(pair_products(products, "S2L2A", ["S1GRD"], time_window_days=7))
    assert week == [(S1_JUNE, S2_JUNE), (S2_AUGUST,), (S1_SEPTEMBER,)]
    month = described(pair_products(products, "S2L2A", ["S1GRD"], time_window_days=30))
    assert month == [(S1_JUNE, S2_JUNE), (S1_SEPTEMBER, S2_AUGUST)]
    # No window: still one partner per product, the closest pairs first.
    assert described(pair_products(products, "S2L2A", ["S1GRD"])) == month


def test_series_orders_the_dates_of_one_location(sample_data):
    products = discover_products(sample_data / SSL4EO, "ssl4eo", ["S2L2A"])
    (group,) = pair_products(products, "S2L2A", series=True)
    assert [p.time for p in group.members["S2L2A"]] == [
        utc(2020, 6, 4, 5, 46, 39),
        utc(2020, 8, 13, 5, 46, 39),
    ]


def test_bad_pairing_options(sample_data):
    products = discover_products(sample_data / SSL4EO, "ssl4eo", ["S2L2A", "S1GRD"])
    with pytest.raises(DataError, match="drop --pair"):
        pair_products(products, "S2L2A", ["S1GRD"], series=True)
    with pytest.raises(DataError, match="time_window_days"):
        pair_products(products, "S2L2A", ["S1GRD"], time_window_days=-1)
    with pytest.raises(DataError, match="repeats"):
        pair_products(products, "S2L2A", ["S2L2A"])
    with pytest.raises(DataError, match="unknown layout 'sen12ms'"):
        discover_products(sample_data / SSL4EO, "sen12ms", ["S2L2A"])
    with pytest.raises(DataError, match="no ENMAP product .*ssl4eo layout holds only"):
        discover_products(sample_data / SSL4EO, "ssl4eo", ["S2L2A", "ENMAP"])


# ---------------------------------------------------------------------------------- co-registration


def test_grids_that_agree_give_rasterio_values(sample_data):
    products = discover_products(sample_data / BEN, "bigearthnet", ["S2L2A", "S1GRD"])
    (group,) = [
        g
        for g in pair_products(products, "S2L2A", ["S1GRD"], time_window_days=1)
        if g.footprint == PAIRED_S2 and len(g.members) == 2
    ]
    scene = read_group(group)
    s2, s1 = scene.scenes["S2L2A"][0], scene.scenes["S1GRD"][0]
    assert s2.image.shape == (12, 120, 120) and s1.image.shape == (2, 120, 120)
    assert s1.grid.same_as(s2.grid) and scene.grid.same_as(s2.grid)
    assert s2.gsd == 10.0
    s1_dir = sample_data / BEN / "s1-tiny" / PAIRED_S1
    for channel, pol in enumerate(["VV", "VH"]):
        np.testing.assert_array_equal(
            s1.image[channel], rasterio_read(s1_dir / f"{PAIRED_S1}_{pol}.tif")
        )
    b02 = rasterio_read(sample_data / BEN / "s2-tiny" / PAIRED_S2 / f"{PAIRED_S2}_B02.tif")
    np.testing.assert_array_equal(s2.image[1], b02)
    assert s1.valid.all()


def test_partner_on_another_grid_is_reprojected_with_its_own_valid_mask(sample_data):
    products = discover_products(sample_data / SSL4EO, "ssl4eo", ["S2L2A", "S1GRD"])
    group = pair_products(products, "S2L2A", ["S1GRD"], time_window_days=7)[0]
    scene = read_group(group)
    s2, s1 = scene.scenes["S2L2A"][0], scene.scenes["S1GRD"][0]
    assert s1.image.shape == (2, 264, 264) and s1.grid.same_as(s2.grid)
    assert s1.crs == s2.crs == "EPSG:4326"

    vv_path = sample_data / SSL4EO / "s1" / "0000200" / S1_JUNE / "VV.tif"
    with rasterio.open(vv_path) as ds:
        vv, src = ds.read(1), ds.transform
    t = s2.transform
    rows, cols = np.mgrid[0:264, 0:264]
    x = t.c + (cols + 0.5) * t.a  # pixel centres of the S2 grid
    y = t.f + (rows + 0.5) * t.e
    fc = (x - src.c) / src.a - 0.5  # in S1 pixel coordinates (pixel centres at integers)
    fr = (y - src.f) / src.e - 0.5
    outside = (fc < -0.5) | (fc > vv.shape[1] - 0.5) | (fr < -0.5) | (fr > vv.shape[0] - 0.5)
    assert outside.any()  # the S2 grid reaches past the S1 footprint at its east/south edges
    assert not s1.valid[:, outside].any()
    inside = (fc >= 1) & (fc <= vv.shape[1] - 2) & (fr >= 1) & (fr <= vv.shape[0] - 2)
    assert s1.valid[:, inside].all()
    # Bilinear: every value lies within its 2x2 S1 neighbourhood.
    r0, c0 = np.floor(fr[inside]).astype(int), np.floor(fc[inside]).astype(int)
    corners = np.stack([vv[r0 + i, c0 + j] for i in (0, 1) for j in (0, 1)])
    got = s1.image[0][inside]
    assert (got >= corners.min(0) - 1e-4).all() and (got <= corners.max(0) + 1e-4).all()
    # S2 itself is read as is.
    np.testing.assert_array_equal(
        s2.image[1], rasterio_read(sample_data / SSL4EO / "s2a" / "0000200" / S2_JUNE / "B2.tif")
    )


# ---------------------------------------------------------------------------------- shards


@pytest.fixture(scope="module")
def ben_shards(sample_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ben") / "s2s1"
    summary, messages = build(
        sample_data / BEN,
        out,
        pair=["S1GRD"],
        layout="bigearthnet",
        time_window_days=1,
        tile_size=64,
    )
    return out, summary, messages


def test_group_shards_round_trip(ben_shards, sample_data):
    out, summary, messages = ben_shards
    # 3 paired S2 patches and 3 S1 patches without their S2, 4 tiles (64 px of 120) each.
    assert summary["samples"] == 24 and summary["groups"] == 6
    assert summary["missing"] == {"S2L2A": 12, "S1GRD": 0}
    assert any("12 lack S2L2A" in m for m in messages)
    index = read_index(out)
    assert index["version"] == 2 and index["group"]["sensors"] == ["S2L2A", "S1GRD"]
    assert index["sensors"] == {"S2L2A": 12, "S1GRD": 24}

    raw = {r["__key__"]: r for url in list_shards(out) for r in iter_tar_samples(url)}
    key = f"s2-tiny_{PAIRED_S2}_r0_c0"
    views, meta = decode_group(raw[key])
    assert meta["sensors"]["S1GRD"]["present"] and meta["sensors"]["S2L2A"]["present"]
    assert meta["sensors"]["S1GRD"]["time"] == utc(2017, 6, 17, 6, 47, 24)
    s1_dir = sample_data / BEN / "s1-tiny" / PAIRED_S1
    vv = rasterio_read(s1_dir / f"{PAIRED_S1}_VV.tif")[:64, :64]
    np.testing.assert_array_equal(views["S1GRD"][0][0], vv.astype(np.float16))
    b02 = rasterio_read(sample_data / BEN / "s2-tiny" / PAIRED_S2 / f"{PAIRED_S2}_B02.tif")
    np.testing.assert_array_equal(views["S2L2A"][0][1], b02[:64, :64])
    # Edge tile: 56 of 64 columns inside the 120 px patch.
    edge, _ = decode_group(raw[f"s2-tiny_{PAIRED_S2}_r0_c64"])
    assert edge["S1GRD"][1][:, :, :56].all() and not edge["S1GRD"][1][:, :, 56:].any()


def test_verify_and_stats_cover_every_sensor(ben_shards, sample_data):
    out, summary, _ = ben_shards
    report = verify_shards(out)
    assert report["samples"] == 24 and report["missing"] == {"S2L2A": 12, "S1GRD": 0}
    assert report["sensors"] == {"S2L2A": 12, "S1GRD": 24}
    stats = json.loads(compute_stats(out, progress=False).read_text())["bands"]
    assert {"S2L2A:B02", "S1GRD:VV", "S1GRD:VH"} <= set(stats)
    vv = np.concatenate(
        [
            rasterio_read(p).ravel()
            for p in sorted((sample_data / BEN / "s1-tiny").glob("*/*_VV.tif"))
        ]
    )
    assert stats["S1GRD:VV"]["count"] == vv.size  # every S1 pixel once, lone patches included
    assert math.isclose(stats["S1GRD:VV"]["mean"], float(vv.mean()), rel_tol=1e-3)
    assert stats["S2L2A:B02"]["count"] == 3 * 120 * 120


def test_tampered_group_shard_fails_verify(ben_shards, tmp_path):
    out, _, _ = ben_shards
    index = read_index(out)
    index["missing"] = {"S2L2A": 0, "S1GRD": 0}
    broken = tmp_path / "broken"
    broken.mkdir()
    for row in index["shards"]:
        (broken / row["name"]).write_bytes((out / row["name"]).read_bytes())
    (broken / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match="lacking each sensor"):
        verify_shards(broken)


def test_reader_batches_both_sensors_and_keeps_missing_ones(ben_shards):
    out, _, _ = ben_shards
    normaliser = Normaliser.from_file(compute_stats(out, progress=False))
    stream = ShardStream(out, normaliser, batch_size=4, shuffle_buffer=8, seed=3)
    batches = list(stream.epoch_batches(0))
    assert len(batches) == 6  # 24 samples, one sensor set: nothing dropped
    absent = 0
    for batch in batches:
        s2, s1 = batch["S2L2A"], batch["S1GRD"]
        assert s2["image"].shape == (4, 12, 64, 64) and s1["image"].shape == (4, 2, 64, 64)
        assert s1["present"].all() and s2["present"].shape == (4,)
        missing = ~s2["present"]
        absent += int(missing.sum())
        assert (s2["image"][missing] == 0).all() and not s2["valid"][missing].any()
        assert s2["valid"][~missing].any(dim=(1, 2, 3)).all()
        assert s1["wavelengths"][0, 0].item() == pytest.approx(5.547e7, rel=1e-3)
    assert absent == 12


def test_missing_partner_within_window_is_kept(sample_data, tmp_path):
    out = tmp_path / "ssl4eo"
    summary, messages = build(
        sample_data / SSL4EO,
        out,
        pair=["S1GRD"],
        layout="ssl4eo",
        time_window_days=7,
        tile_size=132,
    )
    # 3 samples of 4 tiles: June S2+S1, August S2 without S1, September S1 without S2.
    assert summary["samples"] == 12 and summary["missing"] == {"S2L2A": 4, "S1GRD": 4}
    assert any("outside a band's footprint" in m for m in messages)  # S1 edge on the S2 grid
    normaliser = Normaliser.from_file(compute_stats(out, progress=False))
    samples = [
        to_sample(raw, normaliser) for url in list_shards(out) for raw in iter_tar_samples(url)
    ]
    august = [s for s in samples if S2_AUGUST in s["meta"]["id"]]
    assert len(august) == 4
    for sample in august:
        assert sample["S2L2A"]["present"].item() and not sample["S1GRD"]["present"].item()
        assert sample["S1GRD"]["image"].shape == (2, 132, 132)
        assert not sample["S1GRD"]["image"].any() and not sample["S1GRD"]["valid"].any()
        assert "time" not in sample["S1GRD"]
    batch = collate(august[:2] + [s for s in samples if S2_JUNE in s["meta"]["id"]][:2])
    assert batch["S1GRD"]["present"].tolist() == [False, False, True, True]
    assert batch["S2L2A"]["present"].all()
    assert batch_key(samples[0]) == batch_key(samples[-1])


def test_encode_group_names_the_sensor_at_fault():
    image, valid = np.zeros((2, 8, 8), np.float16), np.ones((2, 8, 8), bool)
    row = {"present": True, "shape": [2, 8, 8], "band_ids": ["S1GRD:VV", "S1GRD:VH"]}
    meta = {"id": "k", "sensors": {"S1GRD": row, "S2L2A": dict(row, present=False)}}
    encode_group("k", {"S1GRD": (image, valid)}, meta)
    with pytest.raises(DataError, match="sensor S2L2A has present=False"):
        encode_group("k", {"S1GRD": (image, valid), "S2L2A": (image, valid)}, meta)
    with pytest.raises(DataError, match="sensor S1GRD: image .* but metadata shape"):
        encode_group("k", {"S1GRD": (image[:, :4], valid[:, :4])}, meta)


# ---------------------------------------------------------------------------------- real batches


def test_real_batches_for_other_tests(sample_data, tmp_path):
    paired = paired_s1s2_batch(sample_data, tmp_path / "a")
    assert paired["S2L2A"]["image"].shape == (2, 12, 64, 64)
    assert paired["S1GRD"]["image"].shape == (2, 2, 64, 64)
    assert paired["S2L2A"]["present"].all() and paired["S1GRD"]["present"].all()
    ssl4eo = paired_s1s2_batch(sample_data, tmp_path / "b", source="ssl4eo", size=32)
    assert ssl4eo["S1GRD"]["image"].shape == (2, 2, 32, 32) and ssl4eo["S1GRD"]["valid"].any()

    seasons = seasonal_batch(sample_data, tmp_path / "c")
    view = seasons["S2L2A"]
    assert view["image"].shape == (1, 2, 12, 64, 64) and view["valid"].shape == view["image"].shape
    assert view["time"].tolist() == [[utc(2020, 6, 4, 5, 46, 39), utc(2020, 8, 13, 5, 46, 39)]]
    assert not torch.equal(view["image"][0, 0], view["image"][0, 1])  # two real seasons
    assert view["image"][view["valid"]].abs().max() < 50  # normalised

    s2 = s2_batch(sample_data, tmp_path / "d")
    assert s2["S2L2A"]["image"].shape == (2, 12, 64, 64) and "present" not in s2["S2L2A"]
    enmap = enmap_batch(sample_data, tmp_path / "e", size=32)
    assert enmap["ENMAP"]["image"].shape == (2, 224, 32, 32)
    assert not enmap["ENMAP"]["valid"].all()  # water-vapour bands are nodata


def test_quality_filters_apply_to_the_reference_product(sample_data, tmp_path):
    """A paired build drops the tiles that the reference (S2) product's own cloud layer flags,
    counts them, and keeps the partner's views of the tiles it keeps."""
    src = tmp_path / "ben"
    for sensor, product in (("s2-tiny", PAIRED_S2), ("s1-tiny", PAIRED_S1)):
        shutil.copytree(
            sample_data / BEN / sensor / product, src / sensor / product, copy_function=os.symlink
        )
    s2 = src / "s2-tiny" / PAIRED_S2
    with rasterio.open(next(s2.glob("*_B02.tif"))) as ds:
        profile = ds.profile | {"dtype": "uint8", "count": 1, "nodata": None}
        height = ds.height
    scl = np.full((height, profile["width"]), 4, dtype=np.uint8)  # 4: vegetation
    scl[: height // 2] = 9  # the top half: cloud, high probability
    with rasterio.open(s2 / f"{PAIRED_S2}_SCL.tif", "w", **profile) as ds:
        ds.write(scl, 1)
    out = tmp_path / "out"
    summary, _ = build(
        src, out, pair=["S1GRD"], layout="bigearthnet", time_window_days=1, tile_size=60,
        max_cloud_fraction=0.5,
    )  # fmt: skip
    quality = summary["quality"]
    assert quality["tiles_dropped"] == {"cloud": 2, "nodata": 0}
    assert quality["tiles_kept"] == summary["samples"] == 2
    assert quality["cloud_layers"] == {"SCL": 1}
    assert json.loads((out / "index.json").read_text())["quality"] == quality
    metas = [json.loads(raw["json"]) for url in list_shards(out) for raw in iter_tar_samples(url)]
    assert sorted(m["window"][:2] for m in metas) == [[60, 0], [60, 60]]
    assert all(m["sensors"]["S1GRD"]["present"] for m in metas)


# ---------------------------------------------------------------------------------- CLI


def test_cli_builds_verifies_and_describes_a_paired_folder(sample_data, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["data", "build", str(sample_data / BEN), str(out), "--sensor", "S2L2A"]
    paired = ["--pair", "S1GRD", "--layout", "bigearthnet", "--time-window-days", "1"]
    assert main([*args, *paired, "--tile-size", "120", "--drop-lone-partners"]) == 0
    summary = json.loads(capsys.readouterr().out.split("\ntiles:")[0])
    assert summary["samples"] == 3 and summary["missing"] == {"S2L2A": 0, "S1GRD": 0}
    assert main(["data", "verify", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["sensors"] == {"S2L2A": 3, "S1GRD": 3}

    assert main([*args, "--pair", "S1GRD"]) == 2
    assert "--layout go together" in capsys.readouterr().err
    assert main([*args, *paired, "--bands", "B02"]) == 2
    assert "single-sensor builds" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["data", "build", "--help"])
    assert "--pair S1GRD --layout ssl4eo --time-window-days" in capsys.readouterr().out
