"""BigEarthNet v2 (reBEN): multi-label Sentinel-2 L2A (+ optional Sentinel-1) patches from the LMDB.

Files read from ``ROOT`` (see ``shared/data/bigearthnet_s1s2/README.txt``):

* ``metadata.parquet``: one row per patch with ``patch_id`` (the S2 patch name), ``labels`` (list
  of names of the 19-class nomenclature), ``split`` (``train``/``validation``/``test``) and
  ``s1_name`` (the LMDB key of the paired Sentinel-1 patch).
* ``metadata_for_patches_with_snow_cloud_or_shadow.parquet`` (same columns): patches the dataset
  excludes from its splits; read only with ``include_snow_cloud=True``.
* ``BigEarthNet-V2-LMDB/``: an LMDB whose value under each patch name is a safetensors dict of
  per-band arrays: S2 ``B01`` .. ``B12`` uint16 at 120x120 (10 m), 60x60 (20 m) or 20x20 (60 m);
  S1 ``VV``, ``VH`` float32 dB at 120x120.

Band order: ``S2L2A:B01, B02, B03, B04, B05, B06, B07, B08, B8A, B09, B11, B12`` (the registry's
canonical L2A order, 12 bands), then with ``s1=True`` ``S1GRD:VV, S1GRD:VH``. Bands below 10 m are
brought to 120x120 by nearest-neighbour upsampling (each pixel repeated 2x2 or 6x6), the
dataset's own convention (ConfigILM's BENv2 loader: ``stack_and_interpolate(...,
upsample_mode="nearest")``), so no value is invented between pixels.

Labels: multi-hot [N, 19] float32 over ``CLASS_NAMES``, the 19 classes in the order of the
BigEarthNet 19-class nomenclature paper (Sumbul et al. 2021; ConfigILM's lex-sorted order would
differ). Split rule: the parquet's ``split`` column, ``train`` for train and ``test_split``
(``test`` or ``validation``) for test, each in parquet row order; ``split_hash`` follows
``labelled.ids_split_hash`` over the patch ids. Normalisation statistics come from the train
patches only.

Needs ``lmdb``, ``pyarrow`` and ``safetensors`` (install requirements of eoforge).
"""

from __future__ import annotations

from pathlib import Path

import lmdb
import numpy as np
import pyarrow.parquet as pq
from safetensors.numpy import load

from eoforge.datasets.errors import DataError
from eoforge.datasets.labelled import LabelledSplit, ids_split_hash, normalise_stacks
from eoforge.datasets.sensors import get_sensor

METADATA = "metadata.parquet"
SNOW_CLOUD_METADATA = "metadata_for_patches_with_snow_cloud_or_shadow.parquet"
LMDB_FOLDER = "BigEarthNet-V2-LMDB"
SIZE = 120
S2_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")
S1_BANDS = ("VV", "VH")
CLASS_NAMES = (
    "Urban fabric",
    "Industrial or commercial units",
    "Arable land",
    "Permanent crops",
    "Pastures",
    "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas",
    "Broad-leaved forest",
    "Coniferous forest",
    "Mixed forest",
    "Natural grassland and sparsely vegetated areas",
    "Moors, heathland and sclerophyllous vegetation",
    "Transitional woodland, shrub",
    "Beaches, dunes, sands",
    "Inland wetlands",
    "Coastal wetlands",
    "Inland waters",
    "Marine waters",
)


