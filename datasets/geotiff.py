"""Discovering and reading scenes from a folder of GeoTIFFs.

Two layouts are recognised (any mix of them under one folder):

* **Per-band files**: single-band files of one directory whose stem's last ``_``-separated token
  (or whole stem) names a band of the sensor form one scene, e.g. BigEarthNet
  ``<patch>/<patch>_B01.tif``, SSL4EO ``<date>/B8A.tif``, Landsat ``l8_B1.tif``. Files of one
  directory with different prefixes before the band token (``LC08_a_B1.TIF``, ``LC08_b_B1.TIF``)
  are different scenes. Files named after one of the sensor's auxiliary layers (quality masks such
  as Landsat ``BQA`` or EnMAP ``QL_*``) are skipped; any other single-band file is an error.
* **Multi-band files**: a file with more than one band is a whole scene. Its bands are named by
  the file's band descriptions where every one of them is a band of the sensor; otherwise they
  are the ``bands`` the user names, in file order, or else the sensor's bands in canonical order
  (files without descriptions cannot tell: EuroSAT MS, for one, stores B8A last, so it needs
  ``bands``). ``bands`` naming as many bands as a full-product file holds less selects from it.

Files are matched by extension (``.tif``, ``.tiff``, ``.jp2``, any case; some ``.jp2`` files in the
wild are GeoTIFFs, and GDAL opens either). Bands at different resolutions are resampled onto one
grid with ``rasterio.warp.reproject`` (bilinear): by default the grid of the finest band, or, with
``gsd``, the grid of a band whose native pixel size equals ``gsd``, else the finest band's extent at
``gsd``. Pixels equal to a file's nodata (the sensor's registered nodata where the file declares
none), NaN, infinite, or outside a band's footprint are invalid.

Band sets: without ``bands``, a per-band scene must hold every band of the sensor, except for SAR
sensors whose scenes hold the polarisations they were acquired in; with ``bands``, exactly those are
read and any other band files are ignored.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import RasterioIOError
from rasterio.warp import reproject

from eoforge.datasets.errors import DataError
from eoforge.datasets.sensors import Band, Sensor, get_sensor

EXTENSIONS = (".tif", ".tiff", ".jp2")
INTEGER_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.int16))
METRES_PER_DEGREE_LAT = 110_574.0
METRES_PER_DEGREE_LON_EQUATOR = 111_320.0

_STAMP = re.compile(r"(?<!\d)(\d{8})(?:T(\d{6}))?(?!\d)")


@dataclass(frozen=True)
class BandFile:
    """Where one band of a scene is stored: a file and its 1-based band index."""

    band: Band
    path: Path
    index: int = 1


@dataclass(frozen=True)
class SceneSource:
    """A scene found on disk but not read yet.

    Attributes:
        sensor: the registry sensor.
        members: one ``BandFile`` per band, in output band order.
        source: the scene's folder (per-band layout) or file (multi-band layout).
        name: a readable id of the scene relative to the searched root.
        time: acquisition time (unix seconds, UTC) parsed from the path, or None.
    """

    sensor: Sensor
    members: tuple[BandFile, ...]
    source: Path
    name: str
    time: int | None

    @property
    def bands(self) -> tuple[Band, ...]:
        return tuple(m.band for m in self.members)


@dataclass(frozen=True)
class Scene:
    """A scene read onto one grid.

    Attributes:
        image: [C, H, W]; the source dtype when every band is uint8/uint16/int16 (invalid pixels
            hold ``nodata``), otherwise float32 with NaN at invalid pixels.
        valid: bool [C, H, W]; False at nodata, NaN/Inf and outside a band's footprint.
        bands: the C registry bands, in image order.
        sensor: registry name of the sensor.
        crs: the grid's CRS as a string (``"EPSG:32633"``).
        transform: the grid's affine transform.
        gsd: pixel size of the grid in metres.
        time: acquisition time in unix seconds (UTC), or None.
        source: the scene's folder or file.
        name: the scene's id relative to the searched root.
        nodata: the value of invalid pixels in integer images, None for float images.
        files: the file each channel was read from.
    """

    image: np.ndarray
    valid: np.ndarray
    bands: tuple[Band, ...]
    sensor: str
    crs: str
    transform: Affine
    gsd: float
    time: int | None
    source: str
    name: str
    nodata: float | None
    files: tuple[str, ...]

    @property
    def grid(self) -> Grid:
        """The grid the scene was read onto (pass it to ``read_scene`` to co-register another
        scene with this one)."""
        crs = CRS.from_string(self.crs) if self.crs else None
        return Grid(crs, self.transform, self.image.shape[-2], self.image.shape[-1])

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) in ``crs`` units."""
        return self.window_bounds(0, 0, self.image.shape[1], self.image.shape[2])

    def window_bounds(
        self, row: int, col: int, height: int, width: int
    ) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) of a pixel window of this scene's grid."""
        t = self.transform
        # Written out rather than rasterio.windows.bounds, whose ``transform * point`` warns under
        # affine 3 (PendingDeprecationWarning).
        corners = [(c, r) for c in (col, col + width) for r in (row, row + height)]
        xs = [t.a * c + t.b * r + t.c for c, r in corners]
        ys = [t.d * c + t.e * r + t.f for c, r in corners]
        return (float(min(xs)), float(min(ys)), float(max(xs)), float(max(ys)))


