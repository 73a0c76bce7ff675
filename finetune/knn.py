"""Weighted k-nearest-neighbour classification on frozen features (Wu et al. 2018; DINO).

Features are L2-normalised, so similarity is cosine. Each test sample takes its k most similar
train samples, weights neighbour j by exp(sim_j / temperature) and scores class c by the
weighted share of its neighbours' votes for c: Wu et al., "Unsupervised Feature Learning via
Non-Parametric Instance Discrimination" (CVPR 2018), as DINO's ``eval_knn.py`` runs it
(k = 20, temperature 0.07). The weights are normalised over the k neighbours (a softmax of
sim / temperature), which keeps DINO's ranking of classes and cannot overflow; the same rule
gives multilabel scores as the weighted mean of the neighbours' multi-hot label vectors.
Test rows are processed in chunks, so memory stays at [chunk, N] similarities.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from eoforge.finetune.metrics import (
    accuracy,
    average_precision_micro_macro,
    balanced_accuracy,
)

DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07


@dataclass
class KnnResult:
    """Outcome of ``knn_probe`` on single-label classes.

    Attributes:
        accuracy: test accuracy of the top-scored class.
        balanced_accuracy: mean per-class recall over the classes present in the test set.
        per_class_accuracy: {class index: test accuracy} for the classes present in the test set.
        majority_baseline: test accuracy of always predicting the most frequent TRAIN class.
        test_majority_share: share of the test set's most frequent class (no constant
            prediction scores higher).
        k: neighbours used (``min(k, n_train)``); temperature: the vote temperature.
    """

    accuracy: float
    balanced_accuracy: float
    per_class_accuracy: dict[int, float]
    majority_baseline: float
    test_majority_share: float
    k: int
    temperature: float


@dataclass
class KnnMultilabelResult:
    """Outcome of ``knn_probe`` on multilabel targets.

    Attributes:
        map_micro, map_macro: mean average precision pooled over (sample, class) pairs, and
            averaged over the classes with a positive test target.
        per_class_ap: {class index: AP} for the classes with a positive test target.
        no_positive: classes without a positive test target (left out of ``map_macro``).
        k: neighbours used (``min(k, n_train)``); temperature: the vote temperature.
    """

    map_micro: float
    map_macro: float
    per_class_ap: dict[int, float]
    no_positive: list[int]
    k: int
    temperature: float


def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    k: int | None = None,
    temperature: float = DEFAULT_TEMPERATURE,
    batch_size: int = 256,
    n_classes: int | None = None,
) -> torch.Tensor:
    """Temperature-weighted kNN scores of every test sample (module docstring).

    Args:
        train_features: [N, D] frozen features.
        train_labels: [N] int64 class indices (single-label) or [N, K] multi-hot (multilabel).
        test_features: [M, D] frozen features.
        k: neighbours per test sample; default ``min(20, N)``, and never more than N.
        temperature: vote weights are exp(cosine similarity / temperature), > 0.
        batch_size: test rows per chunk; bounds memory at [batch_size, N] similarities.
        n_classes: K for single-label (default: 1 + the largest train label); ignored for
            multilabel, where K is the width of ``train_labels``.

    Returns:
        scores [M, K] in [0, 1]: the weighted share of neighbour votes per class, so each row
        sums to 1 for single-label; for multilabel the weighted mean of neighbour label vectors.
    """
    votes = _vote_matrix(train_labels, len(train_features), n_classes)  # [N, K]
    if train_features.dim() != 2 or test_features.dim() != 2:
        raise ValueError(
            f"features must be [N, D]; got train {tuple(train_features.shape)} "
            f"and test {tuple(test_features.shape)}"
        )
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"train features have {train_features.shape[1]} dims but test features have "
            f"{test_features.shape[1]}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    k = _neighbours(k, len(train_features))
    train = F.normalize(train_features.float(), dim=1)  # [N, D]
    test = F.normalize(test_features.float().to(train.device), dim=1)  # [M, D]
    votes = votes.to(train.device)
    scores = []
    for start in range(0, len(test), batch_size):
        similarity = test[start : start + batch_size] @ train.T  # [b, N]
        top, index = similarity.topk(k, dim=1)  # [b, k]
        weights = torch.softmax(top / temperature, dim=1)  # [b, k], exp(sim / T) normalised
        scores.append(torch.einsum("bj,bjc->bc", weights, votes[index]))  # [b, K]
    if not scores:
        return test.new_zeros(0, votes.shape[1])
    return torch.cat(scores)


def knn_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    k: int | None = None,
    temperature: float = DEFAULT_TEMPERATURE,
    batch_size: int = 256,
    n_classes: int | None = None,
) -> KnnResult | KnnMultilabelResult:
    """Score weighted kNN of frozen features against the test labels.

    Labels [N] give single-label classification (accuracy); labels [N, K] multi-hot give
    multilabel scoring (mAP). The train split alone is searched; no test label is used before
    scoring.

    Args:
        train_features, test_features: [N, D] and [M, D] frozen features.
        train_labels, test_labels: [N] and [M] class indices, or [N, K] and [M, K] multi-hot.
        k, temperature, batch_size: see ``knn_classify``.
        n_classes: single-label K (default: 1 + the largest label in either split).

    Returns:
        ``KnnResult`` for single-label, ``KnnMultilabelResult`` for multilabel labels.
    """
    train_labels, test_labels = torch.as_tensor(train_labels), torch.as_tensor(test_labels)
    if train_labels.dim() != test_labels.dim():
        raise ValueError(
            f"train labels have shape {tuple(train_labels.shape)} but test labels have shape "
            f"{tuple(test_labels.shape)}; both must be [N] classes or [N, K] multi-hot"
        )
    if len(test_labels) != len(test_features):
        raise ValueError(f"{len(test_features)} test features but {len(test_labels)} test labels")
    multilabel = train_labels.dim() == 2
    if not multilabel and n_classes is None:
        n_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_classify(
        train_features,
        train_labels,
        test_features,
        k=k,
        temperature=temperature,
        batch_size=batch_size,
        n_classes=n_classes,
    ).cpu()  # [M, K]
    k = _neighbours(k, len(train_features))
    if multilabel:
        ap = average_precision_micro_macro(scores, test_labels.cpu())
        return KnnMultilabelResult(
            map_micro=ap.micro,
            map_macro=ap.macro,
            per_class_ap=ap.per_class,
            no_positive=ap.no_positive,
            k=k,
            temperature=temperature,
        )
    test_labels, train_labels = test_labels.cpu().long(), train_labels.cpu().long()
    predictions = scores.argmax(1)  # [M]
    correct = predictions == test_labels
    majority = torch.bincount(train_labels, minlength=n_classes).argmax()
    return KnnResult(
        accuracy=accuracy(predictions, test_labels),
        balanced_accuracy=balanced_accuracy(predictions, test_labels, n_classes),
        per_class_accuracy={
            int(c): correct[test_labels == c].double().mean().item() for c in test_labels.unique()
        },
        majority_baseline=(test_labels == majority).double().mean().item(),
        test_majority_share=torch.bincount(test_labels).max().item() / len(test_labels),
        k=k,
        temperature=temperature,
    )


def _neighbours(k: int | None, n_train: int) -> int:
    """k clamped to the train size: ``min(20, N)`` by default."""
    if k is not None and k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return min(DEFAULT_K if k is None else k, n_train)


def _vote_matrix(labels: torch.Tensor, n_train: int, n_classes: int | None) -> torch.Tensor:
    """What each train sample votes for: [N, K] float, one-hot rows or multi-hot rows."""
    labels = torch.as_tensor(labels)
    if n_train == 0:
        raise ValueError("kNN needs at least one train sample, got none")
    if len(labels) != n_train:
        raise ValueError(f"{n_train} train features but {len(labels)} train labels")
    if labels.dim() == 2:
        if ((labels != 0) & (labels != 1)).any():
            raise ValueError("multilabel train labels [N, K] must be multi-hot (only 0 and 1)")
        return labels.float()
    if labels.dim() != 1 or labels.is_floating_point():
        raise ValueError(
            f"train labels must be [N] class indices or [N, K] multi-hot, got shape "
            f"{tuple(labels.shape)} of dtype {labels.dtype}"
        )
    labels = labels.long()
    if n_classes is None:
        n_classes = int(labels.max()) + 1
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(
            f"train labels span [{labels.min().item()}, {labels.max().item()}], "
            f"outside the {n_classes} classes [0, {n_classes})"
        )
    return F.one_hot(labels, n_classes).float()
