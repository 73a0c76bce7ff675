"""Synthetic demo scenes: real GeoTIFFs, deterministic, spatially structured, plausible spectra."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
import rasterio

from eoforge.datasets.geotiff import discover_scenes, read_scene
from eoforge.datasets.ingest import build_shards
from eoforge.datasets.sensors import get_sensor
from eoforge.datasets.synthetic import DEMO_SENSORS, write_demo_scenes


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    start = time.perf_counter()
    folders = write_demo_scenes(root)
    return folders, time.perf_counter() - start


def read_all(folder) -> dict[str, np.ndarray]:
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with rasterio.open(path) as ds:
                out[str(path.relative_to(folder))] = ds.read()
    return out


def lag1_correlation(image: np.ndarray) -> float:
    a, b = image[:, :-1].ravel().astype(float), image[:, 1:].ravel().astype(float)
    return float(np.corrcoef(a, b)[0, 1])


def test_default_demo_is_fast_and_has_three_sensors(demo):
    folders, seconds = demo
    assert seconds < 5.0
    assert tuple(folders) == DEMO_SENSORS
    assert all(f.is_dir() for f in folders.values())


def test_s2_scenes_are_per_band_files_at_native_resolutions(demo):
    folders, _ = demo
    s2 = get_sensor("S2L2A")
    scenes = sorted(p for p in folders["S2L2A"].iterdir() if p.is_dir())
    assert len(scenes) == 6
    files = sorted(scenes[0].glob("*.tif"))
    assert len(files) == 12
    for band in s2.bands:
        (path,) = [f for f in files if f.stem.endswith(f"_{band.name}")]
        with rasterio.open(path) as ds:
            assert ds.res == (band.gsd, band.gsd)
            assert ds.count == 1 and ds.dtypes[0] == "uint16" and ds.nodata == 0
            assert ds.crs.to_string() == "EPSG:32633"
            assert ds.width == int(np.ceil(64 * 10 / band.gsd))


def test_s1_and_enmap_files(demo):
    folders, _ = demo
    (vv,) = sorted(folders["S1GRD"].glob("*000/*_VV.tif"))
    with rasterio.open(vv) as ds:
        db = ds.read(1)
        assert ds.dtypes[0] == "float32" and ds.res == (10.0, 10.0) and ds.shape == (64, 64)
    assert -35 < np.median(db) < -3 and db.std() > 1.0  # sigma0 in dB with speckle
    (cube,) = sorted(folders["ENMAP"].glob("*000/*-SPECTRAL_IMAGE.TIF"))
    with rasterio.open(cube) as ds:
        data = ds.read()
        assert ds.count == 224 and ds.dtypes[0] == "int16" and ds.nodata == -32768
        assert ds.crs.to_string() == "EPSG:32618" and ds.res == (30.0, 30.0)
    assert (data[:, 0, 0] == -32768).all()  # the cut-off corner, in every band
    assert (data[:, 32, 32] > 0).all() and (data[:, 32, 32] < 10_000).all()


def test_same_seed_same_files_other_seed_differs(demo, tmp_path):
    folders, _ = demo
    again = write_demo_scenes(tmp_path / "a")
    other = write_demo_scenes(tmp_path / "b", seed=1)
    for sensor in DEMO_SENSORS:
        reference = read_all(folders[sensor])
        same = read_all(again[sensor])
        assert same.keys() == reference.keys()
        assert all(np.array_equal(same[k], reference[k]) for k in reference)
        different = read_all(other[sensor])
        assert not any(np.array_equal(different[k], reference[k]) for k in reference)


def test_spatial_structure_and_spectra(demo):
    folders, _ = demo
    (source,) = discover_scenes(folders["S2L2A"], "S2L2A")[:1]
    scene = read_scene(source)
    bands = {b.name: scene.image[i].astype(float) for i, b in enumerate(scene.bands)}
    ok = scene.valid.all(axis=0)
    red, nir, green = bands["B04"], bands["B08"], bands["B03"]
    ndvi = (nir - red) / (nir + red + 1e-9)
    ndwi = (green - nir) / (green + nir + 1e-9)
    assert (ndvi[ok] > 0.5).mean() > 0.1  # vegetation
    assert (ndwi[ok] > 0.3).mean() > 0.005  # water (the river)
    assert ((ndvi[ok] < 0.3) & (ndwi[ok] < 0)).mean() > 0.05  # bare soil
    assert 0.001 < (~ok).mean() < 0.1  # a small nodata patch (grown by the 60 m bands)
    assert lag1_correlation(np.where(ok, nir, np.median(nir))) > 0.7  # smooth fields...
    gradient = np.abs(np.diff(nir, axis=1))[ok[:, 1:] & ok[:, :-1]]
    assert (gradient > 1000).mean() > 0.003  # ...with sharp parcel edges
    (s1,) = discover_scenes(folders["S1GRD"], "S1GRD")[:1]
    vv = read_scene(s1).image[0]
    assert lag1_correlation(vv) > 0.2  # structure survives the speckle


def test_demo_scenes_ingest_through_the_resampling_path(demo, tmp_path):
    folders, _ = demo
    (source,) = discover_scenes(folders["S2L2A"], "S2L2A")[:1]
    scene = read_scene(source)  # 10 m grid from 10/20/60 m files
    assert scene.image.shape == (12, 64, 64) and scene.gsd == 10.0
    assert scene.time is not None
    b01 = scene.image[0].astype(float)[scene.valid[0]]
    assert b01.std() > 0 and scene.valid[0].mean() > 0.9
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for sensor, folder in folders.items():
            summary = build_shards(folder, tmp_path / sensor, sensor, tile_size=32, progress=False)
            assert summary["samples"] == 6 * 4, sensor
