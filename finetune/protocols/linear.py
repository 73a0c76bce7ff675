"""``linear``: a linear probe of a release's frozen encoder (``eoforge.finetune.linear``): a grid of
learning rates and weight decays trained in one pass, selected on a held-out share of train.
Single-label classification only (multilabel datasets: ``knn``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from eoforge.finetune.protocols import Protocol

TASKS = ("classification",)


@dataclass
class LinearOptions:
    """Options of ``eoforge eval linear``.

    Attributes:
        seed: seeds the split (where the dataset's split is seeded), the caps and the probe.
        batch_size: images per forward pass of the encoder.
        lrs, weight_decays: the probe's grid (default ``linear.DEFAULT_LRS``,
            ``DEFAULT_WEIGHT_DECAYS``); on the command line ``lrs=[0.3,1,3]``.
    """

    seed: int = 0
    batch_size: int = 256
    lrs: list[float] | None = None
    weight_decays: list[float] | None = None


def run(
    release: str | Path,
    dataset: str,
    options: LinearOptions,
    *,
    device: str | None,
    progress: bool,
    out: str | Path | None,
    dataset_options: dict,
) -> dict:
    """Linear probe of ``release`` on ``dataset``; inputs normalised with the dataset's
    train-split statistics.

    Returns:
        {protocol, dataset, release, accuracy, majority_baseline, test_majority_share, best_lr,
        best_weight_decay, val_accuracy, per_class_accuracy, n_train, n_test, n_classes, seed,
        split_hash, band_policy, normalisation, window, features, device, feature_images_per_s}.
    """
    from eoforge.finetune.evaluate import frozen_features, report

    data, loaded, features, speed = frozen_features(
        release, dataset, seed=options.seed, batch_size=options.batch_size, progress=progress,
        tasks=TASKS, device=device, **dataset_options,
        refusal="the linear probe scores single-label classification (multilabel: eoforge eval knn)",
    )  # fmt: skip
    result = _probe(data, features["train"], features["test"], options, progress)
    result = {
        "protocol": "linear",
        "accuracy": result.accuracy,
        "majority_baseline": result.majority_baseline,
        "test_majority_share": result.test_majority_share,
        "best_lr": result.best_lr,
        "best_weight_decay": result.best_weight_decay,
        "lr_at_grid_edge": result.lr_at_grid_edge,
        "val_accuracy": result.val_accuracy,
        "per_class_accuracy": {
            data.class_names[c]: acc for c, acc in sorted(result.per_class_accuracy.items())
        },
        **speed,
    }
    return report(result, release, dataset, data, loaded, options.seed, out, progress)


def cell(split, seed: int, training: dict) -> dict:
    """A bench cell: the probe on the split's frozen features, with the default grid; the
    cell's seed seeds the probe's hold-out and shuffling, as ``eval linear seed=`` does, so the
    row agrees with that command and its interval spans the probe too."""
    from eoforge.datasets.errors import DataError

    data = split.data
    if data.task not in TASKS:
        raise DataError(f"linear probe scores single-label classification, not {data.task}")
    train, test = split.frozen_features()
    result = _probe(data, train, test, LinearOptions(seed=seed), progress=False)
    return split.feature_provenance() | {
        "metrics": {"accuracy": result.accuracy},
        "details": {
            "best_lr": result.best_lr,
            "best_weight_decay": result.best_weight_decay,
            "lr_at_grid_edge": result.lr_at_grid_edge,
        },
    }


def _probe(data, train, test, options: LinearOptions, progress: bool):
    import torch

    from eoforge.finetune.linear import DEFAULT_LRS, DEFAULT_WEIGHT_DECAYS, linear_probe

    return linear_probe(
        train,
        torch.as_tensor(data.y_train),
        test,
        torch.as_tensor(data.y_test),
        n_classes=len(data.class_names),
        seed=options.seed,
        lrs=DEFAULT_LRS if options.lrs is None else options.lrs,
        weight_decays=(
            DEFAULT_WEIGHT_DECAYS if options.weight_decays is None else options.weight_decays
        ),
        progress=progress,
    )


PROTOCOL = Protocol(
    name="linear",
    summary="linear probe on frozen features",
    tasks=TASKS,
    options=LinearOptions,
    run=run,
    cell=cell,
    example="eoforge eval linear --release runs/demo/release --dataset indian_pines:../shared/data/indian_pines_aviris seed=1",
)
