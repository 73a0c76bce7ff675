"""Zarr (v3, v2) and NetCDF datacubes -> shards, built in the test from real Sentinel-2 patches.

The cube holds two dates on the grid of the real Hydro patch_0 (12-band S2 L2A, UTM): date 1 is
patch_0's pixels, date 2 is patch_1's (another real patch, laid on patch_0's grid so that the two
dates differ). Band coordinates use registry aliases (``B2``, ``B08A``), a block of date 1 holds
the cube's nodata value, and each format stores its CRS a different way.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr.storage

from eoforge.datasets.cubes import build_cube_shards, cube_scenes, open_cube
from eoforge.datasets.errors import DataError
from eoforge.datasets.geotiff import discover_scenes, read_scene
from eoforge.datasets.ingest import verify_shards
from eoforge.datasets.sensors import get_sensor
from eoforge.datasets.shards import decode_sample, iter_tar_samples, list_shards
from eoforge.launch.cli import main

HYDRO = "hydro_s2l2a_patches"
TILE = 128
CHUNK = (1, 12, 64, 64)  # [time, band, y, x]: a tile covers 2 x 2 chunks of one date
NODATA = 65535
NODATA_BLOCK = (slice(10, 20), slice(30, 45))  # rows, cols of date 1 set to NODATA in every band
DATES = pd.to_datetime(["2021-04-01T10:30:00", "2021-07-15T10:30:00"])
EPOCHS = [int(d.timestamp()) for d in DATES]  # unix seconds, UTC
# Registry aliases of the 12 S2 L2A bands, in canonical order.
ALIASES = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B08A", "B9", "B11", "B12"]
FORMATS = ["zarr3", "zarr2", "netcdf"]


def eoforge(capsys, *args) -> tuple[int, str]:
    """The CLI in this process (its start-up would dominate the file's run time): exit code and
    what it printed to stderr."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def source(sample_data):
    """The two real dates as the cube holds them: (pixels [2, 12, H, W] uint16, first scene)."""
    scenes = []
    for name in ("patch_0.tif", "patch_1.tif"):
        (found,) = discover_scenes(sample_data / HYDRO, "S2L2A", pattern=name)
        scenes.append(read_scene(found))
    pixels = np.stack([s.image for s in scenes])  # [2, 12, 256, 256]
    assert pixels.dtype == np.uint16 and pixels.shape == (2, 12, 256, 256)
    assert not (pixels == NODATA).any()  # the nodata block is the only nodata
    pixels[(0, slice(None), *NODATA_BLOCK)] = NODATA
    return pixels, scenes[0]


def write_cube(pixels, scene, path: Path, kind: str, band_names=ALIASES) -> Path:
    """The cube as xarray writes it: pixel-centre x/y coordinates, CRS per ``kind``."""
    t = scene.transform
    height, width = pixels.shape[-2:]
    coords = {
        "time": DATES,
        "band": np.array(band_names, dtype=object),
        "y": t.f + t.e * (np.arange(height) + 0.5),
        "x": t.c + t.a * (np.arange(width) + 0.5),
    }
    attrs = {"nodata": NODATA}
    dataset = xr.Dataset(coords=coords)
    if kind == "zarr3":  # a CF grid mapping variable with WKT, as rioxarray writes it
        dataset.coords["spatial_ref"] = ((), 0, {"crs_wkt": scene.grid.crs.to_wkt()})
        attrs["grid_mapping"] = "spatial_ref"
    elif kind == "zarr2":  # an EPSG number in the STAC projection extension's attribute
        attrs["proj:epsg"] = scene.grid.crs.to_epsg()
    else:  # an "EPSG:..." string on the dataset
        dataset.attrs["crs"] = scene.crs
    dataset["reflectance"] = (("time", "band", "y", "x"), pixels, attrs)
    if kind == "netcdf":
        encoding = {"reflectance": {"chunksizes": CHUNK}}
        dataset.to_netcdf(path, engine="h5netcdf", encoding=encoding)
    else:
        encoding = {"reflectance": {"chunks": CHUNK}}
        zarr_format = 3 if kind == "zarr3" else 2
        dataset.to_zarr(path, zarr_format=zarr_format, consolidated=False, encoding=encoding)
    return path


@pytest.fixture(scope="module", params=FORMATS)
def cube(request, source, tmp_path_factory):
    kind = request.param
    folder = tmp_path_factory.mktemp(kind)
    return kind, write_cube(*source, folder / ("s2.nc" if kind == "netcdf" else "s2.zarr"), kind)


def read_back(out: Path) -> dict[str, tuple[np.ndarray, np.ndarray, dict]]:
    return {
        raw["__key__"]: decode_sample(raw)
        for url in list_shards(out)
        for raw in iter_tar_samples(url)
    }


def check_shards(out: Path, source) -> None:
    """Every tile of both dates equals the cube's pixels, with its time, bands, grid and mask."""
    pixels, scene = source
    s2 = get_sensor("S2L2A")
    samples = read_back(out)
    assert len(samples) == 2 * 4  # 2 dates x 2 x 2 tiles of 128 on 256 x 256
    seen = set()
    for image, valid, meta in samples.values():
        t = EPOCHS.index(meta["time"])
        row, col, h, w = meta["window"]
        seen.add((t, row, col))
        expected = pixels[t, :, row : row + h, col : col + w]
        assert image.dtype == np.uint16 and np.array_equal(image, expected)
        assert np.array_equal(valid, expected != NODATA)
        assert meta["band_ids"] == [b.band_id for b in s2.bands]  # aliases resolved, in order
        assert meta["crs"] == scene.crs and meta["gsd"] == scene.gsd == 10.0
        assert meta["bounds"] == pytest.approx(list(scene.window_bounds(row, col, h, w)))
        assert meta["nodata"] == NODATA
    assert seen == {(t, r, c) for t in (0, 1) for r in (0, TILE) for c in (0, TILE)}
    assert verify_shards(out)["samples"] == 8


def test_cli_and_python_api_write_the_cube_pixels_times_and_bands(cube, source, tmp_path, capsys):
    kind, path = cube
    code, err = eoforge(
        capsys, "data", "build", path, tmp_path / "cli", "--sensor", "S2L2A", "--tile-size", TILE
    )
    assert code == 0, err
    assert json.loads((tmp_path / "cli" / "index.json").read_text())["samples"] == 8
    check_shards(tmp_path / "cli", source)

    summary = build_cube_shards(path, tmp_path / "api", "S2L2A", tile_size=TILE, progress=False)
    assert summary["scenes"] == 2 and summary["samples"] == 8 and summary["tiles_skipped"] == 0
    assert summary["invalid_pixels"] == 12 * 10 * 15 and summary["scenes_with_invalid"] == 1
    check_shards(tmp_path / "api", source)


def test_cube_is_opened_lazily_with_dask(cube):
    kind, path = cube
    opened = open_cube(path, "S2L2A")
    assert type(opened.data.data).__module__.startswith("dask")  # nothing read yet
    assert opened.data.data.chunksize == CHUNK
    assert opened.times == tuple(EPOCHS)


def test_zarr_chunks_are_read_only_where_a_tile_needs_them_and_once(source, tmp_path, monkeypatch):
    path = write_cube(*source, tmp_path / "s2.zarr", "zarr3")
    reads: list[str] = []
    original = zarr.storage.LocalStore.get

    async def counting_get(self, key, *args, **kwargs):
        if key.startswith("reflectance/c/"):  # data chunks, not metadata
            reads.append(key)
        return await original(self, key, *args, **kwargs)

    monkeypatch.setattr(zarr.storage.LocalStore, "get", counting_get)
    first = next(cube_scenes(open_cube(path, "S2L2A"), "s2"))
    assert reads == []  # opening and listing scenes reads no pixel
    first.image[:, 64:128, 0:64]
    assert reads == ["reflectance/c/0/0/1/0"]  # date 0, all bands, chunk row 1, col 0

    reads.clear()
    build_cube_shards(path, tmp_path / "out", "S2L2A", tile_size=TILE, progress=False)
    assert len(reads) == 2 * 4 * 4  # 2 dates x 4 x 4 chunks
    assert len(set(reads)) == len(reads)  # image and valid mask of a tile share one read


def test_a_subset_of_bands_in_the_requested_order(source, tmp_path):
    path = write_cube(*source, tmp_path / "s2.zarr", "zarr2")
    out = tmp_path / "out"
    build_cube_shards(path, out, "S2L2A", bands=["B8A", "B04"], tile_size=TILE, progress=False)
    image, _, meta = read_back(out)[next(iter(read_back(out)))]
    assert meta["band_ids"] == ["S2L2A:B8A", "S2L2A:B04"]
    row, col, h, w = meta["window"]
    t = EPOCHS.index(meta["time"])
    assert np.array_equal(image, source[0][t, [8, 3], row : row + h, col : col + w])


def test_unmatched_band_is_an_error_naming_band_and_cube(source, tmp_path, capsys):
    names = [*ALIASES[:-1], "SWIR3"]
    path = write_cube(*source, tmp_path / "bad.zarr", "zarr3", band_names=names)
    with pytest.raises(DataError, match=r"band 'SWIR3'.*not a band of S2L2A") as caught:
        build_cube_shards(path, tmp_path / "out", "S2L2A", progress=False)
    assert str(path) in str(caught.value)
    assert not (tmp_path / "out").exists()  # checked before anything is written
    code, err = eoforge(capsys, "data", "build", path, tmp_path / "cli", "--sensor", "S2L2A")
    assert code == 2 and err.startswith("eoforge: error:")
    assert "SWIR3" in err and str(path) in err


def test_cube_without_time_is_one_scene_without_a_time_stamp(source, tmp_path):
    pixels, scene = source
    dataset = xr.Dataset(
        {"reflectance": (("band", "y", "x"), pixels[1], {"crs": scene.crs})},
        coords={
            "band": np.array(ALIASES, dtype=object),
            "y": scene.transform.f + scene.transform.e * (np.arange(256) + 0.5),
            "x": scene.transform.c + scene.transform.a * (np.arange(256) + 0.5),
        },
    )
    dataset.to_zarr(tmp_path / "one.zarr", consolidated=False)
    summary = build_cube_shards(tmp_path / "one.zarr", tmp_path / "out", "S2L2A", progress=False)
    assert summary["scenes"] == 1 and summary["samples"] == 4
    for image, valid, meta in read_back(tmp_path / "out").values():
        row, col, h, w = meta["window"]
        assert meta["time"] is None and valid.all()
        assert np.array_equal(image, pixels[1, :, row : row + h, col : col + w])


def test_cube_options_that_do_not_apply_are_refused(source, tmp_path, capsys):
    path = write_cube(*source, tmp_path / "s2.zarr", "zarr3")
    code, err = eoforge(
        capsys, "data", "build", path, tmp_path / "out", "--sensor", "S2L2A", "--gsd", 20
    )
    assert code == 2 and "--gsd" in err and not (tmp_path / "out").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a wrong variable name is an error, not a warning
        with pytest.raises(DataError, match="no data variable 'bands'.*reflectance"):
            open_cube(path, "S2L2A", variable="bands")
