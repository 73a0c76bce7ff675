"""Property-based fuzzing of the readers: GeoTIFF ingest, Zarr/NetCDF cubes and the shard format.

Hypothesis draws small inputs (band counts, dtypes, shapes, nodata values, grids, band names,
chunkings, corrupted or truncated shards) and each property checks the reader against a model
of its documented behaviour: what was written is read back (pixels, valid mask, band ids), or
the reader raises ``DataError``, the data layer's documented error, for the reason the model
predicts. Any other exception fails the property, and the timeouts turn a hang into a failure.
Examples are derandomised so CI is reproducible; the ``@example`` rows are inputs that once
crashed or hung a reader.
"""

from __future__ import annotations

import io
import json
import math
import re
import tarfile
import tempfile
import warnings
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import rasterio
import webdataset as wds
import xarray as xr
from affine import Affine
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from rasterio.crs import CRS
from rasterio.warp import transform_bounds
from test_geotiff_ingest import read_back

from eoforge.datasets.cubes import build_cube_shards
from eoforge.datasets.errors import DataError
from eoforge.datasets.ingest import build_shards, verify_shards
from eoforge.datasets.sensors import get_sensor
from eoforge.datasets.shards import (
    FORMAT,
    STORED_DTYPES,
    decode_group,
    decode_sample,
    encode_group,
    encode_sample,
    iter_tar_samples,
    read_index,
    sample_views,
)


def fuzz(max_examples: int) -> settings:
    """Reproducible settings: the same examples on every run, no example database written."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@contextmanager
def quiet():
    """Readers warn about nodata and skipped scenes; the properties check the results instead."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


FLOAT16_MAX = float(np.finfo(np.float16).max)
STORED_INTEGERS = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.int16))
TIME = int(datetime(2020, 6, 15, tzinfo=UTC).timestamp())  # the stamp in every scene's name


def pixels(rng: np.random.Generator, dtype: str, shape, values: str, specials: bool):
    """Random pixels: ``small`` values repeat (and collide with nodata values), ``constant``
    ones are all the same (all nodata, with a nodata value present in the data), ``full`` span
    the integer range or a wide float range, ``huge`` floats exceed float16; ``specials`` puts
    NaN and +-Inf into float data."""
    if "complex" in dtype:  # GDAL's CInt16 ("complex_int16") has no numpy dtype: write complex64
        return (rng.integers(-9, 9, shape) + 1j * rng.integers(-9, 9, shape)).astype(np.complex64)
    dtype = np.dtype(dtype)
    if values == "constant":
        return np.full(shape, rng.integers(0, 3), dtype=dtype)
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        lo, hi = (max(info.min, -2), 3) if values == "small" else (info.min, info.max)
        return rng.integers(lo, hi, shape, endpoint=True, dtype=dtype)
    scale = {"small": 2.0, "full": 3000.0, "huge": 1e6}[values]
    data = rng.normal(size=shape) * scale
    data = (np.round(data) if values == "small" else data).astype(dtype)
    if specials:
        data[rng.random(shape) < 0.1] = np.nan
        data[rng.random(shape) < 0.05] = np.inf
        data[rng.random(shape) < 0.05] = -np.inf
    return data


def present_value(rng: np.random.Generator, data: np.ndarray) -> float | None:
    """A finite value that occurs in ``data`` (the nodata that hides real pixels), or None."""
    finite = data[np.isfinite(data)]
    return None if finite.size == 0 else finite[rng.integers(finite.size)].item()


def is_valid(data: np.ndarray, nodata: float | None) -> np.ndarray:
    """The documented valid mask: finite and not the nodata value."""
    ok = np.isfinite(data) if data.dtype.kind == "f" else np.ones(data.shape, dtype=bool)
    if nodata is not None and not math.isnan(nodata):
        ok &= data != nodata
    return ok


def tile_windows(height: int, width: int, tile: int) -> list[tuple[int, int]]:
    return [(r, c) for r in range(0, height, tile) for c in range(0, width, tile)]


def padded(array: np.ndarray, row: int, col: int, tile: int, fill) -> np.ndarray:
    """The ``tile`` x ``tile`` window of [C, H, W] ``array`` at (row, col); ``fill`` past the edge."""
    out = np.full((array.shape[0], tile, tile), fill, dtype=array.dtype)
    part = array[:, row : row + tile, col : col + tile]
    out[:, : part.shape[1], : part.shape[2]] = part
    return out


def assert_tiles(samples: dict, expected: dict, stored: str, fill) -> None:
    """Compare decoded tiles with the model's ``(values, valid)`` per window.

    ``stored`` is ``"integer"`` (exact values, invalid pixels hold ``fill``) or ``"float16"``
    (values as float16, invalid pixels NaN); an entry of ``expected`` may leave the values or
    the mask of a channel as None where the model cannot predict them (resampled across CRSs).
    """
    assert sorted(samples) == sorted(expected), (sorted(samples), sorted(expected))
    for window, (image, valid) in samples.items():
        values, masks = expected[window]
        want_valid = np.stack([valid[i] if m is None else m for i, m in enumerate(masks)])
        np.testing.assert_array_equal(valid, want_valid, err_msg=f"valid mask of tile {window}")
        for i, channel in enumerate(values):
            if channel is None:
                continue
            got = image[i][valid[i]]
            if stored == "integer":
                np.testing.assert_array_equal(got, channel[valid[i]], err_msg=f"tile {window}")
            else:
                want = channel[valid[i]].astype(np.float32).astype(np.float16)
                np.testing.assert_array_equal(got, want, err_msg=f"tile {window}")
        if stored == "integer":
            assert (image[~valid] == fill).all(), f"tile {window}: invalid pixels are not {fill}"
        else:
            assert np.isnan(image[~valid]).all(), f"tile {window}: invalid pixels are not NaN"


# ---------------------------------------------------------------------------------------------
# GeoTIFF folders through ``build_shards`` (what ``eoforge data build`` runs)

BASE_CRS, ODD_CRS = "EPSG:32633", "EPSG:32632"
X0, Y0, RES = 500_000.0, 5_000_000.0, 10.0
BASE_TRANSFORM = Affine(RES, 0.0, X0, 0.0, -RES, Y0)
TIFF_SENSORS = ["S2L2A", "S1GRD", "LANDSAT89", "RGB", "ENMAP"]
TIFF_DTYPES = ["uint8", "uint16", "int16", "int8", "int32", "float32", "float64"]
COMPLEX_DTYPES = ["complex64", "complex_int16"]  # SAR SLC products: refused, not cast


def tiff_case(**changes) -> dict:
    """A case as ``tiff_cases`` draws it, for the ``@example`` rows: 3 uint16 S2 bands, 9 x 7."""
    case = {
        "sensor": "S2L2A",
        "layout": "per-band",
        "bands": ["B04", "B03", "B02"],
        "height": 9,
        "width": 7,
        "tile": 4,
        "min_valid": 0.0,
        "nodata": "present",
        "values": "small",
        "specials": False,
        "seed": 1,
        "naming": "bands",
        "mismatch": "none",
        "odd": None,
        "dtypes": ["uint16"] * 3,
        "odd_height": 5,
        "odd_width": 6,
        "shift": (2, -3),
    }
    case.update(changes)
    return case