@dataclass(frozen=True)
class Grid:
    """A raster grid: CRS, affine transform and size in pixels."""

    crs: CRS | None
    transform: Affine
    height: int
    width: int

    def same_as(self, other: Grid) -> bool:
        return (
            self.crs == other.crs
            and (self.height, self.width) == (other.height, other.width)
            and self.transform.almost_equals(other.transform, precision=1e-9)
        )


def find_files(
    root: str | Path, pattern: str | None = None, extensions: Sequence[str] = EXTENSIONS
) -> list[Path]:
    """Raster files under ``root`` (recursive, sorted) with one of ``extensions`` (GeoTIFF/JP2 by
    default), restricted to those whose name or path relative to ``root`` matches the glob
    ``pattern`` (any case)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"input folder {root} does not exist or is not a folder")
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(folder) / name
            if path.suffix.lower() not in extensions:
                continue
            if pattern and not _matches(path.relative_to(root).as_posix(), pattern):
                continue
            found.append(path)
    return found


def _matches(relative: str, pattern: str) -> bool:
    pattern = pattern.lower()
    relative = relative.lower()
    return fnmatch.fnmatchcase(relative, pattern) or fnmatch.fnmatchcase(
        relative.rsplit("/", 1)[-1], pattern
    )


def band_token(path: Path) -> str:
    """The part of a file name that names its band: the stem's last ``_``-separated token."""
    return path.stem.rsplit("_", 1)[-1]


def is_aux_file(path: Path, sensor: Sensor) -> bool:
    """Whether a file holds one of the sensor's auxiliary layers (``BQA``, ``QA_PIXEL``, ``QL_*``):
    some suffix of its stem that starts after a ``_`` or ``-`` starts with an aux token."""
    stem = path.stem
    starts = [0] + [i + 1 for i, ch in enumerate(stem) if ch in "_-"]
    return any(sensor.is_aux(stem[i:]) for i in starts if stem[i:])


def acquisition_time(path: str | Path, root: str | Path | None = None) -> int | None:
    """Unix seconds (UTC) of the first ``YYYYMMDDTHHMMSS`` or ``YYYYMMDD`` stamp in the file name,
    else in its parent folder names (nearest first, not above ``root``); None when there is none."""
    path = Path(path)
    parts = [path.name] + [p.name for p in path.parents]
    if root is not None:
        depth = len(path.relative_to(root).parts)
        parts = parts[:depth]
    for part in parts:
        for match in _STAMP.finditer(part):
            try:
                stamp = datetime.strptime(
                    match.group(1) + (match.group(2) or "000000"), "%Y%m%d%H%M%S"
                )
            except ValueError:
                continue
            if 1970 <= stamp.year <= 2100:
                return int(stamp.replace(tzinfo=UTC).timestamp())
    return None


