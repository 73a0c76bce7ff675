"""What the trained protocols (``finetune``, ``segmentation``, ``change``) share: their options,
and running one on a release or on a bench split around the protocol's own ``train`` function,
``train(encoder, data, loaded, seed, **training) -> (scores, trained)`` (``trained`` holds the
per-epoch ``train_loss`` and the trained encoder copy)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass
class TrainedOptions:
    """Options of the trained protocols.

    Attributes:
        seed: seeds the split (where the dataset's split is seeded) and the training.
        frozen: train the head only (``--frozen`` on the command line).
        epochs: passes over the training split.
        lr: peak learning rate (default: the protocol's own).
        layer_decay: layer-wise learning-rate decay of the encoder.
        batch_size: images per step.
    """

    seed: int = 0
    frozen: bool = False
    epochs: int = 30
    lr: float | None = None
    layer_decay: float = 0.75
    batch_size: int = 16


def run_trained(
    protocol: str,
    tasks: tuple[str, ...],
    train: Callable,
    release: str | Path,
    dataset: str,
    options: TrainedOptions,
    *,
    device: str | None,
    progress: bool,
    out: str | Path | None,
    dataset_options: dict,
) -> dict:
    """Train a head, and the encoder unless ``options.frozen``, with layer-wise lr decay, then
    score with ``train``; training runs where the encoder is (``device``).

    Raises:
        DataError: when the dataset's task is none of ``tasks``.
    """
    from eoforge.datasets.errors import DataError
    from eoforge.finetune.evaluate import dataset_release, load_split, report
    from eoforge.finetune.features import resolve_device

    data = load_split(dataset, options.seed, **dataset_options)
    if data.task not in tasks:
        raise DataError(
            f"{dataset} is a {data.task} dataset; {protocol} needs {' or '.join(tasks)}"
        )
    loaded = dataset_release(release, data)
    loaded.encoder.to(resolve_device(device))
    training = dict(
        frozen=options.frozen,
        epochs=options.epochs,
        layer_decay=options.layer_decay,
        batch_size=options.batch_size,
    )
    training |= {"progress": progress, **({"lr": options.lr} if options.lr else {})}
    scores, trained = train(loaded.encoder, data, loaded, options.seed, **training)
    result = {
        "protocol": protocol,
        **scores,
        "frozen": options.frozen,
        "epochs": options.epochs,
        "layer_decay": options.layer_decay,
        "final_train_loss": trained.train_loss[-1],
        "device": str(next(loaded.encoder.parameters()).device),
    }
    return report(result, release, dataset, data, loaded, options.seed, out, progress)


def trained_cell(protocol: str, tasks: tuple[str, ...], train: Callable, split, seed, training):
    """A bench cell of a trained protocol: ``train`` on the split's encoder with the suite's
    ``training`` options; its float scores are the cell's metrics."""
    from eoforge.datasets.errors import DataError

    data = split.data
    if data.task not in tasks:
        raise DataError(f"{protocol} needs {' or '.join(tasks)}, not {data.task}")
    scores, trained = train(split.model, data, split.loaded, seed, **training)
    return {
        "metrics": {k: v for k, v in scores.items() if isinstance(v, float)},
        "details": {"final_train_loss": trained.train_loss[-1]},
    }