@st.composite
def tiff_cases(draw) -> dict:
    """One scene: a folder of single-band files or one multi-band file, its grid and pixels."""
    sensor = get_sensor(draw(st.sampled_from(TIFF_SENSORS)))
    layout = draw(st.sampled_from(["per-band", "multi-band"]))
    many = sensor.name == "ENMAP" and layout == "multi-band" and draw(st.booleans())
    if layout == "per-band":
        # Without --bands an optical scene must hold every band; a SAR scene holds what it has.
        naming = draw(st.sampled_from(["bands", "none"]))
    else:
        # How a multi-band file's bands are named: its descriptions, --bands in file order, or
        # neither (then only a file holding every band of the sensor is readable: canonical order).
        naming = "none" if many else draw(st.sampled_from(["describe", "bands", "none"]))
    if many:  # a full 224-band product, cheap at this size
        bands = list(sensor.bands)
    else:
        count = draw(st.integers(1 if layout == "per-band" else 2, min(12, len(sensor.bands))))
        bands = draw(st.permutations(sensor.bands))[:count]
        if layout == "multi-band" and naming == "none" and count == len(sensor.bands):
            bands = list(sensor.bands)  # the order the reader assumes
    side = 12 if many else 40
    case = {
        "sensor": sensor.name,
        "layout": layout,
        "bands": [b.name for b in bands],
        "height": draw(st.integers(1, side)),
        "width": draw(st.integers(1, side)),
        "tile": draw(st.sampled_from([4, 8, 16, 32])),
        "min_valid": draw(st.sampled_from([0.0, 0.0, 0.5, 1.0])),
        "nodata": draw(st.sampled_from(["none", "zero", "present", "nan"])),
        "values": draw(st.sampled_from(["small", "constant", "full", "full", "huge"])),
        "specials": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**32 - 1)),
        "naming": naming,
        "mismatch": "none",
        "odd": None,
    }
    files = len(bands) if layout == "per-band" else 1
    if files > 1 and draw(st.booleans()):  # mixed dtypes: read as float
        case["dtypes"] = [draw(st.sampled_from(TIFF_DTYPES)) for _ in range(files)]
    else:
        dtype = "int16" if many else draw(st.sampled_from(TIFF_DTYPES + COMPLEX_DTYPES))
        case["dtypes"] = [dtype] * files
    if files > 1 and not set(case["dtypes"]) & set(COMPLEX_DTYPES):
        # One band file (not the first, whose grid is the scene's) on another grid.
        case["mismatch"] = draw(st.sampled_from(["none", "none", "shift", "crs", "no-crs"]))
        # The scene's grid is its first band's (in output order): another band is the odd one.
        order = output_order(case)
        case["odd"] = None if case["mismatch"] == "none" else draw(st.sampled_from(order[1:]))
        case["odd_height"] = draw(st.integers(1, 40))
        case["odd_width"] = draw(st.integers(1, 40))
        case["shift"] = (draw(st.integers(-42, 42)), draw(st.integers(-42, 42)))
        if case["mismatch"] == "crs":
            case["min_valid"] = 0.0  # which resampled pixels are valid is not predicted
    return case


def output_order(case: dict) -> list[str]:
    """The scene's bands as the reader orders them: as named with --bands or descriptions,
    else in the sensor's canonical order."""
    if case["naming"] in ("bands", "describe"):
        return case["bands"]
    return [b.name for b in get_sensor(case["sensor"]).bands if b.name in case["bands"]]


def write_tiff(
    path: Path, data: np.ndarray, dtype: str, crs, transform, nodata, descriptions=None
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    count, height, width = data.shape
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        count=count,
        height=height,
        width=width,
        dtype=dtype,
        crs=crs,
        transform=transform,
        nodata=nodata,
    ) as ds:
        ds.write(data)
        if descriptions:
            ds.descriptions = tuple(descriptions)
    return path


def file_nodata(case: dict, rng: np.random.Generator, data: np.ndarray) -> float | None:
    kind = case["nodata"]
    if data.dtype.kind == "c":
        return None  # GDAL stores no complex nodata
    if kind == "zero":
        return 0
    if kind == "present":
        return present_value(rng, data)
    if kind == "nan" and data.dtype.kind == "f":
        return float("nan")
    return None  # NaN for an integer file: GDAL cannot store it


def odd_grid(case: dict) -> tuple[str | None, Affine, int, int]:
    """CRS, transform and size of the band file on another grid than the scene's first band."""
    height, width = case["odd_height"], case["odd_width"]
    if case["mismatch"] == "shift":  # same CRS and pixel size, shifted by whole pixels
        dy, dx = case["shift"]
        return BASE_CRS, Affine(RES, 0.0, X0 + dx * RES, 0.0, -RES, Y0 - dy * RES), height, width
    if case["mismatch"] == "no-crs":
        return None, BASE_TRANSFORM, case["height"], case["width"]
    # Another UTM zone at a coarser 20 m, covering the whole scene with a margin of 3 pixels.
    bounds = (X0, Y0 - case["height"] * RES, X0 + case["width"] * RES, Y0)
    left, bottom, right, top = transform_bounds(BASE_CRS, ODD_CRS, *bounds, densify_pts=21)
    step, margin = 2 * RES, 6 * RES
    width = math.ceil((right - left + 2 * margin) / step)
    height = math.ceil((top - bottom + 2 * margin) / step)
    return ODD_CRS, Affine(step, 0.0, left - margin, 0.0, -step, top + margin), height, width


def write_scene(case: dict, src: Path) -> list[dict]:
    """Write the case's files; one record per band (file order): its file, data and nodata."""
    rng = np.random.default_rng(case["seed"])
    shape = (case["height"], case["width"])
    records = []
    if case["layout"] == "multi-band":
        dtype = case["dtypes"][0]
        data = pixels(rng, dtype, (len(case["bands"]), *shape), case["values"], case["specials"])
        nodata = file_nodata(case, rng, data)
        describe = case["bands"] if case["naming"] == "describe" else None
        path = src / "scene_20200615.tif"
        write_tiff(path, data, dtype, BASE_CRS, BASE_TRANSFORM, nodata, describe)
        for i, name in enumerate(case["bands"]):
            records.append(
                {"band": name, "path": path, "data": data[i], "nodata": nodata, "odd": False}
            )
        return records
    for name, dtype in zip(case["bands"], case["dtypes"], strict=True):
        crs, transform, height, width = BASE_CRS, BASE_TRANSFORM, *shape
        if name == case["odd"]:
            crs, transform, height, width = odd_grid(case)
        data = pixels(rng, dtype, (1, height, width), case["values"], case["specials"])
        nodata = file_nodata(case, rng, data)
        path = src / "scene_20200615" / f"x_{name}.tif"
        write_tiff(path, data, dtype, crs, transform, nodata)
        records.append(
            {
                "band": name,
                "path": path,
                "data": data[0],
                "nodata": nodata,
                "odd": name == case["odd"],
            }
        )
    return records