def discover_scenes(
    root: str | Path,
    sensor: str | Sensor,
    *,
    bands: Sequence[str] | None = None,
    pattern: str | None = None,
    extensions: Sequence[str] = EXTENSIONS,
) -> list[SceneSource]:
    """All scenes under ``root``, in a deterministic order, checked against the sensor's bands.

    Only file headers are read. Every band-naming problem is reported here, before any pixel is
    read: unknown band tokens, band-count mismatches, missing or duplicated bands.

    Args:
        root: folder searched recursively.
        sensor: registry sensor (name or ``Sensor``).
        bands: band names to read (per-band files), or the bands of multi-band files in file order.
        pattern: glob on file names (or paths relative to ``root``), e.g. ``*SPECTRAL_IMAGE.TIF``.
        extensions: file extensions read, lower case (a layout preset may read ``.jpg``).

    Raises:
        DataError: naming the folder, file or band at fault and what to change.
    """
    root = Path(root)
    sensor = get_sensor(sensor) if isinstance(sensor, str) else sensor
    wanted = sensor.select(bands) if bands else None
    if wanted and len({b.name for b in wanted}) != len(wanted):
        raise DataError(f"--bands names a band twice: {', '.join(bands)}")
    files = find_files(root, pattern, extensions)
    if not files:
        where = f" matching pattern {pattern!r}" if pattern else ""
        kind = "GeoTIFF/JP2" if tuple(extensions) == EXTENSIONS else "raster"
        raise DataError(
            f"no {kind} files{where} in {root} (extensions {', '.join(extensions)}, any case); "
            "check the folder" + (" and --pattern" if pattern else "")
        )
    groups: dict[tuple[Path, str], list[tuple[Band, Path]]] = {}
    scenes: list[SceneSource] = []
    for path in files:
        if is_aux_file(path, sensor):
            continue
        count, descriptions = _header(path)
        if count > 1:
            scenes.append(_multiband_scene(path, count, descriptions, sensor, bands, root))
            continue
        token = band_token(path)
        band = sensor.find(token)
        if band is None:
            raise DataError(
                f"{path}: file name token {token!r} is not a band of {sensor.name} (bands: "
                f"{', '.join(sensor.band_names)}); rename the file, exclude it with --pattern, or "
                "choose the right --sensor"
            )
        prefix = path.stem[: len(path.stem) - len(token)]
        groups.setdefault((path.parent, prefix), []).append((band, path))
    per_folder: dict[Path, int] = {}
    for folder, _ in groups:
        per_folder[folder] = per_folder.get(folder, 0) + 1
    for (folder, prefix), found in groups.items():
        # The prefix only tells scenes apart where one folder holds several.
        name = _scene_name(root, folder, prefix if per_folder[folder] > 1 else "")
        scenes.append(_perband_scene(folder, prefix, name, found, sensor, wanted, root))
    if not scenes:
        raise DataError(
            f"only auxiliary layers ({', '.join(sensor.aux)}) found in {root}; no scenes to read"
        )
    scenes.sort(key=lambda s: (str(s.source), s.name))
    _check_consistent(scenes)
    return scenes


def _header(path: Path) -> tuple[int, tuple[str | None, ...]]:
    try:
        with rasterio.open(path) as ds:
            return ds.count, ds.descriptions
    except RasterioIOError as exc:
        raise DataError(
            f"{path} is not a readable raster ({exc}); remove it or exclude it with --pattern"
        ) from exc


def _scene_name(root: Path, path: Path, prefix: str = "") -> str:
    name = path.relative_to(root).as_posix() if path != root else root.name
    prefix = prefix.strip("_-")
    return f"{name}/{prefix}" if prefix else name


def _multiband_scene(
    path: Path,
    count: int,
    descriptions: tuple[str | None, ...],
    sensor: Sensor,
    bands: Sequence[str] | None,
    root: Path,
) -> SceneSource:
    described = [sensor.find(d) if d else None for d in descriptions]
    if all(described):
        named = [b.name for b in described]
        if bands and [b.name for b in sensor.select(bands)] != named:
            raise DataError(
                f"{path} describes its bands as {', '.join(named)} but --bands says "
                f"{', '.join(bands)}; drop --bands or make it match the file"
            )
        members = tuple(BandFile(b, path, i + 1) for i, b in enumerate(described))
    elif bands and count == len(bands):
        members = tuple(BandFile(b, path, i + 1) for i, b in enumerate(sensor.select(bands)))
    elif count == len(sensor.bands):
        # The file holds the full product; ``bands`` (if given) selects from it.
        order = {b.name: i for i, b in enumerate(sensor.bands)}
        members = tuple(BandFile(b, path, order[b.name] + 1) for b in sensor.select(bands))
    else:
        asked = f" nor the {len(bands)} bands given with --bands" if bands else ""
        raise DataError(
            f"{path} has {count} bands, which matches neither {sensor.name}'s {len(sensor.bands)} "
            f"bands{asked}; pass --bands with the file's {count} band names in file order "
            "(e.g. --bands B02 B03 B04), choose the right --sensor, or exclude the file with --pattern"
        )
    stem = path.with_suffix("")
    # ``<product>/<product>-SPECTRAL_IMAGE.TIF``: the folder adds nothing to the id.
    named_after_folder = path.parent != root and path.stem.startswith(path.parent.name)
    name = _scene_name(root, path.parent.parent / path.stem if named_after_folder else stem)
    return SceneSource(sensor, members, path, name, acquisition_time(path, root))


