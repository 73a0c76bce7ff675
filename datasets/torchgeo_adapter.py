"""torchgeo datasets as ``LabelledSplit``: a thin wrapper, usable only where torchgeo is installed.

``to_labelled_split`` reads every sample of two map-style datasets that return torchgeo's sample
dicts (``{"image": [C, H, W], "label": class index or multi-hot}`` for classification and
multi-label, ``{"image", "mask": [H, W]}`` for segmentation) into memory and normalises them with
the train images' statistics. ``load_torchgeo`` builds a named ``torchgeo.datasets`` class on
``root`` with ``split="train"`` and ``split="test"`` (no download unless asked).

Band order: what the dataset yields, named by ``bands`` (file band names of ``sensor``) or, where
not given, by the dataset's own ``bands`` attribute, mapped through the registry. torchgeo
datasets differ in band orders between releases (EuroSAT's B8A, for one), so check a dataset's
``bands`` against its files before trusting it. Sample ids are ``<name>:<split>:<index>``;
``split_hash`` follows ``labelled.ids_split_hash``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from eoforge.datasets.errors import DataError
from eoforge.datasets.labelled import LabelledSplit, ids_split_hash, normalise_stacks
from eoforge.datasets.sensors import get_sensor


def to_labelled_split(
    train,
    test,
    *,
    sensor: str,
    bands: Sequence[str],
    task: str,
    class_names: Sequence[str],
    name: str = "dataset",
) -> LabelledSplit:
    """Read two torchgeo-style datasets into a normalised ``LabelledSplit``.

    Args:
        train, test: map-style datasets (``len`` and ``[i]``) of torchgeo sample dicts.
        sensor: registry sensor of the images.
        bands: the images' band names in channel order.
        task: ``"classification"``, ``"multilabel"`` or ``"segmentation"``.
        class_names: the names of the class indices.
        name: prefix of the sample ids (the dataset's name).
    """
    registry = get_sensor(sensor)
    sensor_bands = [registry.band(b) for b in bands]
    key = "mask" if task == "segmentation" else "label"
    images, labels, ids = {}, {}, {}
    for split, dataset in (("train", train), ("test", test)):
        samples = [dataset[i] for i in range(len(dataset))]
        if not samples:
            raise DataError(f"{name}: the {split} split is empty")
        for i, sample in enumerate(samples):
            if "image" not in sample or key not in sample:
                raise DataError(f"{name}: {split} sample {i} has keys {sorted(sample)}, no {key!r}")
        images[split] = np.stack([np.asarray(s["image"], dtype=np.float32) for s in samples])
        labels[split] = np.stack([np.asarray(s[key]) for s in samples])
        ids[split] = [f"{name}:{split}:{i}" for i in range(len(samples))]
        if images[split].shape[1] != len(sensor_bands):
            raise DataError(
                f"{name}: {split} images have {images[split].shape[1]} bands but bands names "
                f"{len(sensor_bands)}: {', '.join(bands)}"
            )
    band_ids = [band.band_id for band in sensor_bands]
    x_train, x_test, stats = normalise_stacks(images["train"], images["test"], band_ids, name)
    dtype = np.float32 if task == "multilabel" else np.int64
    return LabelledSplit(
        x_train=x_train,
        y_train=labels["train"].astype(dtype),
        x_test=x_test,
        y_test=labels["test"].astype(dtype),
        band_ids=band_ids,
        wavelengths=np.array([band.wavelength for band in sensor_bands], dtype=np.float32),
        class_names=list(class_names),
        task=task,
        split_hash=ids_split_hash(ids["train"], ids["test"]),
        stats=stats,
        train_ids=ids["train"],
        test_ids=ids["test"],
    )


def load_torchgeo(
    root: str | Path,
    *,
    name: str,
    sensor: str,
    task: str = "classification",
    bands: Sequence[str] | None = None,
    download: bool = False,
    **kwargs,
) -> LabelledSplit:
    """Build ``torchgeo.datasets.<name>`` on ``root`` (train and test splits) and wrap it.

    Args:
        root: the torchgeo dataset root.
        name: class name in ``torchgeo.datasets`` (``"EuroSAT"``).
        sensor: registry sensor of its images.
        task: the task its labels serve.
        bands: band names in channel order (default: the dataset's ``bands`` attribute).
        download: let torchgeo download the data.
        **kwargs: passed to the dataset class.

    Raises:
        DataError: when torchgeo is missing, the class is unknown or bands cannot be named.
    """
    try:
        import torchgeo.datasets as tgd
    except ImportError as exc:
        raise DataError(
            "the torchgeo dataset adapter needs torchgeo (pip install torchgeo)"
        ) from exc
    cls = getattr(tgd, name, None)
    if cls is None:
        raise DataError(f"torchgeo.datasets has no dataset {name!r}")
    splits = [cls(root=str(root), split=s, download=download, **kwargs) for s in ("train", "test")]
    bands = list(bands or getattr(splits[0], "bands", None) or ())
    if not bands:
        raise DataError(f"torchgeo {name} has no bands attribute; pass bands= in channel order")
    classes = getattr(splits[0], "classes", None)
    if not classes:
        raise DataError(f"torchgeo {name} has no classes attribute to name its labels")
    return to_labelled_split(
        *splits, sensor=sensor, bands=bands, task=task, class_names=classes, name=name
    )
