"""Evaluation protocols over a release: ``run_linear`` (a linear probe) and ``run_knn`` (weighted
kNN) score its frozen features; ``run_trained`` finetunes it (classification and multilabel),
or trains a segmentation or change-detection decoder on it, frozen or not.

Datasets are named ``NAME:ROOT`` (``indian_pines:/data/indian_pines_aviris``); ``DATASETS`` maps
each name to its adapter, which returns a ``PixelSplit``-like object (normalised ``x_train``/
``x_test`` [N, C, H, W], labels, ``band_ids``, ``wavelengths``, ``class_names``, ``split_hash``).
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch

from eoforge.datasets.errors import DataError
from eoforge.datasets.labelled import EVAL_DATASETS, loader_options
from eoforge.finetune.dense import train_change, train_segmentation
from eoforge.finetune.features import extract_features, resolve_device
from eoforge.finetune.finetune import finetune_classifier
from eoforge.finetune.knn import knn_probe
from eoforge.finetune.linear import DEFAULT_LRS, DEFAULT_WEIGHT_DECAYS, linear_probe
from eoforge.models import load_release
from eoforge.models.release import Release

DATASETS: Mapping[str, Callable] = MappingProxyType(EVAL_DATASETS)


def parse_dataset(dataset: str) -> tuple[Callable, str, str]:
    """``"NAME:ROOT"`` -> (adapter, name, root); names the known datasets when it cannot."""
    name, sep, root = dataset.partition(":")
    if name not in DATASETS:
        raise DataError(
            f"unknown dataset {name!r} in {dataset!r}; known datasets: {', '.join(sorted(DATASETS))}"
        )
    if not sep or not root:
        raise DataError(f"dataset {dataset!r} names no folder; write it as '{name}:/path/to/data'")
    return DATASETS[name], name, root


def load_split(dataset: str, seed: int, **options):
    """The split of ``"NAME:ROOT"`` for ``seed`` (passed where the dataset's split is seeded),
    with the dataset's own ``options``.

    Raises:
        DataError: naming the options the dataset does not take, and those it does.
    """
    adapter, name, root = parse_dataset(dataset)
    accepted = loader_options(name)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise DataError(
            f"dataset {name} takes no option(s) {unknown}; its options: {sorted(accepted)}"
        )
    if "seed" in accepted:
        options["seed"] = seed
    return adapter(root, **options)


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
    device: str | None = None,
    **options,
) -> tuple[object, Release, dict[str, torch.Tensor], dict]:
    """(the dataset split, the release, {"train", "test": features [N, 2D]}, the extraction's
    {device, feature_images_per_s}) of a frozen probe; ``options`` go to the dataset's loader."""
    data = load_split(dataset, seed, **options)
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


def run_linear(
    release: str | Path,
    dataset: str,
    *,
    seed: int = 0,
    batch_size: int = 256,
    device: str | None = None,
    lrs: Sequence[float] = DEFAULT_LRS,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    progress: bool = True,
    out: str | Path | None = None,
    **options,
) -> dict:
    """Linear probe of a release's frozen encoder on a dataset: a grid of learning rates and
    weight decays trained in one pass, selected on a held-out share of train.

    Inputs are normalised with the dataset's train-split statistics.

    Args:
        release: release folder.
        dataset: ``"NAME:ROOT"``, NAME one of ``DATASETS``.
        seed: seeds the split (where the dataset's split is seeded), the caps and the probe.
        batch_size: images per forward pass of the encoder.
        device: where the encoder runs (``features.resolve_device``: default CUDA when present);
            features are extracted under bf16 autocast on CUDA, in fp32 on the CPU.
        lrs, weight_decays: the probe's grid (``linear.DEFAULT_LRS``, ``DEFAULT_WEIGHT_DECAYS``);
            on the command line ``lrs=[0.3,1,3]``.
        progress: show progress bars and print the result.
        out: if given, the result is also written there as JSON.
        options: the dataset loader's options, e.g. Indian Pines' ``window`` (a multiple of the
            encoder's patch size), ``max_train``, ``max_test``.

    Returns:
        {protocol, dataset, release, accuracy, majority_baseline, test_majority_share, best_lr,
        best_weight_decay, val_accuracy, per_class_accuracy, n_train, n_test, n_classes, seed,
        split_hash, band_policy, normalisation, window, features, device, feature_images_per_s}.
    """
    data, loaded, features, speed = frozen_features(
        release, dataset, seed=seed, batch_size=batch_size, progress=progress, device=device,
        **options,
    )  # fmt: skip
    if data.task != "classification":
        raise DataError(
            f"{dataset} is a {data.task} dataset; the linear probe scores single-label "
            "classification (multilabel: eoforge eval knn)"
        )
    probe = linear_probe(
        features["train"],
        torch.from_numpy(data.y_train),
        features["test"],
        torch.from_numpy(data.y_test),
        n_classes=len(data.class_names),
        seed=seed,
        lrs=lrs,
        weight_decays=weight_decays,
        progress=progress,
    )
    result = {
        "protocol": "linear",
        "accuracy": probe.accuracy,
        "majority_baseline": probe.majority_baseline,
        "test_majority_share": probe.test_majority_share,
        "best_lr": probe.best_lr,
        "best_weight_decay": probe.best_weight_decay,
        "lr_at_grid_edge": probe.lr_at_grid_edge,
        "val_accuracy": probe.val_accuracy,
        "per_class_accuracy": {
            data.class_names[c]: acc for c, acc in sorted(probe.per_class_accuracy.items())
        },
        **speed,
    }
    return _report(result, release, dataset, data, loaded, seed, out, progress)


def run_knn(
    release: str | Path,
    dataset: str,
    *,
    seed: int = 0,
    k: int | None = None,
    batch_size: int = 256,
    device: str | None = None,
    progress: bool = True,
    out: str | Path | None = None,
    **options,
) -> dict:
    """Weighted kNN of a release's frozen features (``knn.knn_probe``: cosine, k = min(20, train
    size), votes weighted by exp(similarity / 0.07)); arguments as ``run_linear``'s, plus ``k``.
    Single-label datasets are scored by accuracy, multilabel ones by mAP (micro and macro).

    Returns:
        {protocol, accuracy, balanced_accuracy, majority_baseline, test_majority_share, k,
        temperature, per_class_accuracy} (multilabel: {protocol, map_micro, map_macro,
        per_class_ap, no_positive, k, temperature}) and the provenance fields of ``run_linear``.
    """
    data, loaded, features, speed = frozen_features(
        release, dataset, seed=seed, batch_size=batch_size, progress=progress, device=device,
        **options,
    )  # fmt: skip
    if data.task not in ("classification", "multilabel"):
        raise DataError(f"{dataset} is a {data.task} dataset; kNN scores image labels")
    probe = knn_probe(
        features["train"],
        torch.as_tensor(data.y_train),
        features["test"],
        torch.as_tensor(data.y_test),
        k=k,
        n_classes=len(data.class_names),
    )
    if data.task == "multilabel":
        result = {
            "protocol": "knn",
            "map_micro": probe.map_micro,
            "map_macro": probe.map_macro,
            "per_class_ap": {
                data.class_names[c]: ap for c, ap in sorted(probe.per_class_ap.items())
            },
            "no_positive": [data.class_names[c] for c in probe.no_positive],
            "k": probe.k,
            "temperature": probe.temperature,
            **speed,
        }
        return _report(result, release, dataset, data, loaded, seed, out, progress)
    result = {
        "protocol": "knn",
        "accuracy": probe.accuracy,
        "balanced_accuracy": probe.balanced_accuracy,
        "majority_baseline": probe.majority_baseline,
        "test_majority_share": probe.test_majority_share,
        "k": probe.k,
        "temperature": probe.temperature,
        "per_class_accuracy": {
            data.class_names[c]: acc for c, acc in sorted(probe.per_class_accuracy.items())
        },
        **speed,
    }
    return _report(result, release, dataset, data, loaded, seed, out, progress)


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


def _report(result, release, dataset, data, loaded, seed, out, progress) -> dict:
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


TRAINED_TASKS = {
    "finetune": ("classification", "multilabel"),
    "segmentation": ("segmentation",),
    "change": ("change",),
}


def run_trained(
    protocol: str,
    release: str | Path,
    dataset: str,
    *,
    seed: int = 0,
    frozen: bool = False,
    epochs: int = 30,
    lr: float | None = None,
    layer_decay: float = 0.75,
    batch_size: int = 16,
    device: str | None = None,
    progress: bool = True,
    out: str | Path | None = None,
    **options,
) -> dict:
    """Train a head, and the encoder unless ``frozen``, with layer-wise lr decay, then score:
    ``finetune`` (classification: accuracy; multilabel: mAP micro/macro), ``segmentation``
    (UPerNet-style decoder: mIoU) or ``change`` (siamese encoder: F1 and IoU of the change
    class). Other arguments as ``run_linear``'s (``device`` included: training runs where the
    encoder is); ``lr`` defaults to the protocol's own.

    Raises:
        DataError: when the dataset's task is not the protocol's.
    """
    if protocol not in TRAINED_TASKS:
        raise DataError(f"unknown protocol {protocol!r}; trained protocols: {list(TRAINED_TASKS)}")
    data = load_split(dataset, seed, **options)
    if data.task not in TRAINED_TASKS[protocol]:
        raise DataError(
            f"{dataset} is a {data.task} dataset; {protocol} needs "
            f"{' or '.join(TRAINED_TASKS[protocol])}"
        )
    loaded = dataset_release(release, data)
    loaded.encoder.to(resolve_device(device))
    training = dict(frozen=frozen, epochs=epochs, layer_decay=layer_decay, batch_size=batch_size)
    training |= {"progress": progress, **({"lr": lr} if lr else {})}
    scores, trained = train_and_score(protocol, loaded.encoder, data, loaded, seed, **training)
    result = {
        "protocol": protocol,
        **scores,
        "frozen": frozen,
        "epochs": epochs,
        "layer_decay": layer_decay,
        "final_train_loss": trained.train_loss[-1],
        "device": str(next(loaded.encoder.parameters()).device),
    }
    return _report(result, release, dataset, data, loaded, seed, out, progress)


def train_and_score(protocol: str, encoder, data, loaded: Release, seed: int, **training):
    """Run a trained protocol on ``encoder`` (``loaded`` gives the band ids and wavelengths);
    returns (its scores, the trainer's result with the trained encoder copy)."""
    args = (encoder, data.x_train, data.y_train, data.x_test, data.y_test)
    ids = (loaded.band_ids, loaded.wavelengths)
    n_classes = len(data.class_names)
    if protocol == "finetune":
        multilabel = data.task == "multilabel"
        classes = None if multilabel else n_classes
        trained = finetune_classifier(
            *args, *ids, multilabel=multilabel, n_classes=classes, seed=seed, **training
        )
        if multilabel:
            return {"map_micro": trained.map_micro, "map_macro": trained.map_macro}, trained
        return {"accuracy": trained.accuracy}, trained
    if protocol == "segmentation":
        trained = train_segmentation(*args, n_classes, *ids, seed=seed, **training)
        per_class = {data.class_names[c]: v for c, v in sorted(trained.per_class_iou.items())}
        return {"miou": trained.miou, "per_class_iou": per_class}, trained
    trained = train_change(*args, *ids, seed=seed, **training)
    scores = {"f1": trained.f1, "iou": trained.iou}
    return scores | {"precision": trained.precision, "recall": trained.recall}, trained
