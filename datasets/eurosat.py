"""EuroSAT MS (Sentinel-2 L1C, 13 bands, 64x64): scene classification from class folders.

Layout read from ``ROOT`` (see ``shared/data/eurosat_ms_samples/README.txt``):
``EuroSAT_MS/<Class>/<Class>_<id>.tif`` (``ROOT`` may also be the ``EuroSAT_MS`` folder itself),
13-band uint16 GeoTIFFs without band descriptions. The class of an image is its folder's name;
``class_names`` are the folder names, sorted.

Band order: the channels of ``x`` are the file's bands in FILE order, which is NOT the canonical
Sentinel-2 order: B8A is the LAST band of these files (EuroSAT issue #7). ``FILE_BANDS`` maps
file band 1..13 to the registry ids ``S2L1C:B01, B02, B03, B04, B05, B06, B07, B08, B09, B10,
B11, B12, B8A``.

Split rule: seeded and stratified per class (``labelled.stratified_split``): the test split takes
``round(test_fraction * N)`` images (at least one, at most N - 1) spread over the classes in
proportion to their sizes, ties (e.g. one image per class) broken by the seeded permutation.
Sample ids are the image paths relative to the ``EuroSAT_MS`` folder (``Pasture/Pasture_300.tif``);
``split_hash`` follows ``labelled.ids_split_hash``. Normalisation statistics come from the pixels
of the training images only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio

from eoforge.datasets.errors import DataError
from eoforge.datasets.labelled import (
    LabelledSplit,
    ids_split_hash,
    normalise_stacks,
    stratified_split,
)
from eoforge.datasets.sensors import get_sensor

SENSOR = "S2L1C"
FOLDER = "EuroSAT_MS"
FILE_BANDS = (
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
)


def load_eurosat(root: str | Path, *, seed: int = 0, test_fraction: float = 0.2) -> LabelledSplit:
    """Read EuroSAT MS class folders under ``root`` and split them (module docstring).

    Args:
        root: folder holding ``EuroSAT_MS/`` (or that folder itself).
        seed: seeds the stratified split.
        test_fraction: share of the images that go to test.

    Returns:
        A ``"classification"`` split: x [N, 13, 64, 64] float32 in file band order.

    Raises:
        DataError: naming the folder when no class folder holds images, or the file whose band
            count or size differs.
    """
    folder = _folder(Path(root))
    paths = sorted(folder.glob("*/*.tif"))
    if not paths:
        raise DataError(
            f"{folder}: no <Class>/*.tif images found; point the dataset at the folder holding "
            f"{FOLDER}/ (e.g. shared/data/eurosat_ms_samples)"
        )
    class_names = sorted({p.parent.name for p in paths})
    labels = np.array([class_names.index(p.parent.name) for p in paths], dtype=np.int64)
    arrays = [_read(p) for p in paths]
    for path, array in zip(paths, arrays, strict=True):
        if array.shape != arrays[0].shape:
            raise DataError(f"{path} is {array.shape}, but {paths[0]} is {arrays[0].shape}")
    images = np.stack(arrays)  # [N, 13, H, W] uint16
    train, test = stratified_split(labels, test_fraction, np.random.default_rng(seed))
    sensor = get_sensor(SENSOR)
    bands = [sensor.band(name) for name in FILE_BANDS]
    band_ids = [band.band_id for band in bands]
    x_train, x_test, stats = normalise_stacks(images[train], images[test], band_ids, folder)
    ids = [p.relative_to(folder).as_posix() for p in paths]
    train_ids, test_ids = [ids[i] for i in train], [ids[i] for i in test]
    return LabelledSplit(
        x_train=x_train,
        y_train=labels[train],
        x_test=x_test,
        y_test=labels[test],
        band_ids=band_ids,
        wavelengths=np.array([band.wavelength for band in bands], dtype=np.float32),
        class_names=class_names,
        task="classification",
        split_hash=ids_split_hash(train_ids, test_ids),
        stats=stats,
        train_ids=train_ids,
        test_ids=test_ids,
    )


def _folder(root: Path) -> Path:
    if (root / FOLDER).is_dir():
        return root / FOLDER
    if root.is_dir():
        return root
    raise DataError(f"{root} not found; point the dataset at the folder holding {FOLDER}/")


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as ds:
        if ds.count != len(FILE_BANDS):
            raise DataError(
                f"{path} has {ds.count} bands; EuroSAT MS files hold {len(FILE_BANDS)} "
                f"({', '.join(FILE_BANDS)} in file order)"
            )
        return ds.read()  # [13, H, W]
