"""``knn``: weighted kNN on a release's frozen features (``eoforge.finetune.knn.knn_probe``:
cosine, k = min(20, train size), votes weighted by exp(similarity / 0.07)). Single-label datasets
are scored by accuracy, multilabel ones by mAP (micro and macro)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from eoforge.finetune.protocols import Protocol

IMAGE_LABELS = ("classification", "multilabel")


@dataclass
class KnnOptions:
    """Options of ``eoforge eval knn``.

    Attributes:
        seed: seeds the split (where the dataset's split is seeded) and the caps.
        k: neighbours (default min(20, train size)).
        batch_size: images per forward pass of the encoder.
    """

    seed: int = 0
    k: int | None = None
    batch_size: int = 256


def run(
    release: str | Path,
    dataset: str,
    options: KnnOptions,
    *,
    device: str | None,
    progress: bool,
    out: str | Path | None,
    dataset_options: dict,
) -> dict:
    """kNN of ``release``'s frozen features on ``dataset``.

    Returns:
        {protocol, accuracy, balanced_accuracy, majority_baseline, test_majority_share, k,
        temperature, per_class_accuracy} (multilabel: {protocol, map_micro, map_macro,
        per_class_ap, no_positive, k, temperature}) and the provenance fields of
        ``evaluate.report``.
    """
    from eoforge.finetune.evaluate import frozen_features, report

    data, loaded, features, speed = frozen_features(
        release, dataset, seed=options.seed, batch_size=options.batch_size, progress=progress,
        tasks=IMAGE_LABELS, refusal="kNN scores image labels", device=device, **dataset_options,
    )  # fmt: skip
    probe = _probe(data, features["train"], features["test"], options.k)
    names = data.class_names
    if data.task == "multilabel":
        result = {
            "protocol": "knn",
            "map_micro": probe.map_micro,
            "map_macro": probe.map_macro,
            "per_class_ap": {names[c]: ap for c, ap in sorted(probe.per_class_ap.items())},
            "no_positive": [names[c] for c in probe.no_positive],
            "k": probe.k,
            "temperature": probe.temperature,
            **speed,
        }
    else:
        result = {
            "protocol": "knn",
            "accuracy": probe.accuracy,
            "balanced_accuracy": probe.balanced_accuracy,
            "majority_baseline": probe.majority_baseline,
            "test_majority_share": probe.test_majority_share,
            "k": probe.k,
            "temperature": probe.temperature,
            "per_class_accuracy": {
                names[c]: acc for c, acc in sorted(probe.per_class_accuracy.items())
            },
            **speed,
        }
    return report(result, release, dataset, data, loaded, options.seed, out, progress)


def cell(split, seed: int, training: dict) -> dict:
    """A bench cell: kNN on the split's frozen features, with the default k."""
    from eoforge.datasets.errors import DataError

    data = split.data
    if data.task not in IMAGE_LABELS:
        raise DataError(f"knn scores image labels, not {data.task}")
    train, test = split.frozen_features()
    probe = _probe(data, train, test, k=None)
    if data.task == "multilabel":
        metrics = {"map_micro": probe.map_micro, "map_macro": probe.map_macro}
    else:
        metrics = {"accuracy": probe.accuracy, "balanced_accuracy": probe.balanced_accuracy}
    details = {"k": probe.k, "temperature": probe.temperature}
    return split.feature_provenance() | {"metrics": metrics, "details": details}


def _probe(data, train, test, k: int | None):
    import torch

    from eoforge.finetune.knn import knn_probe

    y_train, y_test = torch.as_tensor(data.y_train), torch.as_tensor(data.y_test)
    return knn_probe(train, y_train, test, y_test, k=k, n_classes=len(data.class_names))


PROTOCOL = Protocol(
    name="knn",
    summary="weighted kNN on frozen features",
    tasks=IMAGE_LABELS,
    options=KnnOptions,
    run=run,
    cell=cell,
    example="eoforge eval knn --release runs/demo/release --dataset indian_pines:../shared/data/indian_pines_aviris k=20",
)
