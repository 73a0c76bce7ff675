"""Evaluation over a release: ``run_protocol`` runs a registered protocol
(``eoforge.finetune.protocols``) on a dataset named ``NAME:ROOT``
(``indian_pines:/data/indian_pines_aviris``, NAME registered in ``eoforge.datasets.eval_datasets``),
with the helpers the protocols share: the split with its typed options, the release loaded for the
dataset's bands, frozen features, and the result's provenance.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

from eoforge.datasets.errors import DataError
from eoforge.datasets.eval_datasets import (
    EVAL_DATASETS,
    dataset_loader,
    dataset_options,
    takes_seed,
)
from eoforge.finetune.features import extract_features, resolve_device
from eoforge.finetune.protocols import get_protocol
from eoforge.launch.config import config_from
from eoforge.models import load_release
from eoforge.models.release import Release


def parse_dataset(dataset: str) -> tuple[str, str]:
    """``"NAME:ROOT"`` -> (name, root); names the known datasets when it cannot."""
    name, sep, root = dataset.partition(":")
    if name not in EVAL_DATASETS:
        raise DataError(
            f"unknown dataset {name!r} in {dataset!r}; known datasets: "
            f"{', '.join(sorted(EVAL_DATASETS))}"
        )
    if not sep or not root:
        raise DataError(f"dataset {dataset!r} names no folder; write it as '{name}:/path/to/data'")
    return name, root


def typed_dataset_options(name: str, options: Mapping[str, object]) -> dict[str, object]:
    """``options`` of dataset ``name`` checked against its adapter's typed options; returns
    those given, typed (the adapter's defaults stay its own).

    Raises:
        DataError: naming the options the dataset does not take, and those it does.
        ConfigError: naming an option of the wrong type, or one the dataset needs and lacks.
    """
    schema = dataset_options(name)
    accepted = {f.name for f in fields(schema)}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise DataError(
            f"dataset {name} takes no option(s) {unknown}; its options: {sorted(accepted)}"
        )
    typed = vars(config_from(schema, options, f"dataset {name}"))
    return {key: typed[key] for key in options}


def load_split(dataset: str, seed: int, **options):
    """The split of ``"NAME:ROOT"`` for ``seed`` (passed where the dataset's split is seeded),
    with the dataset's own ``options`` (``typed_dataset_options``)."""
    name, root = parse_dataset(dataset)
    options = typed_dataset_options(name, options)
    if takes_seed(name):
        options["seed"] = seed
    return dataset_loader(name)(root, **options)


def run_protocol(
    protocol: str,
    release: str | Path,
    dataset: str,
    *,
    device: str | None = None,
    progress: bool = True,
    out: str | Path | None = None,
    **options,
) -> dict:
    """Score ``release`` on ``dataset`` with the registered ``protocol``.

    Args:
        protocol: a name of ``eoforge.finetune.protocols.PROTOCOLS``.
        release: release folder.
        dataset: ``"NAME:ROOT"``, NAME registered in ``eoforge.datasets.eval_datasets``.
        device: where the encoder runs (``features.resolve_device``: default CUDA when present);
            features are extracted under bf16 autocast on CUDA, in fp32 on the CPU.
        progress: show progress bars and print the result.
        out: if given, the result is also written there as JSON.
        options: the protocol's options (its ``options`` dataclass, e.g. ``seed``, ``k``,
            ``epochs``) and the dataset's (e.g. Indian Pines' ``window``, ``max_train``).

    Returns:
        The protocol's result with its provenance (``report``).

    Raises:
        ConfigError: naming an option of the wrong type.
        DataError: naming options neither the protocol nor the dataset takes.
    """
    chosen = get_protocol(protocol)
    own = {f.name for f in fields(chosen.options)}
    typed = config_from(
        chosen.options, {k: v for k, v in options.items() if k in own}, f"eval {protocol}"
    )
    name, _ = parse_dataset(dataset)
    rest = typed_dataset_options(name, {k: v for k, v in options.items() if k not in own})
    return chosen.run(
        release, dataset, typed, device=device, progress=progress, out=out, dataset_options=rest
    )


def dataset_release(release: str | Path, data) -> Release:
    """The release loaded with the dataset's own bands, passed as ``{band_id, wavelength}`` so
    bands it never saw are embedded through its spectral ranges (with a warning) rather than
    refused."""
    bands = [
        {"band_id": band_id, "wavelength": float(wl)}
        for band_id, wl in zip(data.band_ids, data.wavelengths, strict=True)
    ]
    return load_release(release, bands=bands)


def band_policy(band_ids: list[str], card: dict) -> str:
    """How a result row treated the dataset's bands, for the tables."""
    seen = {band["band_id"] for band in card["bands"]}
    unseen = sum(band_id not in seen for band_id in band_ids)
    if unseen:
        return f"interpolated: {unseen} of {len(band_ids)} bands unseen in pretraining"
    return f"native: all {len(band_ids)} bands seen in pretraining"


def frozen_features(
    release: str | Path,
    dataset: str,
    *,
    seed: int,
    batch_size: int,
    progress: bool,
    tasks: tuple[str, ...],
    refusal: str,
    device: str | None = None,
    **options,
) -> tuple[object, Release, dict[str, torch.Tensor], dict]:
    """(the dataset split, the release, {"train", "test": features [N, 2D]}, the extraction's
    {device, feature_images_per_s}) of a frozen probe; ``options`` go to the dataset's loader.

    Raises:
        DataError: ``"<dataset> is a <task> dataset; <refusal>"`` when the dataset's task is
            none of ``tasks``.
    """
    data = load_split(dataset, seed, **options)
    if data.task not in tasks:
        raise DataError(f"{dataset} is a {data.task} dataset; {refusal}")
    loaded = dataset_release(release, data)
    where = resolve_device(device)
    loaded.encoder.to(where)
    patch, size = loaded.encoder.patch_size, data.x_train.shape[-1]
    if size % patch:
        raise DataError(
            f"{dataset}: images of {size} px are not a multiple of the patch size {patch} of "
            f"release {release}; choose a window or tile that is"
        )
    start = time.perf_counter()
    features = {
        split: extract_features(
            loaded.encoder,
            x,
            loaded.band_ids,
            loaded.wavelengths,
            batch_size=batch_size,
            progress=progress,
            desc=f"{dataset.partition(':')[0]} {split} features",
        )
        for split, x in (("train", data.x_train), ("test", data.x_test))
    }
    seconds = time.perf_counter() - start
    n_images = len(data.x_train) + len(data.x_test)
    speed = {"device": str(where), "feature_images_per_s": round(n_images / seconds, 1)}
    return data, loaded, features, speed


# Fewer training samples than this in a class make a probe's score of it mostly chance.
FEW_PER_CLASS = 5


def coverage_warnings(data) -> list[str]:
    """Warnings, also put in the result, where the training split lacks a class the test split
    has, or holds fewer than ``FEW_PER_CLASS`` samples of one (single-label datasets)."""
    if data.task != "classification":
        return []
    train = np.bincount(np.asarray(data.y_train), minlength=len(data.class_names))
    tested = np.unique(np.asarray(data.y_test))
    missing = [data.class_names[c] for c in tested if train[c] == 0]
    few = [f"{data.class_names[c]} ({train[c]})" for c in tested if 0 < train[c] < FEW_PER_CLASS]
    messages = []
    if missing:
        messages.append(
            f"the training split has no sample of test class(es) {', '.join(missing)}: the "
            "probe can never predict them; use a larger split or a dataset option that keeps them"
        )
    if few:
        messages.append(
            f"the training split has fewer than {FEW_PER_CLASS} samples of {', '.join(few)}: "
            "their scores are mostly chance"
        )
    return messages


def report(result, release, dataset, data, loaded, seed, out, progress) -> dict:
    """A probe's result with its provenance and coverage warnings, written to ``out`` and
    printed as asked."""
    notes = coverage_warnings(data)
    for message in notes:
        warnings.warn(f"{dataset}: {message}", stacklevel=3)
    result = result | {
        "warnings": notes,
        "dataset": dataset,
        "release": str(release),
        "n_train": len(data.y_train),
        "n_test": len(data.y_test),
        "n_classes": len(data.class_names),
        "seed": seed,
        "split_hash": data.split_hash,
        "band_policy": band_policy(data.band_ids, loaded.card),
        "normalisation": "train-split statistics (clip p1/p99, scale to [0, 1], z-score)",
        "image_size": list(data.x_train.shape[-2:]),
        "features": "concat(cls, mean of patch tokens)",
    }
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2))
    if progress:
        print(json.dumps(result, indent=2))
    return result