def data_error_of(build, *args, **kwargs) -> DataError | None:
    """The DataError ``build(*args, **kwargs)`` raised (its warnings silenced), or None."""
    try:
        with quiet():
            build(*args, **kwargs)
    except DataError as exc:
        return exc
    return None


def assert_refused(outcome: DataError | None, error: str, where: str = "") -> None:
    """``outcome`` is a DataError matching the regex ``error`` and naming ``where``."""
    assert outcome is not None, f"no DataError matching {error!r}"
    assert re.search(error, str(outcome)) and where in str(outcome), (error, str(outcome))


def expected_error(case: dict, records: list[dict]) -> str | None:
    """What the build must refuse before reading pixels (a regex the DataError must match)."""
    sensor = get_sensor(case["sensor"])
    names = case["bands"]
    if case["layout"] == "multi-band":
        if case["naming"] == "none" and len(names) != len(sensor.bands):
            return f"has {len(names)} bands, which matches neither"
    elif case["naming"] == "none" and sensor.family != "sar" and len(names) < len(sensor.bands):
        return "has no file for"
    complex_files = [r["path"].name for r in records if r["data"].dtype.kind == "c"]
    if complex_files:
        return f"({'|'.join(map(re.escape, complex_files))}).*complex"
    if case["mismatch"] == "no-crs":
        odd = next(r for r in records if r["odd"])
        return f"{re.escape(odd['path'].name)}.*has no CRS"
    return None


def model_scene(case: dict, records: list[dict]) -> dict:
    """The scene on the first band's grid as the module docstring of ``geotiff`` describes it:
    per band (in output order) its values and valid mask, None where not predictable."""
    sensor = get_sensor(case["sensor"])
    order = output_order(case)
    by_band = {r["band"]: r for r in records}
    height, width = case["height"], case["width"]
    values, masks, ranges = [], [], []
    for name in order:
        record = by_band[name]
        nodata = record["nodata"] if record["nodata"] is not None else sensor.nodata
        data, ok = record["data"], is_valid(record["data"], nodata)
        if case["mismatch"] == "shift" and record["odd"]:
            dy, dx = case["shift"]
            moved = np.zeros((height, width), dtype=data.dtype)
            moved_ok = np.zeros((height, width), dtype=bool)
            rows = slice(max(dy, 0), min(height, dy + data.shape[0]))
            cols = slice(max(dx, 0), min(width, dx + data.shape[1]))
            source = (
                slice(rows.start - dy, rows.stop - dy),
                slice(cols.start - dx, cols.stop - dx),
            )
            if rows.start < rows.stop and cols.start < cols.stop:
                moved[rows, cols], moved_ok[rows, cols] = data[source], ok[source]
            data, ok = moved, moved_ok
        elif case["mismatch"] == "crs" and record["odd"]:
            # Bilinear resampling: values inside the range of the valid source values, and
            # every pixel valid where the whole source is (it covers the scene with a margin).
            inside = data[ok].astype(np.float32)
            ranges.append((inside.min(), inside.max()) if inside.size else None)
            values.append(None)
            masks.append(np.ones((height, width), dtype=bool) if ok.all() else None)
            continue
        values.append(data)
        masks.append(ok)
    dtypes = {np.dtype(d) for d in case["dtypes"]}
    integer = len(dtypes) == 1 and next(iter(dtypes)) in STORED_INTEGERS
    first = by_band[order[0]]
    nodata = first["nodata"] if first["nodata"] is not None else sensor.nodata
    fill = None
    if integer:
        info = np.iinfo(next(iter(dtypes)))
        fits = nodata is not None and not math.isnan(nodata) and info.min <= nodata <= info.max
        fill = int(nodata) if fits else 0
    return {
        "order": order,
        "values": values,
        "masks": masks,
        "ranges": ranges,
        "integer": integer,
        "fill": fill,
    }


def expected_tiles(model: dict, case: dict) -> dict | None:
    """Kept tiles ``{(row, col): (values per band, mask per band)}`` (``ingest`` module
    docstring), or None where an unpredictable mask decides which tiles are kept."""
    masks, values, tile = model["masks"], model["values"], case["tile"]
    known = [m for m in masks if m is not None]
    if not any(m.any() for m in known):
        # A scene without a valid pixel is skipped, unless an unpredictable band has some.
        return {} if len(known) == len(masks) else None
    if case["min_valid"] > 0.0 and len(known) < len(masks):
        return None
    kept = {}
    for row, col in tile_windows(case["height"], case["width"], tile):
        tile_masks = [
            None if m is None else padded(m[None], row, col, tile, False)[0] for m in masks
        ]
        if case["min_valid"] > 0.0:
            fraction = sum(int(m.sum()) for m in tile_masks) / (len(masks) * tile * tile)
            if fraction < case["min_valid"]:
                continue
        tile_values = [None if v is None else padded(v[None], row, col, tile, 0)[0] for v in values]
        kept[(row, col)] = (tile_values, tile_masks)
    return kept


@pytest.mark.timeout(120)
@fuzz(max_examples=30)
@given(case=tiff_cases())
# Complex SAR pixels were cast to their real part (complex64) or crashed np.dtype (CInt16).
@example(case=tiff_case(sensor="S1GRD", bands=["VV", "VH"], dtypes=["complex64"] * 2))
@example(case=tiff_case(sensor="S1GRD", bands=["VH"], dtypes=["complex_int16"], naming="none"))
# One band on another grid: shifted (partly outside), in another CRS, or without a CRS.
@example(case=tiff_case(mismatch="shift", odd="B02", dtypes=["float32", "int16", "uint8"]))
@example(case=tiff_case(mismatch="crs", odd="B03", values="full", nodata="none"))
@example(case=tiff_case(mismatch="crs", odd="B03", dtypes=["float64"] * 3, specials=True))
@example(case=tiff_case(mismatch="no-crs", odd="B02"))
# A full 224-band EnMAP product; an all-nodata scene; float pixels beyond float16.
@example(
    case=tiff_case(
        sensor="ENMAP",
        layout="multi-band",
        bands=[f"B{i:03d}" for i in range(1, 225)],
        naming="none",
        dtypes=["int16"],
        height=5,
        width=3,
    )
)
@example(case=tiff_case(values="constant", nodata="present", min_valid=0.5))
@example(case=tiff_case(values="huge", dtypes=["float32"] * 3, nodata="nan", min_valid=0.5))
def test_geotiff_scenes_round_trip_or_raise_data_error(case):
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "out"
        records = write_scene(case, src)
        sensor = get_sensor(case["sensor"])
        bands = case["bands"] if case["naming"] == "bands" else None
        error = expected_error(case, records)
        event(f"grid {case['mismatch']}, bands named by {case['naming']}, refused: {bool(error)}")
        outcome = data_error_of(
            build_shards,
            src,
            out,
            sensor.name,
            bands=bands,
            tile_size=case["tile"],
            shard_size=3,
            min_valid=case["min_valid"],
            progress=False,
        )
        if error is not None:
            assert_refused(outcome, error)
            return
        model = model_scene(case, records)
        kept = expected_tiles(model, case)
        overflow = check_overflow(model, kept)
        event(f"tiles kept: {'?' if kept is None else len(kept)}, float16 overflow: {overflow}")
        if kept == {} or overflow is True:
            assert isinstance(outcome, DataError), "expected nothing kept / float16 overflow"
            assert ("no tile of" if kept == {} else "float16") in str(outcome), str(outcome)
            return
        if outcome is not None:
            # Only what the model cannot predict may still refuse the scene.
            assert kept is None or overflow is None, f"unexpected {outcome}"
            assert "no tile of" in str(outcome) or "float16" in str(outcome), str(outcome)
            return
        check_geotiff_shards(out, case, model, kept)