def _perband_scene(
    folder: Path,
    prefix: str,
    name: str,
    found: list[tuple[Band, Path]],
    sensor: Sensor,
    wanted: list[Band] | None,
    root: Path,
) -> SceneSource:
    by_band: dict[str, Path] = {}
    for band, path in found:
        if band.name in by_band:
            raise DataError(
                f"{folder}: two files for band {band.band_id}: {by_band[band.name].name} and {path.name}; "
                "remove one or exclude it with --pattern"
            )
        by_band[band.name] = path
    if wanted is None:
        present = [b for b in sensor.bands if b.name in by_band]
        expected = present if sensor.family == "sar" else list(sensor.bands)
    else:
        expected = wanted
    missing = [b.name for b in expected if b.name not in by_band]
    if missing:
        raise DataError(
            f"{folder}: scene {prefix or folder.name!r} has no file for {sensor.name} band(s) "
            f"{', '.join(missing)} (found: {', '.join(sorted(by_band))}); pass --bands with the bands to "
            "keep, or choose the right --sensor"
        )
    members = tuple(BandFile(b, by_band[b.name]) for b in expected)
    first = members[0].path
    return SceneSource(sensor, members, folder, name, acquisition_time(first, root))


def _check_consistent(scenes: list[SceneSource]) -> None:
    reference = scenes[0]
    for scene in scenes[1:]:
        if scene.bands != reference.bands:
            raise DataError(
                f"{scene.source} has bands {', '.join(b.name for b in scene.bands)} but "
                f"{reference.source} has {', '.join(b.name for b in reference.bands)}; one build holds "
                "one band set: pass --bands with a common set, or build the scenes separately"
            )


def read_scene(scene: SceneSource, *, gsd: float | None = None, grid: Grid | None = None) -> Scene:
    """Read every band of a scene onto one grid.

    Bands already on the target grid are copied as read; others are resampled bilinearly with
    nodata excluded from the interpolation (``rasterio.warp.reproject``, also across CRSs).

    Args:
        scene: from ``discover_scenes``.
        gsd: target pixel size in metres (default: the finest band's grid).
        grid: read onto this grid instead (e.g. another sensor's ``Scene.grid``, to
            co-register the two); pixels it covers outside the scene's footprint are invalid.

    Raises:
        DataError: when a file cannot be read or holds complex pixels, bands on different grids
            lack a CRS, or both ``gsd`` and ``grid`` are given.
    """
    if gsd is not None and grid is not None:
        raise DataError(f"{scene.source}: pass gsd or grid, not both")
    grids, dtypes, nodatas = {}, {}, {}
    for member in scene.members:
        if member.path in grids:
            continue
        try:
            with rasterio.open(member.path) as ds:
                grids[member.path] = Grid(ds.crs, ds.transform, ds.height, ds.width)
                dtypes[member.path] = _real_dtype(ds.dtypes[member.index - 1], member)
                nodatas[member.path] = ds.nodata if ds.nodata is not None else scene.sensor.nodata
        except RasterioIOError as exc:
            raise DataError(f"cannot read {member.path}: {exc}") from exc
    target = grid if grid is not None else _target_grid(scene, grids, gsd)
    source_dtypes = {dtypes[m.path] for m in scene.members}
    integer = len(source_dtypes) == 1 and next(iter(source_dtypes)) in INTEGER_DTYPES
    dtype = next(iter(source_dtypes)) if integer else np.dtype(np.float32)
    fill = _fill_value(nodatas[scene.members[0].path], dtype) if integer else None

    image = np.empty((len(scene.members), target.height, target.width), dtype=dtype)
    valid = np.empty(image.shape, dtype=bool)
    channels: dict[Path, list[int]] = {}
    for c, member in enumerate(scene.members):
        channels.setdefault(member.path, []).append(c)
    for path, where in channels.items():
        with rasterio.open(
            path
        ) as ds:  # one read per file: multi-band files hold hundreds of bands
            data = ds.read([scene.members[c].index for c in where])
        ok = _valid_mask(data, nodatas[path])
        if not grids[path].same_as(target):
            data, ok = _resample(data, ok, grids[path], target, path)
        if integer and data.dtype.kind == "f":
            info = np.iinfo(dtype)
            data = np.clip(np.rint(data), info.min, info.max)
        image[where] = np.where(ok, data, fill if integer else np.nan)
        valid[where] = ok
    return Scene(
        image=image,
        valid=valid,
        bands=scene.bands,
        sensor=scene.sensor.name,
        crs=target.crs.to_string() if target.crs else "",
        transform=target.transform,
        gsd=_scene_gsd(scene, target),
        time=scene.time,
        source=str(scene.source),
        name=scene.name,
        nodata=float(fill) if fill is not None else None,
        files=tuple(str(m.path) for m in scene.members),
    )


