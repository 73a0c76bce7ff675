"""Bi-temporal change detection: before/after image pairs with sparse change reference.

Two layouts are read:

* **Landsat Taizhou / Nanjing** (``shared/data/landsat_tm_change_detection_taizhou_nanjing``):
  a scene folder holding two ENVI BSQ images (uint8, 6 bands) and ``change.bmp`` /
  ``unchanged.bmp`` (non-zero = a reference pixel of that class; all other pixels unlabelled).
  Taizhou is Landsat 7 ETM+ (``2000TM`` before, ``2003TM`` after; sensor ``LANDSAT7ETM``), Nanjing
  is Landsat 5 TM (``LT5...2000124...`` before, ``LT5...2002193...`` after; ``LANDSAT5TM``).
* **Generic GeoTIFF pairs**: a folder holding ``before.tif``, ``after.tif`` (multi-band, same
  bands) and ``mask.tif`` (one band: 0 = unchanged, any other value = changed, the file's nodata
  value = unlabelled). ``after.tif`` is read onto ``before.tif``'s grid (``geotiff.read_scene``).

Band order: the files' band order. ENVI files name each band in their header ("... (Band 4) ..."),
which maps band k to the registry's ``<SENSOR>:B<k>``: ``LANDSAT7ETM:B1, B2, B3, B4, B5, B7`` for
Taizhou and ``LANDSAT5TM:B1, B2, B3, B4, B5, B7`` for Nanjing. GeoTIFF bands follow
``geotiff.discover_scenes`` for the given ``sensor`` (band descriptions, else ``bands`` in file
order, else the sensor's canonical order).

Samples: the scene is cut into non-overlapping ``tile`` x ``tile`` tiles (zero-padded past the
scene's bottom/right edge, where labels are -1); every tile holding a reference pixel is a sample:
``x`` [N, 2, C, tile, tile] (before, after), ``y`` [N, tile, tile] int64 with 1 = changed,
0 = unchanged, -1 = unlabelled (also where a band is invalid on either date).

Split rule (spatially blocked, as for Indian Pines): ``labelled.blocked_split`` cuts the scene
into blocks of ``block_size`` pixels (a multiple of ``tile``, so each tile lies in one block),
draws ``train_fraction`` of them for train with a seeded rng and keeps the draw whose
changed/unchanged mix is most alike in both splits; a tile goes to its block's split, so no train
and test tile share a pixel. Sample ids are ``<scene>:<row>_<col>`` (tile origin; the scene is
``pair`` for GeoTIFF pairs, so moving their folder keeps the hash); ``split_hash`` follows
``labelled.ids_split_hash``. Normalisation statistics come from the valid pixels of the
train blocks, both dates pooled per band (the two dates share band ids); invalid pixels become 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import RasterioIOError

from eoforge.datasets.errors import DataError
from eoforge.datasets.geotiff import discover_scenes, read_scene
from eoforge.datasets.labelled import (
    TEST,
    TRAIN,
    LabelledSplit,
    blocked_split,
    blocked_tiles,
    check_tiling,
    ids_split_hash,
    normalise,
    train_stats,
)
from eoforge.datasets.sensors import Band, get_sensor

CHANGED_FILE, UNCHANGED_FILE = "change.bmp", "unchanged.bmp"
BEFORE, AFTER, MASK = "before.tif", "after.tif", "mask.tif"
CLASS_NAMES = ("unchanged", "changed")
_ENVI_BAND = re.compile(r"\(Band (\d+)\)")


@dataclass(frozen=True)
class LandsatScene:
    """A scene folder of the Taizhou/Nanjing layout: its folder, image files and sensor."""

    folder: str
    before: str
    after: str
    sensor: str


SCENES = {
    "taizhou": LandsatScene("Taizhou", "2000TM", "2003TM", "LANDSAT7ETM"),
    "nanjing": LandsatScene(
        "Nanjing", "LT51200382000124BJC00_Nanjing", "LT51200382002193BJC00_Nanjing", "LANDSAT5TM"
    ),
}


@dataclass(frozen=True)
class _Pair:
    image: np.ndarray  # [2, C, H, W] raw values
    valid: np.ndarray  # [2, C, H, W] bool
    labels: np.ndarray  # [H, W] int: 0 unlabelled, 1 unchanged, 2 changed
    bands: list[Band]
    name: str
    source: Path


def load_change_pairs(
    root: str | Path,
    *,
    scene: str | None = None,
    sensor: str | None = None,
    bands: list[str] | None = None,
    tile: int = 32,
    block_size: int = 96,
    train_fraction: float = 0.6,
    seed: int = 0,
) -> LabelledSplit:
    """Read a change pair under ``root`` and cut the tiled, spatially blocked split.

    Args:
        root: a Taizhou/Nanjing scene folder, their parent folder (with ``scene``), or a folder
            holding ``before.tif``, ``after.tif`` and ``mask.tif``.
        scene: ``"taizhou"`` or ``"nanjing"`` (None: inferred from ``root``'s layout).
        sensor: registry sensor of a GeoTIFF pair (required for that layout).
        bands: the GeoTIFF pair's band names in file order, where the files do not describe them.
        tile: side of the square tiles that become samples.
        block_size: side of the blocks assigned to train or test (a multiple of ``tile``).
        train_fraction: share of the blocks that go to train.
        seed: seeds the block assignment.

    Returns:
        A ``"change"`` split: x [N, 2, C, tile, tile] float32, y [N, tile, tile] int64.

    Raises:
        DataError: naming the folder, file or band at fault.
    """
    check_tiling(tile, block_size, train_fraction)
    pair = _read_pair(Path(root), scene, sensor, bands)
    split_map, _ = blocked_split(
        pair.labels, 1, block_size, train_fraction, np.random.default_rng(seed), pair.source
    )
    band_ids = [band.band_id for band in pair.bands]
    train_pixels = (split_map == TRAIN) & pair.valid.all(axis=(0, 1))  # [H, W]
    values = np.concatenate([pair.image[t][:, train_pixels].T for t in range(2)])  # [2M, C]
    stats = train_stats(values, band_ids, pair.source)
    normed = np.moveaxis(normalise(np.moveaxis(pair.image, 1, -1), stats, band_ids), -1, 1)
    normed[~pair.valid] = 0.0  # [2, C, H, W]
    labels = np.where(pair.valid.all(axis=(0, 1)), pair.labels.astype(np.int64) - 1, -1)
    out, ids = blocked_tiles(normed, labels, split_map, tile, prefix=f"{pair.name}:")
    return LabelledSplit(
        x_train=out[TRAIN][0],
        y_train=out[TRAIN][1],
        x_test=out[TEST][0],
        y_test=out[TEST][1],
        band_ids=band_ids,
        wavelengths=np.array([band.wavelength for band in pair.bands], dtype=np.float32),
        class_names=list(CLASS_NAMES),
        task="change",
        split_hash=ids_split_hash(ids[TRAIN], ids[TEST]),
        stats=stats,
        train_ids=ids[TRAIN],
        test_ids=ids[TEST],
    )


def _read_pair(root: Path, scene: str | None, sensor: str | None, bands) -> _Pair:
    if scene is None and (root / BEFORE).is_file():
        if sensor is None:
            raise DataError(f"{root}: a GeoTIFF change pair needs sensor= (e.g. 'S2L2A')")
        return _read_geotiff_pair(root, sensor, bands)
    if scene is None:
        scene = next((k for k, s in SCENES.items() if s.folder.lower() == root.name.lower()), None)
    if scene is None:
        raise DataError(
            f"{root}: neither {BEFORE}/{AFTER}/{MASK} nor a known scene folder "
            f"({', '.join(s.folder for s in SCENES.values())}); pass scene= or check the path"
        )
    if scene not in SCENES:
        raise DataError(f"unknown change scene {scene!r}; known scenes: {', '.join(SCENES)}")
    layout = SCENES[scene]
    folder = root if root.name.lower() == layout.folder.lower() else root / layout.folder
    if not folder.is_dir():
        raise DataError(f"{folder} not found; point the dataset at the {layout.folder} folder")
    images = [_read_envi(folder / name, layout.sensor) for name in (layout.before, layout.after)]
    (before, before_bands), (after, after_bands) = images
    if before_bands != after_bands or before.shape != after.shape:
        raise DataError(
            f"{folder}: {layout.before} and {layout.after} differ in bands or size "
            f"({before.shape} vs {after.shape})"
        )
    masks = [
        _read_mask(folder / name, before.shape[1:]) != 0 for name in (UNCHANGED_FILE, CHANGED_FILE)
    ]
    if (masks[0] & masks[1]).any():
        raise DataError(f"{folder}: pixels marked both changed and unchanged")
    labels = masks[0] * 1 + masks[1] * 2  # [H, W]
    image = np.stack([before, after])
    return _Pair(image, np.ones(image.shape, bool), labels, before_bands, scene, folder)


def _read_envi(path: Path, sensor_name: str) -> tuple[np.ndarray, list[Band]]:
    """An ENVI image [C, H, W] and its bands, named by the header's "(Band k)" descriptions."""
    sensor = get_sensor(sensor_name)
    try:
        with rasterio.open(path) as ds:
            image, descriptions = ds.read(), ds.descriptions
    except RasterioIOError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    bands = []
    for k, description in enumerate(descriptions, start=1):
        match = _ENVI_BAND.search(description or "")
        band = sensor.find(f"B{match.group(1)}") if match else None
        if band is None:
            raise DataError(
                f"{path}: band {k} ({description!r}) names no {sensor.name} band "
                f"({', '.join(sensor.band_names)})"
            )
        bands.append(band)
    return image, bands


def _read_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """Band 1 of a mask file [H, W], checked against the image size."""
    if not path.is_file():
        raise DataError(f"{path} not found: the change reference mask")
    with rasterio.open(path) as ds:
        mask = ds.read(1)
    if mask.shape != tuple(shape):
        raise DataError(f"{path} is {mask.shape} but the images are {tuple(shape)}")
    return mask


def _read_geotiff_pair(root: Path, sensor: str, bands) -> _Pair:
    scenes = []
    for name in (BEFORE, AFTER):
        try:
            found = discover_scenes(root, sensor, bands=bands, pattern=name)
        except DataError as exc:
            raise DataError(f"{root / name}: {exc}") from exc
        scenes.append(found[0])
    before = read_scene(scenes[0])
    after = read_scene(scenes[1], grid=before.grid)
    with rasterio.open(root / MASK) as ds:
        nodata = ds.nodata
    mask = _read_mask(root / MASK, before.image.shape[1:])
    labelled = np.ones(mask.shape, bool) if nodata is None else mask != nodata
    labels = np.where(labelled, np.where(mask == 0, 1, 2), 0)  # [H, W]
    image = np.stack([before.image, after.image]).astype(np.float64)  # [2, C, H, W]
    valid = np.stack([before.valid, after.valid])
    return _Pair(image, valid, labels, list(before.bands), "pair", root)
