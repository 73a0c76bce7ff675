"""Zarr and NetCDF datacubes -> WebDataset shards (``eoforge data build CUBE OUT --sensor S``).

A cube is a Zarr store (v3 by default, v2 read as well; opened with ``consolidated=False``, so
stores without consolidated metadata open too) or a NetCDF file, read through xarray. Its data
variable has the dimensions ``(time, band, y, x)`` in any order (``time`` may be absent: the cube
is then one scene; ``lat``/``latitude`` and ``lon``/``longitude`` stand for ``y`` and ``x``). The
variable is chosen with ``variable`` or, where the cube holds only one variable with a band
dimension, found on its own.

* **Bands**: the band coordinate's values name the bands; each must be a band of the sensor by
  name or alias (``B02``, ``B2``) or by registry key (``S2L2A:B02``), or the build stops with a
  DataError naming the band and the cube file.
* **Grid**: rioxarray is not used; the CRS comes from the variable's ``grid_mapping`` variable
  (or a ``spatial_ref``/``crs`` variable) through its ``crs_wkt``, ``spatial_ref`` or
  ``epsg_code`` attribute, else from a ``crs``, ``proj:epsg`` or ``epsg`` attribute of the
  variable or the dataset (WKT, ``"EPSG:32633"`` or an EPSG number). The affine transform is
  built from the regularly spaced ``x``/``y`` coordinates, which hold pixel centres (as xarray
  and GDAL write them); where a dimension has fewer than two coordinates, from the grid mapping's
  GDAL ``GeoTransform`` attribute. A cube without a CRS is ingested with an empty ``crs``, as a
  GeoTIFF without one is.
* **Values**: raw values are kept (``mask_and_scale=False``), as GeoTIFF ingest keeps digital
  numbers; the sensor registry's scale and offset apply to them. Nodata is the first of the
  variable's ``_FillValue``, ``missing_value`` and ``nodata`` attributes that is not NaN (xarray
  gives float variables a NaN ``_FillValue`` unasked, which must not hide a ``nodata``
  attribute), else NaN where one of them is NaN, else the sensor's registered nodata; NaN and
  infinite values are invalid too.
* **Time**: each time step is one scene, with its time stamp (unix seconds, UTC) on every sample.
  The time coordinate must decode to datetimes (CF ``units`` such as
  ``"seconds since 1970-01-01"``).

The cube is opened lazily with dask, chunked as stored; each tile reads only the chunks it
overlaps, once (chunks that divide the tile size are read exactly once per build). Tiling,
quality thresholds and the atomic shard writer are those of ``eoforge.datasets.ingest``: a time
step without a valid pixel is skipped, which ``min_valid=0`` (keep every tile) finds out by
reading each time step once more before tiling it.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import xarray as xr
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import CRSError
from tqdm import tqdm

from eoforge.datasets.errors import DataError
from eoforge.datasets.geotiff import INTEGER_DTYPES, Scene, find_files, pixel_size_m
from eoforge.datasets.ingest import (
    MAX_NAMED_SCENES,
    WRITE_ORDER_SEED,
    _tile_meta,
    check_build_options,
    stored_array,
    tiles,
    unique_key,
    write_shard_folder,
)
from eoforge.datasets.quality import QualityFilter
from eoforge.datasets.sensors import Band, Sensor, band_table, get_sensor
from eoforge.datasets.shards import FORMAT, FORMAT_VERSION, SHARD_NAME, encode_sample

NETCDF_SUFFIXES = (".nc", ".nc4", ".netcdf", ".cdf")
ZARR_MARKERS = ("zarr.json", ".zgroup", ".zarray")  # v3 and v2 store metadata
DIMENSIONS = {
    "time": ("time", "t"),
    "band": ("band", "bands"),
    "y": ("y", "lat", "latitude"),
    "x": ("x", "lon", "longitude"),
}
CRS_VARIABLES = ("spatial_ref", "crs")
GRID_MAPPING_CRS_ATTRS = ("crs_wkt", "spatial_ref", "epsg_code")
CRS_ATTRS = ("crs", "proj:epsg", "epsg")
NODATA_ATTRS = ("_FillValue", "missing_value", "nodata")


@dataclass(frozen=True)
class Cube:
    """An opened cube, checked against a sensor; no pixel read yet.

    Attributes:
        path: the Zarr store or NetCDF file.
        variable: the data variable read.
        data: lazy (dask) DataArray [T, C, H, W] with the selected bands in ``bands`` order
            (T = 1 for a cube without a time dimension).
        bands: the C registry bands.
        times: unix seconds (UTC) per time step; None for a cube without time.
        crs: the grid's CRS as a string (``"EPSG:32633"``), or ``""``.
        transform: affine transform of the grid (pixel corners).
        nodata: value of invalid pixels, or None.
        sensor: the registry sensor.
    """

    path: Path
    variable: str
    data: xr.DataArray
    bands: tuple[Band, ...]
    times: tuple[int | None, ...]
    crs: str
    transform: Affine
    nodata: float | None
    sensor: Sensor


def is_cube(path: str | Path) -> bool:
    """Whether ``path`` is a Zarr store (a ``.zarr`` folder or one holding Zarr metadata) or a
    NetCDF file."""
    path = Path(path)
    if path.is_dir():
        return path.suffix.lower() == ".zarr" or any((path / m).is_file() for m in ZARR_MARKERS)
    return path.is_file() and path.suffix.lower() in NETCDF_SUFFIXES


def find_cubes(src: str | Path) -> list[Path]:
    """``src`` itself if it is a cube, else the cubes under the folder ``src`` (recursive,
    sorted, not looking inside Zarr stores)."""
    src = Path(src)
    if is_cube(src):
        return [src]
    if not src.is_dir():
        return []
    found = []
    for folder, dirs, files in os.walk(src):
        stores = sorted(d for d in dirs if not d.startswith(".") and is_cube(Path(folder) / d))
        found += [Path(folder) / d for d in stores]
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in stores)
        found += [Path(folder) / f for f in sorted(files) if is_cube(Path(folder) / f)]
    return sorted(found)


def is_cube_source(src: str | Path) -> bool:
    """Whether ``eoforge data build`` should read ``src`` as cubes: a cube, or a folder holding
    cubes and no GeoTIFF.

    Raises:
        DataError: for a folder holding both cubes and GeoTIFFs.
    """
    cubes = find_cubes(src)
    if not cubes or is_cube(src):
        return bool(cubes)
    rasters = find_files(src)
    if rasters:
        raise DataError(
            f"{src} holds both datacubes ({cubes[0].name}, ...) and GeoTIFFs ({rasters[0].name}, "
            "...); build them into separate shard folders from separate input folders"
        )
    return True


def open_cube(
    path: str | Path,
    sensor: str | Sensor,
    *,
    variable: str | None = None,
    bands: Sequence[str] | None = None,
) -> Cube:
    """Open a cube lazily and match its bands, grid and times (module docstring).

    Args:
        path: Zarr store or NetCDF file.
        sensor: registry sensor of the cube.
        variable: data variable to read (default: the only one with a band dimension).
        bands: bands to keep, in this order (default: all of the cube's bands, in cube order).

    Raises:
        DataError: naming the cube file and the variable, dimension, band or attribute at fault.
    """
    path = Path(path)
    sensor = get_sensor(sensor) if isinstance(sensor, str) else sensor
    dataset = _open_dataset(path)
    array = _data_variable(dataset, path, variable)
    dims = _dimension_names(array, path)
    if dims["time"] is None:
        array = array.expand_dims("time")
        dims["time"] = "time"
    array = array.transpose(dims["time"], dims["band"], dims["y"], dims["x"])  # [T, C, H, W]
    found = _match_bands(array, dims["band"], sensor, path)
    if bands:
        order = {b.name: i for i, b in enumerate(found)}
        wanted = sensor.select(bands)
        absent = [b.name for b in wanted if b.name not in order]
        if absent:
            raise DataError(
                f"{path}: --bands names {', '.join(absent)}, which the cube does not hold "
                f"(it holds {', '.join(b.name for b in found)})"
            )
        array = array.isel({dims["band"]: [order[b.name] for b in wanted]})
        found = wanted
    return Cube(
        path=path,
        variable=str(array.name),
        data=array,
        bands=tuple(found),
        times=_times(dataset, array, dims["time"], path),
        crs=_crs(dataset, array, path),
        transform=_transform(dataset, array, dims["y"], dims["x"], path),
        nodata=_nodata(array, sensor, path),
        sensor=sensor,
    )


def cube_scenes(cube: Cube, name: str) -> Iterator[Scene]:
    """One scene per time step of a cube, named ``<name>/<YYYYMMDDTHHMMSS>``; its ``image`` and
    ``valid`` are read window by window when sliced (what ``ingest.tiles`` does), so a scene
    costs no read until its tiles are cut."""
    height = cube.data.shape[2]
    dtype = cube.data.dtype if cube.data.dtype in INTEGER_DTYPES else np.dtype(np.float32)
    integer_nodata = dtype in INTEGER_DTYPES and cube.nodata is not None
    fill = cube.nodata if integer_nodata and _fits(cube.nodata, dtype) else None
    gsd = pixel_size_m(CRS.from_string(cube.crs) if cube.crs else None, cube.transform, height)
    for t, time in enumerate(cube.times):
        reader = _WindowReader(cube.data.data[t], cube.nodata, dtype)
        stamp = (
            f"t{t}" if time is None else datetime.fromtimestamp(time, UTC).strftime("%Y%m%dT%H%M%S")
        )
        yield Scene(
            image=_LazyArray(reader, 0),
            valid=_LazyArray(reader, 1),
            bands=cube.bands,
            sensor=cube.sensor.name,
            crs=cube.crs,
            transform=cube.transform,
            gsd=gsd,
            time=time,
            source=str(cube.path),
            name=name if len(cube.times) == 1 and time is None else f"{name}/{stamp}",
            nodata=None if dtype.kind == "f" else float(fill if fill is not None else 0),
            files=(str(cube.path),) * len(cube.bands),
        )


def build_cube_shards(
    src: str | Path,
    out: str | Path,
    sensor: str | Sensor,
    *,
    variable: str | None = None,
    bands: Sequence[str] | None = None,
    tile_size: int = 128,
    shard_size: int = 256,
    min_valid: float = 0.5,
    max_nodata_fraction: float | None = None,
    overwrite: bool = False,
    progress: bool = True,
    order_seed: int | None = WRITE_ORDER_SEED,
) -> dict:
    """Turn a cube, or a folder of cubes, into a shard folder (as ``ingest.build_shards`` does
    for GeoTIFFs: same tiling, shard format, index.json and summary).

    Every cube is opened and checked (bands, grid, times) before any pixel is read. Cubes are
    ingested on their own grid: there is no resampling.

    Args:
        src: a Zarr store, a NetCDF file, or a folder searched recursively for them.
        out: shard folder to create.
        sensor: registry sensor of every cube.
        variable: data variable of the cubes (default: the only one with a band dimension).
        bands: bands to keep, in this order (default: the cube's bands in cube order).
        tile_size: side of the square tiles in pixels.
        shard_size: samples per shard.
        min_valid: tiles with a smaller fraction of valid pixels are skipped.
        max_nodata_fraction: drop tiles whose fraction of pixels without any valid band
            exceeds this.
        overwrite: replace shards (and the now stale stats.json) already in ``out``.
        progress: show a progress bar over scenes (time steps).
        order_seed: seed of the order the samples are written in (``write_shard_folder``);
            None keeps the order they are read in.

    Returns:
        A summary: output folder, cube/scene/sample/shard counts, skipped tiles and scenes, the
        invalid (nodata/NaN) pixels found, and ``quality``.

    Raises:
        DataError: no cube in ``src``, cubes with different band sets, the errors of
            ``open_cube``, existing shards without ``overwrite``, or no tile kept.
    """
    check_build_options(tile_size, shard_size, min_valid)
    quality = QualityFilter(max_nodata_fraction=max_nodata_fraction)
    src, out = Path(src), Path(out)
    paths = find_cubes(src)
    if not paths:
        raise DataError(
            f"no Zarr store or NetCDF file ({', '.join(NETCDF_SUFFIXES)}) found at {src}"
        )
    cubes = [open_cube(p, sensor, variable=variable, bands=bands) for p in paths]
    for cube in cubes[1:]:
        if cube.bands != cubes[0].bands:
            raise DataError(
                f"{cube.path} has bands {', '.join(b.name for b in cube.bands)} but "
                f"{cubes[0].path} has {', '.join(b.name for b in cubes[0].bands)}; one build "
                "holds one band set: pass --bands with a common set, or build them separately"
            )
    sensor = cubes[0].sensor
    summary = {
        "out": str(out),
        "sensor": sensor.name,
        "cubes": len(cubes),
        "scenes": sum(len(c.times) for c in cubes),
        "scenes_skipped": 0,
        "samples": 0,
        "shards": 0,
        "tiles_skipped": 0,
        "invalid_pixels": 0,
        "scenes_with_invalid": 0,
        "invalid_examples": [],
    }

    def scenes() -> Iterator[Scene]:
        for cube, path in zip(cubes, paths, strict=True):
            name = path.relative_to(src).with_suffix("").as_posix() if path != src else path.stem
            yield from cube_scenes(cube, name)

    def samples() -> Iterator[dict]:
        keys: set[str] = set()
        bar = tqdm(
            scenes(),
            total=summary["scenes"],
            desc=f"shards {sensor.name}",
            unit="scene",
            disable=not progress,
        )
        for scene in bar:
            if min_valid == 0.0 and not scene.valid.any():
                # min_valid=0 keeps tiles without a valid pixel, but a time step without any is
                # skipped, as ingest skips such scenes; this costs one more read of it.
                _count_invalid(scene, 0, False, summary)
                continue
            invalid, any_valid = 0, False
            height, width = scene.image.shape[1:]
            for window, image, valid in tiles(scene, tile_size):
                row, col = window[:2]
                inside = valid[:, : height - row, : width - col]  # [C, h, w]: not the padding
                invalid += inside.size - int(np.count_nonzero(inside))
                any_valid = any_valid or bool(inside.any())
                if valid.mean() < min_valid:
                    summary["tiles_skipped"] += 1
                    continue
                if not quality.keeps(window, valid):
                    continue
                key = unique_key(f"{scene.sensor}_{scene.name}_r{row}_c{col}", keys)
                stored = stored_array(image, valid, scene.source)
                yield encode_sample(key, stored, valid, _tile_meta(key, scene, window))
            _count_invalid(scene, invalid, any_valid, summary)

    def index(counts: list[int]) -> dict:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "shards": [{"name": SHARD_NAME.format(i), "samples": n} for i, n in enumerate(counts)],
            "samples": sum(counts),
            "sensors": {sensor.name: sum(counts)},
            "bands": band_table(cubes[0].bands),
            "source": str(src.resolve()),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "quality": quality.report(),
        }

    def nothing_kept() -> DataError:
        return DataError(
            f"no tile of {src} was kept: {summary['tiles_skipped']} tiles had less than "
            f"min_valid={min_valid} valid pixels, {quality.report()['tiles_dropped']['nodata']} "
            f"more nodata than max_nodata_fraction={max_nodata_fraction}, and "
            f"{summary['scenes_skipped']} time steps had no valid pixel; relax those thresholds "
            "or --tile-size, or check the cube's nodata attribute"
        )

    counts = write_shard_folder(
        out,
        samples(),
        index,
        shard_size=shard_size,
        overwrite=overwrite,
        empty=nothing_kept,
        order_seed=order_seed,
    )
    summary.update(samples=sum(counts), shards=len(counts), quality=quality.report())
    return summary


class _WindowReader:
    """Reads windows of one time step ([C, H, W] dask) on demand; ``ingest.tiles`` asks for a
    tile's image and then its valid mask with the same slice, so the last window is kept."""

    def __init__(self, plane, nodata: float | None, dtype: np.dtype) -> None:
        self.plane = plane
        self.nodata = nodata
        self.dtype = dtype
        self._key: tuple | None = None
        self._block: tuple[np.ndarray, np.ndarray] | None = None

    def read(self, key: tuple) -> tuple[np.ndarray, np.ndarray]:
        if self._key is None or self._key != key:
            # Synchronous: a tile is a few chunks, not worth a thread pool per read.
            raw = np.asarray(self.plane[key].compute(scheduler="synchronous"))
            valid = _valid_mask(raw, self.nodata)
            image = np.where(valid, raw, np.nan) if self.dtype.kind == "f" else raw
            self._key, self._block = key, (image.astype(self.dtype, copy=False), valid)
        return self._block

    def any_valid(self) -> bool:
        """Whether any pixel of the time step is valid (reads it chunk by chunk)."""
        valid = _valid_mask(self.plane, self.nodata)
        return bool(valid.any().compute(scheduler="synchronous"))


def _valid_mask(raw, nodata: float | None):
    """Valid pixels of a numpy or dask array: finite, and not ``nodata``."""
    valid = np.isfinite(raw) if raw.dtype.kind == "f" else np.ones_like(raw, dtype=bool)
    if nodata is not None and not math.isnan(nodata):
        valid &= raw != nodata
    return valid


class _LazyArray:
    """The image (part 0) or valid mask (part 1) of a ``_WindowReader``: shape, dtype, slicing
    and, for the mask, ``any``."""

    ndim = 3

    def __init__(self, reader: _WindowReader, part: int) -> None:
        self._reader = reader
        self._part = part
        self.shape = tuple(reader.plane.shape)
        self.dtype = reader.dtype if part == 0 else np.dtype(bool)

    def __getitem__(self, key) -> np.ndarray:
        return self._reader.read(key if isinstance(key, tuple) else (key,))[self._part]

    def any(self) -> bool:
        if self._part != 1:
            raise TypeError("any() is defined for the valid mask only")
        return self._reader.any_valid()


def _count_invalid(scene: Scene, invalid: int, any_valid: bool, summary: dict) -> None:
    if not any_valid:
        summary["scenes_skipped"] += 1
        warnings.warn(
            f"{scene.source}: every pixel of time step {scene.name} is nodata/NaN; skipped",
            stacklevel=3,
        )
    elif invalid:
        summary["invalid_pixels"] += invalid
        summary["scenes_with_invalid"] += 1
        if len(summary["invalid_examples"]) < MAX_NAMED_SCENES:
            summary["invalid_examples"].append(scene.name)


def _open_dataset(path: Path) -> xr.Dataset:
    try:
        if path.is_dir():
            return xr.open_zarr(path, consolidated=False, chunks={}, mask_and_scale=False)
        return xr.open_dataset(path, chunks={}, mask_and_scale=False)
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"cannot open cube {path}: {exc}") from exc


def _data_variable(dataset: xr.Dataset, path: Path, variable: str | None) -> xr.DataArray:
    if variable is not None:
        if variable not in dataset.data_vars:
            raise DataError(
                f"{path} has no data variable {variable!r} (it has "
                f"{', '.join(map(str, dataset.data_vars)) or 'none'})"
            )
        return dataset[variable]
    banded = [v for v in dataset.data_vars if set(dataset[v].dims) & set(DIMENSIONS["band"])]
    if len(banded) != 1:
        listing = ", ".join(f"{v}{tuple(dataset[v].dims)}" for v in dataset.data_vars)
        problem = "several" if banded else "no"
        raise DataError(
            f"{path} has {problem} data variables with a band dimension ({listing or 'none'}); "
            "name the one to read with --variable, dimensions (time, band, y, x)"
        )
    return dataset[banded[0]]


def _dimension_names(array: xr.DataArray, path: Path) -> dict[str, str | None]:
    dims: dict[str, str | None] = {}
    for role, names in DIMENSIONS.items():
        matches = [d for d in array.dims if str(d).lower() in names]
        if not matches and role != "time":
            raise DataError(
                f"{path}: variable {array.name} has dimensions {tuple(array.dims)}, none of "
                f"which is a {role} dimension ({', '.join(names)}); expected (time, band, y, x)"
            )
        dims[role] = matches[0] if matches else None
    extra = [d for d in array.dims if d not in dims.values()]
    if extra:
        raise DataError(
            f"{path}: variable {array.name} has dimensions {', '.join(map(str, extra))} beyond "
            "(time, band, y, x); select one value of them before ingesting"
        )
    return dims


def _match_bands(array: xr.DataArray, dim: str, sensor: Sensor, path: Path) -> list[Band]:
    if dim not in array.coords:
        raise DataError(
            f"{path}: variable {array.name}'s {dim} dimension has no coordinate naming its bands; "
            f"add one with {sensor.name} band names (e.g. {', '.join(sensor.band_names[:3])})"
        )
    found: list[Band] = []
    for value in array[dim].values:
        name = value.decode() if isinstance(value, bytes) else str(value)
        prefix, sep, short = name.partition(":")
        band = sensor.find(short) if sep and _same_sensor(prefix, sensor) else sensor.find(name)
        if band is None:
            raise DataError(
                f"{path}: band {name!r} of variable {array.name} is not a band of {sensor.name} "
                f"by name or alias (bands: {', '.join(sensor.band_names)}); rename it in the "
                "band coordinate or choose the right --sensor"
            )
        if band in found:
            raise DataError(f"{path}: band {name!r} names {band.band_id} a second time")
        found.append(band)
    return found


def _same_sensor(name: str, sensor: Sensor) -> bool:
    try:
        return get_sensor(name) == sensor
    except DataError:
        return False


def _times(
    dataset: xr.Dataset, array: xr.DataArray, dim: str, path: Path
) -> tuple[int | None, ...]:
    if dim not in array.coords:
        stamp = dataset.coords.get("time")  # a cube of one date may keep it as a scalar
        values = [stamp.values] if stamp is not None and stamp.ndim == 0 else [None]
        if len(values) != array.shape[0]:
            raise DataError(f"{path}: variable {array.name}'s {dim} dimension has no coordinate")
    else:
        values = list(array[dim].values)
    times = []
    for value in values:
        if value is None:
            times.append(None)
        elif isinstance(value, np.datetime64) or np.asarray(value).dtype.kind == "M":
            seconds = np.asarray(value).astype("datetime64[s]")
            times.append(None if np.isnat(seconds) else int(seconds.astype(np.int64)))
        else:
            raise DataError(
                f"{path}: time coordinate value {value!r} is not a date; give the time "
                "coordinate CF units (e.g. units='seconds since 1970-01-01')"
            )
    return tuple(times)


def _grid_mapping(dataset: xr.Dataset, array: xr.DataArray) -> dict:
    name = array.attrs.get("grid_mapping") or array.encoding.get("grid_mapping")
    for candidate in (name, *CRS_VARIABLES):
        if candidate and candidate in dataset.variables:
            return dict(dataset[candidate].attrs)
    return {}


def _crs(dataset: xr.Dataset, array: xr.DataArray, path: Path) -> str:
    mapping = _grid_mapping(dataset, array)
    sources = [(f"grid mapping attribute {a}", mapping.get(a)) for a in GRID_MAPPING_CRS_ATTRS]
    sources += [(f"attribute {a}", array.attrs.get(a, dataset.attrs.get(a))) for a in CRS_ATTRS]
    for where, value in sources:
        if value is None or isinstance(value, dict):
            continue
        try:
            return CRS.from_user_input(
                value.item() if hasattr(value, "item") else value
            ).to_string()
        except (CRSError, ValueError) as exc:  # "EPSG:<not a number>" is a ValueError
            raise DataError(f"{path}: {where} {value!r} is not a CRS (WKT or EPSG): {exc}") from exc
    return ""


def _transform(
    dataset: xr.Dataset, array: xr.DataArray, ydim: str, xdim: str, path: Path
) -> Affine:
    if all(d in array.coords and array.sizes[d] > 1 for d in (ydim, xdim)):
        x0, res_x = _spacing(array[xdim].values, xdim, path)
        y0, res_y = _spacing(array[ydim].values, ydim, path)
        # Coordinates are pixel centres; the transform maps pixel corners.
        return Affine(res_x, 0.0, x0 - res_x / 2, 0.0, res_y, y0 - res_y / 2)
    geo = _grid_mapping(dataset, array).get("GeoTransform")
    if geo is None:
        raise DataError(
            f"{path}: variable {array.name} needs {xdim}/{ydim} coordinates with at least two "
            "values each, or a grid mapping variable with a GDAL GeoTransform attribute"
        )
    c, a, b, f, d, e = (float(v) for v in str(geo).split())
    return Affine(a, b, c, d, e, f)


def _spacing(values: np.ndarray, dim: str, path: Path) -> tuple[float, float]:
    values = values.astype(np.float64)
    steps = np.diff(values)
    if steps[0] == 0 or not np.allclose(steps, steps[0], rtol=1e-6, atol=abs(steps[0]) * 1e-6):
        raise DataError(
            f"{path}: coordinate {dim} is not regularly spaced (steps {steps.min()} to "
            f"{steps.max()}); resample the cube onto a regular grid first"
        )
    return float(values[0]), float((values[-1] - values[0]) / (len(values) - 1))


def _nodata(array: xr.DataArray, sensor: Sensor, path: Path) -> float | None:
    declared = []
    for attr in NODATA_ATTRS:
        value = array.attrs.get(attr, array.encoding.get(attr))
        if value is None:
            continue
        try:
            declared.append(float(np.asarray(value).ravel()[0]))
        except (TypeError, ValueError, IndexError) as exc:  # IndexError: an empty list
            raise DataError(f"{path}: {attr} attribute {value!r} is not a number") from exc
    numbers = [v for v in declared if not math.isnan(v)]
    if numbers:
        return numbers[0]
    return declared[0] if declared else sensor.nodata


def _fits(value: float, dtype: np.dtype) -> bool:
    info = np.iinfo(dtype)
    return float(value).is_integer() and info.min <= value <= info.max