def _scene_gsd(scene: SceneSource, grid: Grid) -> float:
    """The grid's pixel size in metres; for a file without georeference (an 8-bit rendering, a
    JPEG), whose pixel "size" is a unit of its pixel grid, the bands' registered native GSD."""
    native = {b.gsd for b in scene.bands}
    if grid.crs is None and grid.transform.is_identity and len(native) == 1 and None not in native:
        return float(native.pop())
    return pixel_size_m(grid.crs, grid.transform, grid.height)


def _real_dtype(name: str, member: BandFile) -> np.dtype:
    """The numpy dtype of a band; complex bands (SAR SLC products; GDAL's ``CInt16`` has no numpy
    dtype at all) are refused rather than cast to their real part."""
    if "complex" in name:
        raise DataError(
            f"{member.path}: band {member.index} ({member.band.name}) holds complex pixels "
            f"({name}), which eoforge does not read; convert them to amplitude or intensity first"
        )
    return np.dtype(name)


def _valid_mask(data: np.ndarray, nodata: float | None) -> np.ndarray:
    ok = np.ones(data.shape, dtype=bool)
    if data.dtype.kind == "f":
        ok &= np.isfinite(data)
    if nodata is not None and not math.isnan(nodata):
        ok &= data != nodata
    return ok


def _fill_value(nodata: float | None, dtype: np.dtype) -> int:
    info = np.iinfo(dtype)
    if nodata is not None and not math.isnan(nodata) and info.min <= nodata <= info.max:
        return int(nodata)
    return 0


def _resample(
    data: np.ndarray, ok: np.ndarray, grid: Grid, target: Grid, path: Path
) -> tuple[np.ndarray, np.ndarray]:
    """[k, h, w] on ``grid`` -> float32 [k, H, W] on ``target`` (NaN where no valid input)."""
    if grid.crs is None or target.crs is None:
        raise DataError(
            f"{path} is on a different grid from the scene's other bands but has no CRS, so it "
            "cannot be resampled; add georeferencing or build it as a separate scene"
        )
    source = np.where(ok, data.astype(np.float32), np.float32(np.nan))
    out = np.full((data.shape[0], target.height, target.width), np.nan, dtype=np.float32)
    reproject(
        source=source,
        destination=out,
        src_transform=grid.transform,
        src_crs=grid.crs,
        src_nodata=np.nan,
        dst_transform=target.transform,
        dst_crs=target.crs,
        dst_nodata=np.nan,
        resampling=Resampling.bilinear,
    )
    return out, np.isfinite(out)


def _target_grid(scene: SceneSource, grids: dict[Path, Grid], gsd: float | None) -> Grid:
    ordered = [grids[m.path] for m in scene.members]
    sizes = [pixel_size_m(g.crs, g.transform, g.height) for g in ordered]
    finest = ordered[int(np.argmin(sizes))]
    if gsd is None:
        return finest
    if gsd <= 0:
        raise DataError(f"gsd must be a positive number of metres, got {gsd}")
    for grid, size in zip(ordered, sizes, strict=True):
        if math.isclose(size, gsd, rel_tol=1e-6):
            return grid
    # No band is native at ``gsd``: keep the finest band's extent and origin at the new pixel size.
    factor = gsd / min(sizes)
    left, top = finest.transform.c, finest.transform.f
    res_x, res_y = finest.transform.a * factor, finest.transform.e * factor
    width = max(1, round(finest.width / factor))
    height = max(1, round(finest.height / factor))
    return Grid(finest.crs, Affine(res_x, 0.0, left, 0.0, res_y, top), height, width)


def pixel_size_m(crs: CRS | None, transform: Affine, height: int) -> float:
    """Mean pixel side in metres; for geographic CRSs at the grid's central latitude."""
    res_x, res_y = abs(transform.a), abs(transform.e)
    if crs is not None and crs.is_geographic:
        lat = math.radians(transform.f + transform.e * height / 2)
        res_x *= METRES_PER_DEGREE_LON_EQUATOR * math.cos(lat)
        res_y *= METRES_PER_DEGREE_LAT
    elif crs is not None and crs.is_projected:
        factor = crs.linear_units_factor[1]
        res_x, res_y = res_x * factor, res_y * factor
    return round((res_x + res_y) / 2, 4)