def load_bigearthnet(
    root: str | Path,
    *,
    s1: bool = False,
    test_split: str = "test",
    include_snow_cloud: bool = False,
) -> LabelledSplit:
    """Read the BigEarthNet v2 LMDB and parquet metadata under ``root`` (module docstring).

    Args:
        root: folder holding ``metadata.parquet`` and ``BigEarthNet-V2-LMDB/``.
        s1: append the paired Sentinel-1 VV and VH bands after the 12 S2 bands.
        test_split: the parquet split used as test: ``"test"`` or ``"validation"``.
        include_snow_cloud: also read the patches of the snow/cloud/shadow metadata file.

    Returns:
        A ``"multilabel"`` split: x [N, 12 (+2), 120, 120] float32, y [N, 19] float32.

    Raises:
        DataError: naming the file, patch or band at fault.
    """
    if test_split not in ("test", "validation"):
        raise ValueError(f"test_split={test_split!r} must be 'test' or 'validation'")
    root = Path(root)
    files = [root / METADATA] + ([root / SNOW_CLOUD_METADATA] if include_snow_cloud else [])
    rows: list[dict] = []
    for path in files:
        if not path.is_file():
            raise DataError(
                f"{path} not found; point the dataset at the BigEarthNet v2 folder holding "
                f"{METADATA} and {LMDB_FOLDER}/ (e.g. shared/data/bigearthnet_s1s2/"
                "v2_lmdb_configilm_mock)"
            )
        table = pq.read_table(path, columns=["patch_id", "labels", "split", "s1_name"])
        rows += table.to_pylist()
    if not (root / LMDB_FOLDER).is_dir():
        raise DataError(f"{root / LMDB_FOLDER} not found: the LMDB of the image patches")
    split_rows = {name: [r for r in rows if r["split"] == name] for name in ("train", test_split)}
    for name, chosen in split_rows.items():
        if not chosen:
            raise DataError(f"{files[0]}: no patch has split {name!r}")
    sensor_bands = [get_sensor("S2L2A").band(b) for b in S2_BANDS]
    if s1:
        sensor_bands += [get_sensor("S1GRD").band(b) for b in S1_BANDS]
    env = lmdb.open(str(root / LMDB_FOLDER), readonly=True, lock=False)
    try:
        with env.begin() as txn:
            images = {
                name: np.stack([_read_patch(txn, row, s1, root / LMDB_FOLDER) for row in chosen])
                for name, chosen in split_rows.items()
            }  # [N, C, 120, 120] float32 each
    finally:
        env.close()
    band_ids = [band.band_id for band in sensor_bands]
    x_train, x_test, stats = normalise_stacks(
        images["train"], images[test_split], band_ids, root / LMDB_FOLDER
    )
    ids = {name: [r["patch_id"] for r in chosen] for name, chosen in split_rows.items()}
    y = {name: _multi_hot(chosen, files[0]) for name, chosen in split_rows.items()}
    return LabelledSplit(
        x_train=x_train,
        y_train=y["train"],
        x_test=x_test,
        y_test=y[test_split],
        band_ids=band_ids,
        wavelengths=np.array([band.wavelength for band in sensor_bands], dtype=np.float32),
        class_names=list(CLASS_NAMES),
        task="multilabel",
        split_hash=ids_split_hash(ids["train"], ids[test_split]),
        stats=stats,
        train_ids=ids["train"],
        test_ids=ids[test_split],
    )


def upsample(band: np.ndarray, size: int, name: str, patch: str) -> np.ndarray:
    """[h, w] -> [size, size] by repeating every pixel ``size / h`` times (nearest neighbour)."""
    factor = size // band.shape[0]
    if band.shape[0] != band.shape[1] or factor * band.shape[0] != size:
        raise DataError(
            f"patch {patch}: band {name} is {band.shape}, which does not tile {size}x{size}"
        )
    return np.repeat(np.repeat(band, factor, axis=0), factor, axis=1)


def _read_patch(txn, row: dict, s1: bool, lmdb_path: Path) -> np.ndarray:
    """The patch's bands [C, 120, 120] float32 in the documented band order."""
    keys = [(row["patch_id"], S2_BANDS)] + ([(row["s1_name"], S1_BANDS)] if s1 else [])
    channels = []
    for key, names in keys:
        value = txn.get(key.encode()) if key else None
        if value is None:
            raise DataError(f"{lmdb_path}: no entry for patch {key!r} (of {row['patch_id']})")
        arrays = load(value)
        for name in names:
            if name not in arrays:
                raise DataError(
                    f"{lmdb_path}: patch {key} has no band {name} (has {', '.join(sorted(arrays))})"
                )
            channels.append(upsample(arrays[name], SIZE, name, key).astype(np.float32))
    return np.stack(channels)


def _multi_hot(rows: list[dict], path: Path) -> np.ndarray:
    """[N, 19] float32 multi-hot of the rows' label names."""
    index = {name: k for k, name in enumerate(CLASS_NAMES)}
    out = np.zeros((len(rows), len(CLASS_NAMES)), dtype=np.float32)
    for n, row in enumerate(rows):
        for label in row["labels"]:
            if label not in index:
                raise DataError(
                    f"{path}: patch {row['patch_id']} has label {label!r}, which is not one of "
                    "the 19 BigEarthNet v2 classes"
                )
            out[n, index[label]] = 1.0
    return out
