"""Multi-sensor and multi-date samples: pairing products, co-registering them, writing group shards.

A *product* is one scene of one sensor (one date) over one *footprint* (a location or patch id the
layout defines). Products become samples by explicit rules:

* **Footprint**: only products of one footprint are grouped.
  ``layout="ssl4eo"`` (SSL4EO-S12: ``SRC/{s1,s2a,s2c}/<location>/<product>/<band>.tif``): the
  footprint is the location folder; ``s1`` holds S1GRD, ``s2a`` S2L2A and ``s2c`` S2L1C products.
  ``layout="bigearthnet"`` (BigEarthNet v1/v2 patch folders ``S2A_MSIL2A_..._<row>_<col>`` and
  ``S1A_IW_GRDH_..._<tile>_<row>_<col>`` anywhere under SRC): an S1 patch's footprint is the S2
  patch its ``*_labels_metadata.json`` names (``corresponding_s2_patch``), else, as in v2, the
  ``<tile>_<row>_<col>`` its name shares with its S2 partner (``*_reference_map.tif`` label
  maps are skipped).
* **Pairs** (``pair``): every ``reference`` product anchors one sample; for each partner sensor it
  gets the partner product of its footprint nearest in time, each partner product used once
  (closest pairs first), and only within ``time_window_days`` when that is given. A reference
  product without a partner is kept: the sample lacks that sensor. A partner product that no
  reference product took is kept too, as a sample of its own that lacks the reference, unless
  ``lone_partners=False``.
* **Series** (``series=True``): all dates of the reference sensor at one footprint become one
  sample with a time axis (T dates, ascending), with no partner sensors.

Co-registration: a sample's grid is its anchor product's (the reference product, or a lone
partner's) read at ``gsd`` (default: the anchor's finest band). Every other product of the sample
is read onto that grid with ``rasterio.warp.reproject`` (bilinear; values are copied unchanged
where the grids already agree), keeping its own valid mask: nodata and pixels outside its
footprint are invalid. Tiles are then cut as in ``eoforge.datasets.ingest``; a tile where a sensor
has no valid pixel lacks that sensor, and ``min_valid`` applies to the anchor's pixels.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from tqdm import tqdm

from eoforge.datasets.errors import DataError
from eoforge.datasets.geotiff import (
    Grid,
    Scene,
    SceneSource,
    acquisition_time,
    discover_scenes,
    find_files,
    read_scene,
)
from eoforge.datasets.ingest import (
    WRITE_ORDER_SEED,
    check_build_options,
    keep_scene,
    stored_array,
    unique_key,
    write_shard_folder,
)
from eoforge.datasets.quality import QualityFilter
from eoforge.datasets.sensors import Band, band_table, get_sensor
from eoforge.datasets.shards import (
    FORMAT,
    GROUP_FORMAT_VERSION,
    SHARD_NAME,
    encode_group,
)

LAYOUTS = ("ssl4eo", "bigearthnet")
SSL4EO_FOLDERS = {"s1": "S1GRD", "s2a": "S2L2A", "s2c": "S2L1C"}
SECONDS_PER_DAY = 86_400

_BEN_S1 = re.compile(r"^S1[AB]_IW_GRD")
_BEN_S2 = re.compile(r"^S2[AB]_MSIL(2A|1C)_")
# ``..._T33UUP_75_43`` (S2 v2) and ``..._33UUP_75_43`` (S1): tile, row and column of the patch.
_BEN_FOOTPRINT = re.compile(r"_T?(\d{2}[A-Z]{3})_(\d+)_(\d+)$")
_BEN_LABEL_MAP = "_reference_map"


@dataclass(frozen=True)
class Product:
    """One scene of one sensor at one footprint, not read yet.

    Attributes:
        sensor: registry sensor name.
        source: the scene's files (from ``discover_scenes``).
        footprint: the location/patch id shared by products to be grouped.
        time: acquisition time in unix seconds (UTC), or None.
    """

    sensor: str
    source: SceneSource
    footprint: str
    time: int | None

    @property
    def name(self) -> str:
        return self.source.name


@dataclass(frozen=True)
class SampleGroup:
    """The products of one sample before tiling.

    Attributes:
        footprint: their shared footprint.
        anchor: the sensor whose (first) product defines the grid.
        members: ``{sensor: products}`` for the sensors present: one product each, or the T
            dates of a series in time order.
    """

    footprint: str
    anchor: str
    members: dict[str, tuple[Product, ...]]

    @property
    def name(self) -> str:
        return self.members[self.anchor][0].name


@dataclass(frozen=True)
class GroupScene:
    """A sample group read onto one grid.

    Attributes:
        group: what was read.
        scenes: ``{sensor: scenes}`` in the order of ``group.members``, all on ``grid``.
        grid: the anchor's grid.
    """

    group: SampleGroup
    scenes: dict[str, tuple[Scene, ...]]
    grid: Grid


# ---------------------------------------------------------------------------------- discovery


def discover_products(src: str | Path, layout: str, sensors: Sequence[str]) -> list[Product]:
    """Every product of ``sensors`` under ``src`` in a layout, in a deterministic order.

    Args:
        src: the dataset's root folder.
        layout: ``"ssl4eo"`` or ``"bigearthnet"`` (module docstring).
        sensors: registry sensors to collect; others are ignored.

    Raises:
        DataError: unknown layout, a sensor without any product (naming where it was looked
            for), or products of one sensor with different band sets.
    """
    src = Path(src)
    if layout not in LAYOUTS:
        raise DataError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if not src.is_dir():
        raise DataError(f"input folder {src} does not exist or is not a folder")
    sensors = [get_sensor(s).name for s in sensors]
    found = _ssl4eo_products(src, sensors) if layout == "ssl4eo" else _ben_products(src, sensors)
    for sensor in sensors:
        mine = [p for p in found if p.sensor == sensor]
        if not mine:
            raise DataError(f"no {sensor} product found under {src} ({_where(layout, sensor)})")
        first = mine[0]
        for product in mine[1:]:
            if product.source.bands != first.source.bands:
                raise DataError(
                    f"{product.source.source} has {sensor} bands "
                    f"{', '.join(b.name for b in product.source.bands)} but {first.source.source} "
                    f"has {', '.join(b.name for b in first.source.bands)}; one build holds one "
                    "band set per sensor"
                )
    return sorted(found, key=lambda p: (p.footprint, p.sensor, p.time or 0, p.name))


def _where(layout: str, sensor: str) -> str:
    if layout == "ssl4eo":
        folders = [f for f, s in SSL4EO_FOLDERS.items() if s == sensor]
        if not folders:
            return f"the ssl4eo layout holds only {', '.join(sorted(set(SSL4EO_FOLDERS.values())))}"
        return f"looked in {folders[0]}/<location>/<product>/"
    return "looked for BigEarthNet patch folders named S1?_IW_GRD* or S2?_MSIL2A_*/S2?_MSIL1C_*"


def _ssl4eo_products(src: Path, sensors: list[str]) -> list[Product]:
    products = []
    for folder, sensor in SSL4EO_FOLDERS.items():
        if sensor not in sensors or not (src / folder).is_dir():
            continue
        for scene in discover_scenes(src / folder, sensor):
            footprint = scene.name.split("/", 1)[0]
            products.append(Product(sensor, scene, footprint, scene.time))
    return products


def _ben_products(src: Path, sensors: list[str]) -> list[Product]:
    # Reference maps (v2's pixel-level labels) sit in S2-named folders but are not imagery.
    images = [p for p in find_files(src) if not p.stem.lower().endswith(_BEN_LABEL_MAP)]
    folders = sorted({path.parent for path in images})
    products = []
    for folder in folders:
        sensor = _ben_sensor(folder.name)
        if sensor is None or sensor not in sensors:
            continue
        (scene,) = discover_scenes(folder, sensor)
        time = acquisition_time(scene.members[0].path, src)
        name = folder.relative_to(src).as_posix()
        scene = dataclasses.replace(scene, name=name, time=time)
        products.append(Product(sensor, scene, _ben_footprint(folder, sensor), time))
    return products


def _ben_sensor(name: str) -> str | None:
    if _BEN_S1.match(name):
        return "S1GRD"
    match = _BEN_S2.match(name)
    if match:
        return "S2L2A" if match.group(1) == "2A" else "S2L1C"
    return None


def _ben_footprint(folder: Path, sensor: str) -> str:
    """The id an S1 patch shares with its S2 partner: the S2 patch's ``<tile>_<row>_<col>``, or
    its whole name where (as in v1) it carries no tile."""
    name = folder.name
    if sensor == "S1GRD":
        labels = folder / f"{name}_labels_metadata.json"
        if labels.is_file():
            partner = json.loads(labels.read_text()).get("corresponding_s2_patch")
            if partner:
                name = partner
            else:
                raise DataError(f"{labels} has no corresponding_s2_patch; cannot pair {folder}")
        elif not _BEN_FOOTPRINT.search(name):
            raise DataError(
                f"{folder}: no {labels.name} and no <tile>_<row>_<col> in the name; cannot pair it"
            )
    match = _BEN_FOOTPRINT.search(name)
    return "_".join(match.groups()) if match else name


# ---------------------------------------------------------------------------------- pairing


def pair_products(
    products: Sequence[Product],
    reference: str,
    pair: Sequence[str] = (),
    *,
    time_window_days: float | None = None,
    series: bool = False,
    lone_partners: bool = True,
) -> list[SampleGroup]:
    """Group products into samples by the rules of the module docstring.

    Args:
        products: from ``discover_products``.
        reference: the sensor anchoring each sample (and the only one of a series).
        pair: partner sensors.
        time_window_days: most days between a reference product and its partner (None: any).
        series: all dates of ``reference`` at a footprint form one sample (no ``pair``).
        lone_partners: keep partner products no reference product took, as samples lacking
            the reference.

    Raises:
        DataError: bad options, a series or a window over products without a timestamp.
    """
    reference = get_sensor(reference).name
    pair = [get_sensor(s).name for s in pair]
    if reference in pair or len(set(pair)) != len(pair):
        raise DataError(f"--pair {' '.join(pair)} repeats a sensor or the reference {reference}")
    if series and pair:
        raise DataError("--series builds time series of the reference sensor alone; drop --pair")
    if time_window_days is not None and time_window_days < 0:
        raise DataError(f"time_window_days must be >= 0, got {time_window_days}")
    if series and time_window_days is not None:
        raise DataError("--time-window-days applies to pairs, not to --series")
    by_footprint: dict[str, list[Product]] = {}
    for product in products:
        if product.sensor in (reference, *pair):
            by_footprint.setdefault(product.footprint, []).append(product)
    groups = []
    for footprint, found in sorted(by_footprint.items()):
        if series:
            dates = [p for p in found if p.sensor == reference]
            undated = [p.name for p in dates if p.time is None]
            if undated:
                raise DataError(
                    f"{undated[0]}: no acquisition time in its path; a time series needs one"
                )
            if dates:
                ordered = tuple(sorted(dates, key=lambda p: p.time))
                groups.append(SampleGroup(footprint, reference, {reference: ordered}))
            continue
        paired, lone = _pair_footprint(footprint, found, reference, pair, time_window_days)
        groups += paired + (lone if lone_partners else [])
    return groups


def _pair_footprint(
    footprint: str,
    found: list[Product],
    reference: str,
    pair: list[str],
    window_days: float | None,
) -> tuple[list[SampleGroup], list[SampleGroup]]:
    """(samples anchored by reference products, samples of partner products left alone)."""
    anchors = [p for p in found if p.sensor == reference]
    members: list[dict[str, tuple[Product, ...]]] = [{reference: (p,)} for p in anchors]
    lone = []
    for sensor in pair:
        partners = [p for p in found if p.sensor == sensor]
        taken: set[int] = set()
        for _, i, j in _candidates(anchors, partners, window_days):
            if sensor not in members[i] and j not in taken:
                members[i][sensor] = (partners[j],)
                taken.add(j)
        lone += [p for j, p in enumerate(partners) if j not in taken]
    paired = [SampleGroup(footprint, reference, m) for m in members]
    return paired, [SampleGroup(footprint, p.sensor, {p.sensor: (p,)}) for p in lone]


def _candidates(
    anchors: list[Product], partners: list[Product], window_days: float | None
) -> list[tuple[float, int, int]]:
    """(gap in seconds, anchor index, partner index) of allowed pairs, closest first."""
    out = []
    for i, a in enumerate(anchors):
        for j, p in enumerate(partners):
            if a.time is None or p.time is None:
                if window_days is not None:
                    name = a.name if a.time is None else p.name
                    raise DataError(
                        f"{name}: no acquisition time in its path, so --time-window-days cannot "
                        "apply; drop the window or add the date to the path"
                    )
                gap = 0.0
            else:
                gap = abs(a.time - p.time)
            if window_days is None or gap <= window_days * SECONDS_PER_DAY:
                out.append((gap, i, j))
    return sorted(out)


# ---------------------------------------------------------------------------------- reading


def read_group(group: SampleGroup, *, gsd: float | None = None) -> GroupScene:
    """Read every product of a group onto its anchor's grid (module docstring).

    Args:
        group: from ``pair_products``.
        gsd: pixel size in metres of the anchor's grid (default: its finest band).
    """
    first, *rest = group.members[group.anchor]
    anchor = read_scene(first.source, gsd=gsd)
    grid = anchor.grid
    scenes: dict[str, tuple[Scene, ...]] = {}
    for sensor, products in group.members.items():
        read = [anchor] if sensor == group.anchor else []
        todo = rest if sensor == group.anchor else products
        read += [read_scene(p.source, grid=grid) for p in todo]
        scenes[sensor] = tuple(read)
    return GroupScene(group, scenes, grid)


def _stack(scenes: tuple[Scene, ...], series: bool) -> tuple[np.ndarray, np.ndarray]:
    """[C, H, W] of one scene, or [T, C, H, W] of a series (float32 with NaN if dtypes differ)."""
    if not series:
        return scenes[0].image, scenes[0].valid
    dtypes = {s.image.dtype for s in scenes}
    if len(dtypes) == 1:
        image = np.stack([s.image for s in scenes])
    else:
        image = np.stack([np.where(s.valid, s.image.astype(np.float32), np.nan) for s in scenes])
    return image, np.stack([s.valid for s in scenes])


# ---------------------------------------------------------------------------------- building


def build_paired_shards(
    src: str | Path,
    out: str | Path,
    reference: str,
    *,
    pair: Sequence[str] = (),
    layout: str,
    time_window_days: float | None = None,
    series: bool = False,
    lone_partners: bool = True,
    tile_size: int = 128,
    shard_size: int = 256,
    gsd: float | None = None,
    min_valid: float = 0.5,
    max_cloud_fraction: float | None = None,
    max_nodata_fraction: float | None = None,
    overwrite: bool = False,
    progress: bool = True,
    order_seed: int | None = WRITE_ORDER_SEED,
) -> dict:
    """Build a group shard folder: co-registered sensors and/or time series per sample.

    Args:
        src: the dataset's root folder, in ``layout``.
        out: shard folder to create.
        reference: sensor anchoring each sample (its grid and ``min_valid``), e.g. ``"S2L2A"``.
        pair: partner sensors, e.g. ``["S1GRD"]``.
        layout: ``"ssl4eo"`` or ``"bigearthnet"`` (module docstring).
        time_window_days: most days between a reference product and its partner (None: any).
        series: all dates of ``reference`` at a footprint form one [T, C, H, W] sample.
        lone_partners: keep partner products no reference product took, as samples lacking
            the reference.
        tile_size: side of the square tiles in pixels.
        shard_size: samples per shard.
        gsd: pixel size in metres of each sample's grid (default: the anchor's finest band).
        min_valid: tiles whose anchor has a smaller valid fraction are skipped.
        max_cloud_fraction, max_nodata_fraction: quality thresholds (``eoforge.datasets.quality``)
            applied to the anchor's tile: the reference sensor's product (its first date in a
            series), with the cloud layers shipped with that product.
        overwrite: replace shards (and the now stale stats.json) already in ``out``.
        progress: show a progress bar over groups.
        order_seed: seed of the order the samples are written in (``write_shard_folder``);
            None keeps the order they are read in.

    Returns:
        A summary: products per sensor, groups, samples, shards, skipped tiles, invalid pixels
        and ``missing``: how many samples lack each sensor (also warned about).

    Raises:
        DataError: bad options, inputs the layout does not recognise, existing shards without
            ``overwrite``, or no tile kept.
    """
    check_build_options(tile_size, shard_size, min_valid)
    quality = QualityFilter(max_cloud_fraction, max_nodata_fraction)
    src, out = Path(src), Path(out)
    sensors = [get_sensor(s).name for s in (reference, *pair)]
    products = discover_products(src, layout, sensors)
    groups = pair_products(
        products,
        sensors[0],
        sensors[1:],
        time_window_days=time_window_days,
        series=series,
        lone_partners=lone_partners,
    )
    bands = {s: next(p.source.bands for p in products if p.sensor == s) for s in sensors}
    summary = {
        "out": str(out),
        "reference": sensors[0],
        "pair": sensors[1:],
        "layout": layout,
        "series": series,
        "time_window_days": time_window_days,
        "lone_partners": lone_partners,
        "products": {s: sum(p.sensor == s for p in products) for s in sensors},
        "groups": len(groups),
        "scenes_skipped": 0,
        "samples": 0,
        "shards": 0,
        "tiles_skipped": 0,
        "invalid_pixels": 0,
        "scenes_with_invalid": 0,
        "invalid_examples": [],
        "present": dict.fromkeys(sensors, 0),
        "missing": dict.fromkeys(sensors, 0),
    }

    def samples() -> Iterator[dict]:
        keys: set[str] = set()
        for group in tqdm(groups, desc="shards", unit="group", disable=not progress):
            scene = read_group(group, gsd=gsd)
            first = scene.scenes[group.anchor][0]
            if not keep_scene(first, summary):
                continue
            quality.start_scene(group.members[group.anchor][0].source, first)
            for sensor, read in scene.scenes.items():
                for one in (s for s in read if s is not first):
                    if one.valid.any():
                        keep_scene(one, summary)
                    else:
                        warnings.warn(
                            f"{one.source}: no valid pixel on the grid of {group.name}; "
                            f"its samples lack {sensor}",
                            stacklevel=2,
                        )
            yield from _group_tiles(
                scene, bands, series, tile_size, min_valid, quality, keys, summary
            )

    def index(counts: list[int]) -> dict:
        return {
            "format": FORMAT,
            "version": GROUP_FORMAT_VERSION,
            "shards": [{"name": SHARD_NAME.format(i), "samples": n} for i, n in enumerate(counts)],
            "samples": sum(counts),
            "sensors": summary["present"],
            "missing": summary["missing"],
            "bands": [row for s in sensors for row in band_table(bands[s])],
            "group": {
                "sensors": sensors,
                "reference": sensors[0],
                "pair": sensors[1:],
                "layout": layout,
                "series": series,
                "time_window_days": time_window_days,
                "lone_partners": lone_partners,
                "gsd": gsd,
            },
            "quality": quality.report(),
            "source": str(src.resolve()),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }

    def nothing_kept() -> DataError:
        dropped = quality.report()["tiles_dropped"]
        return DataError(
            f"no tile of {src} was kept: {summary['tiles_skipped']} tiles had less than "
            f"min_valid={min_valid} valid pixels, {dropped['nodata']} more nodata than "
            f"max_nodata_fraction={max_nodata_fraction} and {dropped['cloud']} more cloud than "
            f"max_cloud_fraction={max_cloud_fraction}; lower --min-valid or --tile-size, or "
            "raise the thresholds"
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
    lacking = {s: n for s, n in summary["missing"].items() if n}
    if lacking:
        warnings.warn(
            f"{out}: of {summary['samples']} samples, "
            + ", ".join(f"{n} lack {s}" for s, n in lacking.items())
            + " (kept, with present=False)",
            stacklevel=2,
        )
    return summary


def _group_tiles(
    scene: GroupScene,
    bands: dict[str, tuple[Band, ...]],
    series: bool,
    tile_size: int,
    min_valid: float,
    quality: QualityFilter,
    keys: set[str],
    summary: dict,
) -> Iterator[dict]:
    group = scene.group
    arrays = {s: _stack(read, series) for s, read in scene.scenes.items()}
    fills = {s: _fill(read[0]) for s, read in scene.scenes.items()}
    anchor = scene.scenes[group.anchor][0]
    for row in range(0, scene.grid.height, tile_size):
        for col in range(0, scene.grid.width, tile_size):
            window = (row, col, tile_size, tile_size)
            views = {s: _crop(*arrays[s], fills[s], window) for s in arrays}
            anchor_valid = views[group.anchor][1]  # [(T,) C, h, w]
            if anchor_valid.mean() < min_valid:
                summary["tiles_skipped"] += 1
                continue
            if not quality.keeps(window, anchor_valid[0] if series else anchor_valid):
                continue
            # A sensor with no valid pixel in this tile is absent from it.
            views = {s: v for s, v in views.items() if v[1].any()}
            if not views:
                summary["tiles_skipped"] += 1
                continue
            key = unique_key(f"{group.name}_r{row}_c{col}", keys)
            meta = {
                "id": key,
                "crs": anchor.crs,
                "bounds": list(anchor.window_bounds(*window)),
                "source": anchor.source,
                "window": list(window),
                "footprint": group.footprint,
                "anchor": group.anchor,
                "sensors": {
                    s: _sensor_meta(s, bands[s], scene, views.get(s), series, tile_size)
                    for s in bands
                },
            }
            for s in bands:
                summary["present" if s in views else "missing"][s] += 1
            stored = {
                s: (stored_array(image, valid, scene.scenes[s][0].source), valid)
                for s, (image, valid) in views.items()
            }
            yield encode_group(key, stored, meta)


def _fill(scene: Scene) -> float:
    return scene.nodata if scene.nodata is not None else np.nan


def _crop(
    image: np.ndarray, valid: np.ndarray, fill: float, window: tuple[int, int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """A tile of [..., H, W] arrays; pixels past the grid's edge are invalid and hold ``fill``."""
    row, col, size, _ = window
    h, w = min(size, image.shape[-2] - row), min(size, image.shape[-1] - col)
    tile = np.full((*image.shape[:-2], size, size), fill, dtype=image.dtype)
    mask = np.zeros(tile.shape, dtype=bool)
    tile[..., :h, :w] = image[..., row : row + h, col : col + w]
    mask[..., :h, :w] = valid[..., row : row + h, col : col + w]
    return tile, mask


def _sensor_meta(
    sensor: str,
    bands: tuple[Band, ...],
    scene: GroupScene,
    view: tuple[np.ndarray, np.ndarray] | None,
    series: bool,
    tile_size: int,
) -> dict:
    registry = get_sensor(sensor)
    read = scene.scenes.get(sensor, ()) if view is not None else ()
    frames = (len(scene.group.members[sensor]),) if series else ()
    times = [s.time for s in read]
    return {
        "present": view is not None,
        "shape": [*frames, len(bands), tile_size, tile_size],
        "band_ids": [b.band_id for b in bands],
        "wavelengths": [b.wavelength for b in bands],
        "bandwidths": [b.bandwidth for b in bands],
        # The grid's pixel size: every sensor of a sample is on the anchor's grid.
        "gsd": scene.scenes[scene.group.anchor][0].gsd,
        "time": (times if series else times[0]) if read else None,
        "source": [s.source for s in read] if series else (read[0].source if read else None),
        "scale": registry.scale,
        "offset": registry.offset,
        "units": registry.units,
        "nodata": read[0].nodata if read else None,
    }