def check_overflow(model: dict, kept: dict | None) -> bool | None:
    """Whether a kept float tile holds a valid value beyond float16 (None: cannot tell)."""
    if model["integer"] or kept == {}:
        return False
    if kept is None:
        return None
    for values, masks in kept.values():
        for value, mask in zip(values, masks, strict=True):
            if value is None or mask is None:
                continue
            if (np.abs(value[mask].astype(np.float32)) > FLOAT16_MAX).any():
                return True
    if any(r is not None and max(abs(r[0]), abs(r[1])) > FLOAT16_MAX for r in model["ranges"]):
        return None
    return False


def check_geotiff_shards(out: Path, case: dict, model: dict, kept: dict | None) -> None:
    """The shards against the model: band ids, grid, time, dtype and nodata of every tile, its
    pixels and mask, and the range of a band resampled across CRSs."""
    sensor = get_sensor(case["sensor"])
    samples = read_back(out)
    assert verify_shards(out)["samples"] == len(samples)
    tiles = {}
    for image, valid, meta in samples.values():
        row, col, h, w = meta["window"]
        assert (h, w) == (case["tile"], case["tile"]) and image.shape[1:] == (h, w)
        tiles[(row, col)] = (image, valid)
        assert meta["band_ids"] == [f"{sensor.name}:{name}" for name in model["order"]]
        assert meta["crs"] == BASE_CRS and meta["gsd"] == RES and meta["time"] == TIME
        assert meta["nodata"] == (None if model["fill"] is None else float(model["fill"]))
        assert image.dtype == (np.float16 if model["fill"] is None else case["dtypes"][0])
    stored = "integer" if model["integer"] else "float16"
    if kept is not None:
        assert_tiles(tiles, kept, stored, model["fill"])
    odd = [i for i, v in enumerate(model["values"]) if v is None]
    for i, bounds in zip(odd, model["ranges"], strict=True):
        # The band resampled across CRSs: every valid value within its source's range.
        for image, valid in tiles.values():
            got = image[i][valid[i]].astype(np.float32)
            if bounds is None:
                assert got.size == 0
                continue
            lo, hi = (np.float32(b) for b in bounds)
            if stored == "float16":
                lo, hi = np.float16(lo), np.float16(hi)
            assert ((got >= lo) & (got <= hi)).all(), (got.min(), got.max(), lo, hi)


# ---------------------------------------------------------------------------------------------
# Zarr (v3, v2) and NetCDF datacubes through ``build_cube_shards``

CUBE_SENSORS = ["S2L2A", "S1GRD", "LANDSAT89", "RGB"]
CUBE_DTYPES = ["uint8", "uint16", "int16", "int8", "int32", "float32", "float64"]
DIM_NAMES = {
    "time": ["time", "t"],
    "band": ["band", "bands"],
    "y": ["y", "lat", "latitude"],
    "x": ["x", "lon", "longitude"],
}
UNKNOWN_BANDS = ["B99", "QA60", "ENMAP:B001", "S2L2A:VV"]  # no registry sensor's band here
DAY = 86_400


def spellings(band) -> list[str]:
    """Names the band coordinate may use for a band: name, aliases, registry key, lower case."""
    return [band.name, *band.aliases, band.band_id, band.name.lower()]


def cube_case(**changes) -> dict:
    """A case as ``cube_cases`` draws it, for the ``@example`` rows: 2 dates of 3 uint16 S2
    bands, 9 x 7, stored (time, band, y, x)."""
    case = {
        "sensor": "S2L2A",
        "bands": ["B04", "B03", "B02"],
        "names": ["B4", "S2L2A:B03", "b02"],
        "fault": "none",
        "select": None,
        "steps": 2,
        "order": ["time", "band", "y", "x"],
        "dim_names": {"time": "time", "band": "band", "y": "y", "x": "x"},
        "time_coord": "dates",
        "height": 9,
        "width": 7,
        "north_up": True,
        "geotransform": False,
        "crs": "wkt",
        "dtype": "uint16",
        "nodata": "attr",
        "values": "small",
        "specials": False,
        "format": "zarr3",
        "tile": 4,
        "min_valid": 0.0,
        "seed": 1,
        "chunks": {"time": 1, "band": 3, "y": 3, "x": 8},
    }
    case.update(changes)
    return case


@st.composite
def cube_cases(draw) -> dict:
    """One cube: band names (maybe unknown or repeated), dimensions in any order and naming,
    time coordinate, grid, CRS, dtype, nodata, pixels, format and chunking."""
    sensor = get_sensor(draw(st.sampled_from(CUBE_SENSORS)))
    count = draw(st.integers(1, min(12, len(sensor.bands))))
    bands = draw(st.permutations(sensor.bands))[:count]
    names = [draw(st.sampled_from(spellings(b))) for b in bands]
    fault = draw(st.sampled_from(["none"] * 6 + ["unknown", "duplicate"]))
    if fault == "unknown":
        names[draw(st.integers(0, count - 1))] = draw(st.sampled_from(UNKNOWN_BANDS))
    elif fault == "duplicate":
        names.append(draw(st.sampled_from(spellings(bands[draw(st.integers(0, count - 1))]))))
    steps = draw(st.integers(0, 3))  # 0: no time dimension
    dims = ["band", "y", "x"] + (["time"] if steps else [])
    case = {
        "sensor": sensor.name,
        "bands": [b.name for b in bands],
        "names": names,
        "fault": fault,
        "select": None,
        "steps": steps,
        "order": draw(st.permutations(dims)),
        "dim_names": {d: draw(st.sampled_from(DIM_NAMES[d])) for d in dims},
        "time_coord": draw(st.sampled_from(["dates"] * 4 + ["ints", "none"])) if steps else None,
        "height": draw(st.integers(2, 20)),
        "width": draw(st.integers(2, 20)),
        "north_up": draw(st.booleans()),
        "geotransform": draw(st.booleans()),
        "crs": draw(st.sampled_from(["wkt", "epsg", "string", "none"] * 2 + ["bad"])),
        "dtype": draw(st.sampled_from(CUBE_DTYPES)),
        "nodata": draw(
            st.sampled_from(["none", "attr", "fill", "present", "nan", "out-of-range", "empty"])
        ),
        "values": draw(st.sampled_from(["small", "constant", "full", "huge"])),
        "specials": draw(st.booleans()),
        "format": draw(st.sampled_from(["zarr3", "zarr2", "netcdf"])),
        "tile": draw(st.sampled_from([4, 8, 16])),
        "min_valid": draw(st.sampled_from([0.0, 0.5, 1.0])),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }
    if draw(st.integers(0, 5)) == 0:  # one pixel wide: x/y coordinates cannot give the grid
        case[draw(st.sampled_from(["height", "width"]))] = 1
    case["chunks"] = {d: draw(st.sampled_from([1, 3, 8, 64])) for d in dims}
    if fault == "none" and draw(st.booleans()):  # --bands: a subset in another order
        case["select"] = draw(st.permutations(case["bands"]))[: draw(st.integers(1, count))]
    return case


