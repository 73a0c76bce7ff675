"""A user's own labelled images: a folder of multi-band GeoTIFFs and a labels CSV.

The CSV (``labels.csv`` in ``ROOT`` by default) has a ``path`` column (relative to ``ROOT``, or
absolute) and one of:

* ``label``: one class name per image -> task ``"classification"``;
* ``labels``: ``;``-separated class names per image -> ``"multilabel"``;
* several other columns of 0/1 values, one per class -> ``"multilabel"`` (class = column name).

An optional ``split`` column (``train``/``test``) fixes the split; otherwise a seeded split draws
``test_fraction`` of the images for test: class-stratified for classification
(``labelled.stratified_split``), a plain seeded permutation for multi-label. Class names are
sorted (the column order for 0/1 columns).

Band order: the files' band order, mapped to registry ids of ``sensor`` as in
``geotiff.discover_scenes``: band descriptions where every one names a band of the sensor, else
``bands`` (names in file order), else the sensor's canonical order when the file holds all its
bands. Every image must have the same bands and size. Sample ids are the CSV paths;
``split_hash`` follows ``labelled.ids_split_hash``. Normalisation statistics come from the train
images only.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import RasterioIOError

from eoforge.datasets.errors import DataError
from eoforge.datasets.labelled import (
    LabelledSplit,
    ids_split_hash,
    normalise_stacks,
    stratified_split,
)
from eoforge.datasets.sensors import Band, Sensor, get_sensor

SPLITS = ("train", "test")


def load_folder_csv(
    root: str | Path,
    *,
    sensor: str,
    csv_file: str | Path = "labels.csv",
    bands: list[str] | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> LabelledSplit:
    """Read the images listed in ``csv_file`` under ``root`` with their labels (module docstring).

    Args:
        root: folder the CSV paths are relative to.
        sensor: registry sensor of the images (``"S2L2A"``, ``"landsat8"``, ...).
        csv_file: the labels CSV, relative to ``root`` or absolute.
        bands: band names of the files in file order, where the files do not describe them.
        test_fraction: share of the images drawn for test when the CSV has no ``split`` column.
        seed: seeds that draw.

    Returns:
        A ``"classification"`` or ``"multilabel"`` split, x [N, C, H, W] float32.

    Raises:
        DataError: naming the CSV, file or band at fault.
    """
    root = Path(root)
    table = root / csv_file
    paths, labels, class_names, task, fixed = _read_csv(table, root)
    registry = get_sensor(sensor)
    arrays, file_bands = [], None
    for path in paths:
        array, found = _read_image(path, registry, bands)
        if file_bands is not None and (found != file_bands or array.shape != arrays[0].shape):
            raise DataError(
                f"{path} has bands {_names(found)} and size {array.shape}, but {paths[0]} has "
                f"{_names(file_bands)} and {arrays[0].shape}; one split holds one band set and size"
            )
        arrays.append(array)
        file_bands = found
    images = np.stack(arrays)  # [N, C, H, W]
    if fixed is not None:
        train, test = np.flatnonzero(fixed == 0), np.flatnonzero(fixed == 1)
        if not (train.size and test.size):
            raise DataError(f"{table}: the split column leaves train or test empty")
    elif task == "classification":
        train, test = stratified_split(labels, test_fraction, np.random.default_rng(seed))
    else:
        if not 0 < test_fraction < 1 or len(paths) < 2:
            raise DataError(f"{table}: need >= 2 images and test_fraction in (0, 1)")
        n_test = min(max(round(test_fraction * len(paths)), 1), len(paths) - 1)
        perm = np.random.default_rng(seed).permutation(len(paths))
        train, test = np.sort(perm[n_test:]), np.sort(perm[:n_test])
    band_ids = [band.band_id for band in file_bands]
    x_train, x_test, stats = normalise_stacks(images[train], images[test], band_ids, table)
    ids = [p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p) for p in paths]
    train_ids, test_ids = [ids[i] for i in train], [ids[i] for i in test]
    return LabelledSplit(
        x_train=x_train,
        y_train=labels[train],
        x_test=x_test,
        y_test=labels[test],
        band_ids=band_ids,
        wavelengths=np.array([band.wavelength for band in file_bands], dtype=np.float32),
        class_names=class_names,
        task=task,
        split_hash=ids_split_hash(train_ids, test_ids),
        stats=stats,
        train_ids=train_ids,
        test_ids=test_ids,
    )


def _read_csv(table: Path, root: Path):
    """(paths, labels, class_names, task, fixed split [N] int or None) from the labels CSV."""
    if not table.is_file():
        raise DataError(f"{table} not found: the labels CSV (columns path and label or labels)")
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = list(rows[0]) if rows else []
    if "path" not in columns:
        raise DataError(f"{table}: no 'path' column (columns: {', '.join(columns) or 'none'})")
    paths = [Path(r["path"]) if Path(r["path"]).is_absolute() else root / r["path"] for r in rows]
    for path in paths:
        if not path.is_file():
            raise DataError(f"{path} (listed in {table}) not found")
    fixed = None
    if "split" in columns:
        bad = sorted({r["split"] for r in rows} - set(SPLITS))
        if bad:
            raise DataError(f"{table}: split values {bad}; expected {' or '.join(SPLITS)}")
        fixed = np.array([SPLITS.index(r["split"]) for r in rows])
    if "label" in columns:
        class_names = sorted({r["label"] for r in rows})
        labels = np.array([class_names.index(r["label"]) for r in rows], dtype=np.int64)
        return paths, labels, class_names, "classification", fixed
    if "labels" in columns:
        per_row = [[n.strip() for n in r["labels"].split(";") if n.strip()] for r in rows]
        class_names = sorted({n for names in per_row for n in names})
        labels = np.zeros((len(rows), len(class_names)), dtype=np.float32)
        for i, names in enumerate(per_row):
            labels[i, [class_names.index(n) for n in names]] = 1.0
        return paths, labels, class_names, "multilabel", fixed
    class_names = [c for c in columns if c not in ("path", "split")]
    if not class_names:
        raise DataError(f"{table}: no label column ('label', 'labels' or one 0/1 column per class)")
    try:
        labels = np.array([[float(r[c]) for c in class_names] for r in rows], dtype=np.float32)
    except ValueError as exc:
        raise DataError(f"{table}: class columns must hold 0 or 1 ({exc})") from exc
    if not np.isin(labels, (0.0, 1.0)).all():
        raise DataError(f"{table}: class columns {', '.join(class_names)} must hold 0 or 1")
    return paths, labels, class_names, "multilabel", fixed


def _read_image(path: Path, sensor: Sensor, bands: list[str] | None) -> tuple[np.ndarray, list]:
    """The image [C, H, W] and the registry band of each file band."""
    try:
        with rasterio.open(path) as ds:
            image, descriptions = ds.read(), ds.descriptions
    except RasterioIOError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    count = image.shape[0]
    described = [sensor.find(d) if d else None for d in descriptions]
    if all(described):
        return image, described
    if bands is not None:
        if len(bands) != count:
            raise DataError(
                f"{path} has {count} bands but bands names {len(bands)}: {', '.join(bands)}"
            )
        found = []
        for name in bands:
            band = sensor.find(name)
            if band is None:
                raise DataError(
                    f"{path}: band {name!r} is not a band of {sensor.name} (bands: "
                    f"{', '.join(sensor.band_names)})"
                )
            found.append(band)
        return image, found
    if count == len(sensor.bands):
        return image, list(sensor.bands)
    raise DataError(
        f"{path} has {count} bands, which matches neither {sensor.name}'s {len(sensor.bands)} "
        f"bands nor its band descriptions; pass bands= with the file's {count} band names in "
        "file order"
    )


def _names(bands: list[Band]) -> str:
    return ", ".join(band.name for band in bands)