def write_cube(case: dict, path: Path) -> dict:
    """Write the case's cube; returns the pixels as [T, C, H, W] in cube band order, the
    nodata the reader must use and the transform of the grid."""
    rng = np.random.default_rng(case["seed"])
    dtype = np.dtype(case["dtype"])
    steps, height, width = max(case["steps"], 1), case["height"], case["width"]
    data = pixels(
        rng,
        case["dtype"],
        (steps, len(case["names"]), height, width),
        case["values"],
        case["specials"],
    )
    res_y = -RES if case["north_up"] else RES
    transform = Affine(RES, 0.0, X0, 0.0, res_y, Y0)
    names = case["dim_names"]
    coords = {
        names["band"]: np.array(case["names"], dtype=object),
        names["y"]: Y0 + res_y * (np.arange(height) + 0.5),  # pixel centres
        names["x"]: X0 + RES * (np.arange(width) + 0.5),
    }
    times = [TIME + t * DAY for t in range(steps)]
    if case["steps"] and case["time_coord"] == "dates":
        coords[names["time"]] = np.array(times, dtype="datetime64[s]").astype("datetime64[ns]")
    elif case["steps"] and case["time_coord"] == "ints":
        coords[names["time"]] = np.array(times, dtype=np.int64)  # no units: not a date
    sensor = get_sensor(case["sensor"])
    # Without a nodata of its own a float variable has xarray's NaN _FillValue, which the
    # sensor's nodata does not override (as a GeoTIFF's declared NaN nodata).
    nodata = float("nan") if dtype.kind == "f" else sensor.nodata
    attrs, encoding = {}, {}
    kind = case["nodata"]
    if kind == "nan" and dtype.kind == "f":
        attrs["nodata"], nodata = float("nan"), float("nan")
    elif kind in ("attr", "present"):
        value = 0 if kind == "attr" else present_value(rng, data)
        if value is not None:
            attrs["nodata"], nodata = value, value
    elif kind == "fill":
        encoding["_FillValue"] = nodata = 0
    elif kind == "out-of-range" and dtype.kind in "ui":
        attrs["nodata"] = nodata = int(np.iinfo(dtype).max) + 1  # no pixel can hold it
    elif kind == "empty":
        attrs["nodata"] = []  # not a number
    dataset = xr.Dataset(coords=coords)
    grid_mapping = {}
    if case["crs"] == "wkt":
        grid_mapping["crs_wkt"] = CRS.from_string(BASE_CRS).to_wkt()
    elif case["crs"] == "epsg":
        attrs["proj:epsg"] = 32633
    elif case["crs"] == "string":
        dataset.attrs["crs"] = BASE_CRS
    elif case["crs"] == "bad":
        dataset.attrs["crs"] = "EPSG:not-a-code"
    if case["geotransform"]:
        t = transform
        grid_mapping["GeoTransform"] = f"{t.c} {t.a} {t.b} {t.f} {t.d} {t.e}"
    if grid_mapping:
        dataset.coords["spatial_ref"] = ((), 0, grid_mapping)
        attrs["grid_mapping"] = "spatial_ref"
    # [T, C, H, W] -> the case's dimension order (without time where the cube has none).
    axes = {"time": 0, "band": 1, "y": 2, "x": 3}
    stored = data if case["steps"] else data[0]
    order = [axes[d] - (0 if case["steps"] else 1) for d in case["order"]]
    dims = [names[d] for d in case["order"]]
    stored = stored.transpose(order)
    dataset["cube"] = (dims, stored, attrs)
    chunks = [min(case["chunks"][d], n) for d, n in zip(case["order"], stored.shape, strict=True)]
    while math.prod(-(-n // c) for n, c in zip(stored.shape, chunks, strict=True)) > 64:
        # Few chunk files: each costs a write and a read, and a few exercise the tiling as well.
        i = int(np.argmin([c / n for n, c in zip(stored.shape, chunks, strict=True)]))
        chunks[i] = min(2 * chunks[i], stored.shape[i])
    chunks = tuple(chunks)
    with quiet():
        if case["format"] == "netcdf":
            encoding["chunksizes"] = chunks
            dataset.to_netcdf(path, engine="h5netcdf", encoding={"cube": encoding})
        else:
            encoding["chunks"] = chunks
            version = 3 if case["format"] == "zarr3" else 2
            dataset.to_zarr(
                path, zarr_format=version, consolidated=False, encoding={"cube": encoding}
            )
    return {"data": data, "nodata": nodata, "transform": transform, "times": times}


def cube_error(case: dict) -> str | None:
    """What ``open_cube`` must refuse, in the order it checks (a regex for the DataError)."""
    if case["fault"] == "unknown":
        bad = next(n for n in case["names"] if n in UNKNOWN_BANDS)
        return f"band {re.escape(repr(bad))} of variable cube is not a band of {case['sensor']}"
    if case["fault"] == "duplicate":
        return "a second time"
    if case["steps"] and case["time_coord"] == "ints":
        return "is not a date"
    if case["steps"] > 1 and case["time_coord"] == "none":
        return "dimension has no coordinate"
    if case["crs"] == "bad":
        return "is not a CRS"
    if min(case["height"], case["width"]) < 2 and not case["geotransform"]:
        return "needs .* coordinates with at least two values"
    if case["nodata"] == "empty":
        return "nodata attribute .* is not a number"
    return None


@pytest.mark.timeout(120)
@fuzz(max_examples=25)
@given(case=cube_cases())
# A CRS attribute that is not one raised ValueError, an empty nodata list IndexError.
@example(case=cube_case(crs="bad"))
@example(case=cube_case(nodata="empty", format="zarr2"))
# xarray's own NaN _FillValue on float variables hid their nodata attribute.
@example(case=cube_case(dtype="float32", nodata="attr", format="netcdf"))
# With min_valid=0 the tiles of an all-nodata time step were written, and reported skipped.
@example(case=cube_case(values="constant", nodata="present", min_valid=0.0))
# Other dimension names and order, a one-pixel-wide cube with a GeoTransform, --bands.
@example(
    case=cube_case(
        order=["x", "band", "time", "y"],
        select=["B02", "B04"],
        dim_names={"time": "t", "band": "bands", "y": "lat", "x": "lon"},
    )
)
@example(
    case=cube_case(
        width=1, geotransform=True, north_up=False, steps=0, crs="epsg", order=["band", "y", "x"]
    )
)
def test_datacubes_round_trip_or_raise_data_error(case):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("cube.nc" if case["format"] == "netcdf" else "cube.zarr")
        out = Path(tmp) / "out"
        written = write_cube(case, path)
        error = cube_error(case)
        event(f"{case['format']}, error {error}")
        outcome = data_error_of(
            build_cube_shards,
            path,
            out,
            case["sensor"],
            bands=case["select"],
            tile_size=case["tile"],
            shard_size=2,
            min_valid=case["min_valid"],
            progress=False,
        )
        if error is not None:
            assert_refused(outcome, error, str(path))
            return
        check_cube_shards(case, written, out, outcome)


def check_cube_shards(case: dict, written: dict, out: Path, outcome: DataError | None) -> None:
    """The shards against the cube: per time step the documented tiling of the ``ingest``
    module, with the selected bands in order; or the DataError the model predicts."""
    sensor = get_sensor(case["sensor"])
    order = case["select"] or case["bands"]
    channels = [case["bands"].index(name) for name in order]
    data, nodata = written["data"][:, channels], written["nodata"]  # [T, C, H, W]
    dtype = data.dtype
    integer = dtype in STORED_INTEGERS
    fill = None
    if integer:
        info = np.iinfo(dtype)
        fits = nodata is not None and not math.isnan(nodata) and info.min <= nodata <= info.max
        fill = int(nodata) if fits else 0
    kept, overflow = {}, False
    for t in range(data.shape[0]):
        valid = is_valid(data[t], nodata)
        model = {"masks": list(valid), "values": list(data[t])}
        scene = dict(case, height=data.shape[2], width=data.shape[3])
        for window, tile in (expected_tiles(model, scene) or {}).items():
            kept[(t, *window)] = tile
            values, masks = tile
            if not integer:
                overflow |= any(
                    (np.abs(v[m].astype(np.float32)) > FLOAT16_MAX).any()
                    for v, m in zip(values, masks, strict=True)
                )
    event(f"kept {len(kept)}, overflow {overflow}")
    if not kept or overflow:
        assert outcome is not None, "expected nothing kept / float16 overflow"
        assert ("no tile of" if not kept else "float16") in str(outcome), str(outcome)
        return
    assert outcome is None, f"unexpected {outcome}"
    samples = read_back(out)
    assert verify_shards(out)["samples"] == len(samples)
    tiles = {}
    times = written["times"] if case["steps"] and case["time_coord"] == "dates" else [None]
    for image, valid, meta in samples.values():
        row, col, h, w = meta["window"]
        tiles[(times.index(meta["time"]), row, col)] = (image, valid)
        assert meta["band_ids"] == [f"{sensor.name}:{name}" for name in order]
        assert meta["crs"] == ("" if case["crs"] == "none" else BASE_CRS)
        assert meta["gsd"] == RES and image.dtype == (dtype if integer else np.float16)
        assert meta["nodata"] == (None if fill is None else float(fill))
        t = written["transform"]
        assert meta["bounds"][0] == pytest.approx(t.c + t.a * col)
        assert meta["bounds"][1 if case["north_up"] else 3] == pytest.approx(t.f + t.e * (row + h))
    assert_tiles(tiles, kept, "integer" if integer else "float16", fill)


# ---------------------------------------------------------------------------------------------
# The shard format: encode/decode, the tar reader and index.json

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
JSON_OBJECTS = st.dictionaries(st.text(max_size=6), JSON, max_size=4)
# Sample keys as ``sanitise_key`` leaves them: letters, digits, _ and -, no _ at either end.
KEYS = st.from_regex(r"[A-Za-z0-9-]([A-Za-z0-9_-]{0,20}[A-Za-z0-9-])?", fullmatch=True)


@st.composite
def stored_arrays(draw, leading: tuple[int, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
    """(image, valid) of a stored dtype, [*leading, C, H, W]; float16 pixels may be NaN/Inf."""
    dtype = draw(st.sampled_from(STORED_DTYPES))
    shape = (*leading, draw(st.integers(1, 12)), draw(st.integers(1, 6)), draw(st.integers(1, 6)))
    elements = st.floats(width=16) if dtype.kind == "f" else None
    image = draw(hnp.arrays(dtype, shape, elements=elements))
    valid = draw(st.just(np.ones(shape, dtype=bool)) | hnp.arrays(np.bool_, shape))
    return image, valid


def band_ids(count: int, sensor: str = "S2L2A") -> list[str]:
    return [f"{sensor}:B{i}" for i in range(count)]


def assert_decoded(image, valid, want_image, want_valid) -> None:
    """Same dtype, shape and bytes (NaN payloads included); non-finite pixels invalid."""
    assert image.dtype == want_image.dtype and image.shape == want_image.shape
    assert image.tobytes() == want_image.tobytes()
    if want_image.dtype.kind == "f":
        want_valid = want_valid & np.isfinite(want_image)
    assert valid.dtype == np.bool_
    np.testing.assert_array_equal(valid, want_valid)


def write_shard(path: Path, encoded: list[dict]) -> bytes:
    """A shard as the builds write it (``ingest._ShardWriter``): PAX headers, fixed mtime."""
    writer = wds.TarWriter(str(path), format="PAX_FORMAT", mtime=0.0)
    for sample in encoded:
        writer.write(sample)
    writer.close()
    return path.read_bytes()


@pytest.mark.timeout(60)
@fuzz(max_examples=40)
@given(
    samples=st.lists(
        st.tuples(KEYS, stored_arrays(), JSON_OBJECTS),
        min_size=1,
        max_size=3,
        unique_by=lambda s: s[0],
    ),
)
def test_samples_round_trip_through_a_shard(samples):
    encoded, expected = [], {}
    for key, (image, valid), extra in samples:
        meta = dict(extra, id=key, band_ids=band_ids(image.shape[0]))
        raw = encode_sample(key, image, valid, meta)
        assert ("valid.npy" in raw) == (not valid.all())  # a mask only where some pixel is invalid
        got_image, got_valid, got_meta = decode_sample(raw)
        assert_decoded(got_image, got_valid, image, valid)
        assert got_meta == meta
        encoded.append(raw)
        expected[key] = (image, valid, meta)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shard.tar"
        write_shard(path, encoded)
        read = [(raw["__key__"], decode_sample(raw)) for raw in iter_tar_samples(path)]
    assert [key for key, _ in read] == list(expected)
    for key, (image, valid, meta) in read:
        assert_decoded(image, valid, *expected[key][:2])
        assert meta == expected[key][2]


@pytest.mark.timeout(60)
@fuzz(max_examples=30)
@given(
    arrays=stored_arrays(),
    fault=st.sampled_from(["band_ids", "dtype", "key", "mask"]),
    delta=st.integers(1, 3),
    other=st.sampled_from(["float32", "float64", "int32", "uint32", "int8", "bool", "complex64"]),
    key=st.sampled_from(["a.b", "a/b", "_a", "a_", "", "a b", "ä"]),
)
def test_encoding_refuses_what_could_not_be_read_back(arrays, fault, delta, other, key):
    image, valid = arrays
    meta = {"band_ids": band_ids(image.shape[0])}
    if fault == "band_ids":  # metadata and array disagree on the band count
        meta["band_ids"] = band_ids(max(image.shape[0] + delta * (-1) ** delta, 0))
        match = "channels but band_ids"
    elif fault == "dtype":
        image, match = image.astype(other), "image must be"
    elif fault == "key":
        match = "contains characters|cannot make a sample key"
    else:
        valid, match = valid[..., :-1] if delta == 1 else valid.astype(np.uint8), "valid mask"
    with pytest.raises(DataError, match=match):
        encode_sample(key if fault == "key" else "ok", image, valid, meta)


@st.composite
def group_samples(draw, key: str) -> dict:
    """A group sample: two sensors on one grid, one possibly absent, a time series or not."""
    steps = draw(st.sampled_from([(), (2,)]))
    image, valid = draw(stored_arrays(leading=steps))
    height, width = image.shape[-2:]
    s1 = draw(hnp.arrays(np.float16, (*steps, 2, height, width), elements=st.floats(width=16)))
    views = {"S2L2A": (image, valid), "S1GRD": (s1, np.isfinite(s1))}
    if draw(st.booleans()):
        del views[draw(st.sampled_from(sorted(views)))]
    sensors = {
        name: {
            "present": name in views,
            "band_ids": band_ids(channels, name),
            "shape": list(views[name][0].shape) if name in views else [],
        }
        for name, channels in (("S2L2A", image.shape[-3]), ("S1GRD", 2))
    }
    return encode_group(key, views, {"id": key, "sensors": sensors})


def single_sample(key: str, arrays) -> dict:
    image, valid = arrays
    meta = {"id": key, "sensor": "S2L2A", "band_ids": band_ids(image.shape[0])}
    return encode_sample(key, image, valid, meta)


def decode_all(path: Path) -> dict:
    """Every sample of a shard through ``sample_views`` (what statistics read) and through
    ``decode_sample``/``decode_group`` (what the reader reads), checked for what the decoders
    promise: a stored dtype, a bool mask of the image's shape, one band id per channel."""
    decoded = {}
    for raw in iter_tar_samples(path):
        views = sample_views(raw)
        for _, image, valid, ids in views:
            assert image.ndim in (3, 4) and image.dtype in STORED_DTYPES
            assert valid.dtype == np.bool_ and valid.shape == image.shape
            assert len(ids) == image.shape[-3]
        if "sensors" in json.loads(bytes(raw["json"])):
            arrays, _ = decode_group(raw)
            assert [s for s, pair in arrays.items() if pair is not None] == [v[0] for v in views]
        else:
            np.testing.assert_array_equal(decode_sample(raw)[1], views[0][2])
        decoded[raw["__key__"]] = [(s, i.tobytes(), v.tobytes()) for s, i, v, _ in views]
    return decoded


def layout(data: bytes) -> tuple[list[int], int]:
    """The positions of pixel bytes (npy member payloads after their npy header) in a tar, and
    where its members end (the first end-of-archive block starts there)."""
    pixels_at, end = [], 0
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for info in tar:
            end = info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            if info.name.endswith(".npy"):
                member = io.BytesIO(data[info.offset_data : info.offset_data + info.size])
                assert np.lib.format.read_magic(member) == (1, 0)  # what np.save writes here
                np.lib.format.read_array_header_1_0(member)
                pixels_at += range(info.offset_data + member.tell(), info.offset_data + info.size)
    return pixels_at, end


@pytest.mark.timeout(60)
@fuzz(max_examples=40)
@given(
    data=st.data(),
    group=st.booleans(),
    keys=st.lists(KEYS, min_size=1, max_size=3, unique=True),
    kind=st.sampled_from(["flip", "flip-pixels", "splice", "truncate"]),
)
def test_corrupt_or_truncated_shards_raise_data_error(data, group, keys, kind):
    """Damaged bytes anywhere in a shard: the reader raises DataError naming the shard, or
    reads it; a truncated shard is always refused, and pixel bytes are read as they are."""
    encoded = [
        data.draw(group_samples(key)) if group else single_sample(key, data.draw(stored_arrays()))
        for key in keys
    ]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shard.tar"
        original = write_shard(path, encoded)
        expected = decode_all(path)
        pixels_at, end = layout(original)
        damaged = bytearray(original)
        if kind == "truncate":
            length = data.draw(st.integers(0, len(original) - 1))
            del damaged[length:]
            readable = length >= end + tarfile.BLOCKSIZE  # the end-of-archive block is there
        elif kind == "splice":
            start = data.draw(st.integers(0, len(original) - 1))
            damaged[start : start + 64] = data.draw(st.binary(min_size=1, max_size=64))
            readable = None  # either
        else:
            where = data.draw(
                st.lists(
                    st.sampled_from(pixels_at if kind == "flip-pixels" else range(len(original))),
                    min_size=1,
                    max_size=4,
                )
            )
            for i in where:
                damaged[i] ^= data.draw(st.integers(1, 255))
            # Past the end-of-archive block nothing is read; pixel bytes are read as they are.
            readable = kind == "flip-pixels" or all(i >= end + tarfile.BLOCKSIZE for i in where)
            readable = readable or None
        path.write_bytes(bytes(damaged))
        event(f"{kind}: {'readable' if readable else 'refused' if readable is False else 'either'}")
        try:
            decoded = decode_all(path)
        except DataError as exc:
            assert readable is not True, f"{kind} of an intact part raised {exc}"
            assert str(path) in str(exc)  # the error names the shard
            return
        assert readable is not False, f"{kind} was not detected"
        if kind == "flip-pixels":
            assert list(decoded) == list(expected)
        elif readable:
            assert decoded == expected


@pytest.mark.timeout(60)
@fuzz(max_examples=40)
@given(
    arrays=stored_arrays(),
    member=st.sampled_from(["json", "image.npy", "valid.npy"]),
    damage=st.one_of(
        st.binary(max_size=200).map(lambda b: ("bytes", b)),
        JSON.map(lambda v: ("json", json.dumps(v).encode())),
        st.integers(1, 3).map(lambda n: ("band_ids", n)),
        st.tuples(st.integers(0, 127), st.integers(1, 255)).map(lambda f: ("flip", f)),
        st.integers(0, 200).map(lambda n: ("cut", n)),
    ),
)
# Metadata that is not JSON, not UTF-8, or not an object escaped as JSONDecodeError,
# UnicodeDecodeError or a later AttributeError; a miscounted band list was accepted.
@example(
    arrays=(np.zeros((2, 1, 1), np.uint8), np.ones((2, 1, 1), bool)),
    member="json",
    damage=("bytes", b'{"band_ids": ['),
)
@example(
    arrays=(np.zeros((2, 1, 1), np.uint8), np.ones((2, 1, 1), bool)),
    member="json",
    damage=("bytes", b"\xff\xfe"),
)
@example(
    arrays=(np.zeros((2, 1, 1), np.uint8), np.ones((2, 1, 1), bool)),
    member="json",
    damage=("json", b"[1, 2]"),
)
@example(
    arrays=(np.zeros((2, 1, 1), np.uint8), np.ones((2, 1, 1), bool)),
    member="json",
    damage=("band_ids", 1),
)
def test_corrupt_members_raise_data_error(arrays, member, damage):
    """Members damaged inside an intact tar: unreadable JSON, metadata that is not an object or
    miscounts the bands, npy headers with a flipped byte or cut short."""
    image, valid = arrays
    valid = valid.copy()
    valid.flat[0] = False  # a valid.npy member to damage
    raw = single_sample("k", (image, valid))
    how, value = damage
    if how == "band_ids":
        meta = json.loads(raw["json"])
        meta["band_ids"] = band_ids(image.shape[0] + value)
        raw["json"], member = json.dumps(meta).encode(), "json"
    elif how == "flip":
        position, mask = value
        flipped = bytearray(raw[member])
        flipped[position % len(flipped)] ^= mask
        raw[member] = bytes(flipped)
    elif how == "cut":
        raw[member] = raw[member][:value]
    else:
        raw[member] = value
    readable = None  # damaged npy bytes may still describe a consistent array
    if member == "json":
        try:
            meta = json.loads(raw["json"])
        except ValueError:
            meta = None
        ids = meta.get("band_ids") if isinstance(meta, dict) else None
        readable = isinstance(ids, list) and len(ids) == image.shape[0]
    elif how == "cut" and value < 10:
        readable = False  # not even the npy header's length is there
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shard.tar"
        write_shard(path, [raw])
        try:
            decoded = decode_all(path)
        except DataError as exc:
            assert readable is not True, exc
            assert f"sample k in {path}" in str(exc)
            return
        assert readable is not False, f"damaged {member} ({how}) was read as {decoded}"


@pytest.mark.timeout(30)
@fuzz(max_examples=30)
@given(
    content=st.one_of(
        st.binary(max_size=100),
        JSON.map(lambda v: json.dumps(v).encode()),
        JSON_OBJECTS.map(lambda d: json.dumps(dict(d, format=FORMAT, shards=[])).encode()),
    )
)
@example(content=b'{"format": ')  # was a JSONDecodeError
@example(content=b"[]")  # was an AttributeError
def test_index_json_is_read_or_refused_with_data_error(content):
    try:
        index = json.loads(content)
    except ValueError:
        index = None
    readable = isinstance(index, dict) and index.get("format") == FORMAT
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "index.json").write_bytes(content)
        try:
            got = read_index(tmp)
        except DataError as exc:
            assert not readable and "index.json" in str(exc)
            return
        assert readable and got == index


# ---------------------------------------------------------------------------------------------
# Shards that once hung or crashed the tar and npy readers


def tar_of(members: list[tuple[str | tarfile.TarInfo, bytes]]) -> bytes:
    """An uncompressed ustar archive of ``(name or TarInfo, payload)`` members, in order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for member, payload in members:
            info = member if isinstance(member, tarfile.TarInfo) else tarfile.TarInfo(member)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def pax_header(records: bytes) -> tuple[tarfile.TarInfo, bytes]:
    """A pax extended header member (it applies to the member after it) holding ``records``."""
    info = tarfile.TarInfo("PaxHeader")
    info.type = tarfile.XHDTYPE
    return info, records


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def cut_before_last_member(data: bytes) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return data[: tar.getmembers()[-1].offset]


IMAGE = npy(np.zeros((1, 2, 2), np.uint16))
MASK = npy(np.array([[[True, False], [True, True]]]))
SAMPLE = [("k.image.npy", IMAGE), ("k.json", b'{"band_ids": ["S2L2A:B02"]}')]
REGRESSIONS = {
    # A pax record of length 0 never advanced: an endless loop.
    "pax record of length 0": (tar_of([pax_header(b"0 size=2\n"), *SAMPLE]), "bad pax header"),
    # A pax size that is not a number escaped as ValueError.
    "pax size not a number": (tar_of([pax_header(b"11 size=x2\n"), *SAMPLE]), "bad pax header"),
    # A huge pax size made a piped read allocate it first: MemoryError (OverflowError beyond).
    "pax size of 10**12 bytes": (
        tar_of([pax_header(b"21 size=" + b"9" * 12 + b"\n"), *SAMPLE]),
        "truncated inside member",
    ),
    # A shard cut between members was read as complete: here the sample lost its valid mask
    # and was read as valid everywhere.
    "cut between members": (
        cut_before_last_member(tar_of([*SAMPLE, ("k.valid.npy", MASK)])),
        "end-of-archive",
    ),
    # A shape tuple left open escaped numpy's header parser as tokenize.TokenError.
    "npy shape left open": (
        tar_of([("k.image.npy", IMAGE.replace(b"(1, 2, 2), }", b"(1, 2, 2(( }")), SAMPLE[1]]),
        "not a readable npy array",
    ),
    # Negative dimensions escaped the reshape as ValueError.
    "npy negative dimensions": (
        tar_of([("k.image.npy", IMAGE.replace(b"(1, 2, 2)", b"(1,-2,-2)")), SAMPLE[1]]),
        "not a readable npy array",
    ),
    # A mask that is not bool was handed on as the valid mask.
    "valid mask of uint8": (
        tar_of([*SAMPLE, ("k.valid.npy", npy(np.ones((1, 2, 2), np.uint8)))]),
        "valid mask uint8",
    ),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", sorted(REGRESSIONS))
@pytest.mark.parametrize("piped", [False, True], ids=["local", "pipe"])
def test_damaged_shards_that_once_hung_or_crashed_raise_data_error(tmp_path, name, piped):
    intact = tmp_path / "intact.tar"
    intact.write_bytes(tar_of([*SAMPLE, ("k.valid.npy", MASK)]))
    ((_, valid, _),) = [decode_sample(raw) for raw in iter_tar_samples(intact)]
    assert valid.sum() == 3  # the undamaged sample reads, with its mask
    content, message = REGRESSIONS[name]
    path = tmp_path / "shard.tar"
    path.write_bytes(content)
    url = f"pipe:cat {path}" if piped else str(path)
    with pytest.raises(DataError, match=message) as error:
        for raw in iter_tar_samples(url):
            decode_sample(raw)
    assert str(path) in str(error.value)
