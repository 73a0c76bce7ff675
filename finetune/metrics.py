"""Benchmark metrics in plain torch: classification, multilabel mAP, segmentation, change, CIs.

Every function takes tensors (or anything ``torch.as_tensor`` accepts) and returns Python
floats, so results go straight into a JSON row. Definitions follow the usual references:
``balanced_accuracy`` and ``average_precision_micro_macro`` match scikit-learn's
``balanced_accuracy_score`` and ``average_precision_score`` (step-wise AP, tied scores share
one threshold), ``miou`` matches mmsegmentation's mean IoU (classes absent from both prediction
and target are left out), and ``mean_ci95`` is the Student t interval over seeds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class AveragePrecision:
    """Outcome of ``average_precision_micro_macro``.

    Attributes:
        micro: AP over all (sample, class) pairs pooled.
        macro: mean of ``per_class`` (NaN when no class has a positive).
        per_class: {class index: AP} for the classes with at least one positive target.
        no_positive: classes with no positive target: their AP is undefined, so they are left
            out of ``macro`` (they still count as negatives in ``micro``).
    """

    micro: float
    macro: float
    per_class: dict[int, float]
    no_positive: list[int]


@dataclass
class MeanIoU:
    """Outcome of ``miou`` / ``iou_from_confusion``.

    Attributes:
        mean: mean of ``per_class`` (NaN when no pixel was scored).
        per_class: {class index: IoU} for the classes present in the prediction or the target;
            a class only predicted scores 0, a class in neither is left out.
    """

    mean: float
    per_class: dict[int, float]


@dataclass
class ChangeScores:
    """Outcome of ``change_f1_iou``: scores of the change class 1 over the scored pixels.

    Each is NaN where its denominator is 0 (e.g. F1 and IoU when neither the prediction nor the
    target has a changed pixel).
    """

    f1: float
    iou: float
    precision: float
    recall: float


def accuracy(predictions, targets) -> float:
    """Share of ``predictions`` [N] equal to ``targets`` [N] (class indices)."""
    predictions, targets = _pair(predictions, targets, "predictions")
    _nonempty(targets)
    return (predictions == targets).double().mean().item()


def confusion_matrix(predictions, targets, n_classes: int) -> torch.Tensor:
    """Counts [K, K] int64: row = target class, column = predicted class (scikit-learn's order).

    Args:
        predictions, targets: class indices of equal shape, each in [0, n_classes).
        n_classes: number of classes K.
    """
    predictions, targets = _pair(predictions, targets, "predictions")
    for name, values in (("predictions", predictions), ("targets", targets)):
        _check_range(values, n_classes, name)
    flat = targets.reshape(-1).long() * n_classes + predictions.reshape(-1).long()
    return torch.bincount(flat, minlength=n_classes * n_classes).view(n_classes, n_classes)


def balanced_accuracy(predictions, targets, n_classes: int | None = None) -> float:
    """Mean per-class recall over the classes present in ``targets`` (scikit-learn's definition).

    Args:
        predictions, targets: class indices [N].
        n_classes: number of classes (default: 1 + the largest index in either).
    """
    predictions, targets = _pair(predictions, targets, "predictions")
    _nonempty(targets)
    if n_classes is None:
        n_classes = int(max(predictions.max(), targets.max())) + 1
    confusion = confusion_matrix(predictions, targets, n_classes).double()
    support = confusion.sum(1)  # [K]
    present = support > 0
    return (confusion.diagonal()[present] / support[present]).mean().item()


def average_precision_micro_macro(scores, targets) -> AveragePrecision:
    """Multilabel mAP, micro and macro, as scikit-learn's ``average_precision_score``.

    AP = sum_n (R_n - R_{n-1}) P_n over the distinct score thresholds in decreasing order, so
    tied scores form one threshold (no ranking among them is assumed).

    Args:
        scores: [N, K] per-class scores (any monotone scale: logits, probabilities, votes).
        targets: [N, K] multi-hot {0, 1}.

    Returns:
        Micro and macro AP and the per-class APs; classes without a positive are listed apart.
    """
    scores, targets = _pair(scores, targets, "scores")
    if scores.dim() != 2:
        raise ValueError(f"scores and targets must be [N, K], got shape {tuple(scores.shape)}")
    targets = _binary(targets, "targets")
    if not targets.any():
        raise ValueError("targets have no positive at all, so no average precision is defined")
    per_class, no_positive = {}, []
    for c in range(scores.shape[1]):
        if targets[:, c].any():
            per_class[c] = _average_precision(scores[:, c], targets[:, c])
        else:
            no_positive.append(c)
    return AveragePrecision(
        micro=_average_precision(scores.reshape(-1), targets.reshape(-1)),
        macro=sum(per_class.values()) / len(per_class),
        per_class=per_class,
        no_positive=no_positive,
    )


def miou(predictions, targets, n_classes: int, ignore: int = -1) -> MeanIoU:
    """Per-class IoU and their mean over the pixels whose target is not ``ignore``.

    Args:
        predictions: [N, H, W] class indices in [0, n_classes) (scored where the target is kept).
        targets: [N, H, W] class indices in [0, n_classes), or ``ignore``.
        n_classes: number of classes K.
        ignore: target value of pixels left out.
    """
    predictions, targets = _pair(predictions, targets, "predictions")
    keep = targets != ignore
    return iou_from_confusion(confusion_matrix(predictions[keep], targets[keep], n_classes))


def iou_from_confusion(confusion: torch.Tensor) -> MeanIoU:
    """IoU per class from a [K, K] confusion matrix (row target, column prediction).

    Lets a segmentation evaluation sum ``confusion_matrix`` over batches and score once.
    """
    confusion = confusion.double()
    intersection = confusion.diagonal()  # [K]
    union = confusion.sum(0) + confusion.sum(1) - intersection  # [K]
    per_class = {c: (intersection[c] / union[c]).item() for c in range(len(union)) if union[c] > 0}
    mean = sum(per_class.values()) / len(per_class) if per_class else math.nan
    return MeanIoU(mean=mean, per_class=per_class)


def change_f1_iou(predictions, targets, ignore: int = -1) -> ChangeScores:
    """F1, IoU, precision and recall of the change class 1 of binary change maps.

    Args:
        predictions: [N, H, W] in {0, 1} (scored where the target is kept).
        targets: [N, H, W] in {0, 1}, or ``ignore``.
        ignore: target value of pixels left out.
    """
    predictions, targets = _pair(predictions, targets, "predictions")
    keep = targets != ignore
    predicted = _binary(predictions[keep], "predictions").bool()
    changed = _binary(targets[keep], "targets").bool()
    tp = (predicted & changed).sum().item()
    fp = (predicted & ~changed).sum().item()
    fn = (~predicted & changed).sum().item()
    return ChangeScores(
        f1=_ratio(2 * tp, 2 * tp + fp + fn),
        iou=_ratio(tp, tp + fp + fn),
        precision=_ratio(tp, tp + fp),
        recall=_ratio(tp, tp + fn),
    )


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of its two-sided 95% Student t interval: t_{0.975, n-1} * s / sqrt(n).

    ``s`` is the sample standard deviation (n - 1 in the denominator). With one value there is
    no spread to estimate, so the half-width is NaN.

    Args:
        values: one score per seed.
    """
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci95 needs at least one value, got none")
    mean = math.fsum(values) / n
    if n == 1:
        return mean, math.nan
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t_quantile(0.975, n - 1) * std / math.sqrt(n)


def t_quantile(p: float, df: int) -> float:
    """Quantile of Student's t distribution with integer ``df`` degrees of freedom.

    Inverts the closed-form CDF for integer df (Abramowitz & Stegun 26.7.3-4) by bisection,
    to double precision; scipy is not a dependency.

    Args:
        p: probability inside (0, 1).
        df: degrees of freedom, >= 1.
    """
    if not 0 < p < 1:
        raise ValueError(f"t quantile needs p inside (0, 1), got {p}")
    if int(df) != df or df < 1:
        raise ValueError(f"t quantile needs integer degrees of freedom >= 1, got {df}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    central = 2 * p - 1  # P(|T| < t) at the quantile t
    low, high = 0.0, 1.0
    while _t_central(high, df) < central:
        low, high = high, 2 * high
    for _ in range(200):  # halves [low, high] until it stops shrinking
        mid = 0.5 * (low + high)
        if mid in (low, high):
            break
        low, high = (mid, high) if _t_central(mid, df) < central else (low, mid)
    return 0.5 * (low + high)


def _t_central(t: float, df: int) -> float:
    """P(|T| < t) for T ~ Student t with integer df (Abramowitz & Stegun 26.7.3 and 26.7.4)."""
    theta = math.atan(t / math.sqrt(df))
    cos2 = math.cos(theta) ** 2
    if df % 2 == 0:
        # sin(θ) [1 + 1/2 cos²θ + (1·3)/(2·4) cos⁴θ + ... up to cos^(df-2)θ]
        term, total = 1.0, 1.0
        for j in range(1, df // 2):
            term *= (2 * j - 1) / (2 * j) * cos2
            total += term
        return math.sin(theta) * total
    # 2/π [θ + sin(θ) cos(θ) (1 + 2/3 cos²θ + (2·4)/(3·5) cos⁴θ + ... up to cos^(df-3)θ)]
    series = 0.0
    if df > 1:
        term, total = 1.0, 1.0
        for j in range(1, (df - 1) // 2):
            term *= (2 * j) / (2 * j + 1) * cos2
            total += term
        series = math.sin(theta) * math.cos(theta) * total
    return 2 / math.pi * (theta + series)


def _average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Step-wise AP of one ranking: scores [N], targets [N] in {0, 1} with a positive."""
    order = torch.sort(scores.double(), descending=True, stable=True)
    hits = targets[order.indices].double()  # [N]
    # The last position of each run of tied scores is one threshold.
    last = torch.ones_like(hits, dtype=torch.bool)
    last[:-1] = order.values[1:] != order.values[:-1]
    tp = hits.cumsum(0)[last]  # [T] positives at or above each threshold
    seen = torch.arange(1, len(hits) + 1, dtype=torch.float64)[last]  # [T]
    recall = tp / tp[-1]
    step = torch.diff(recall, prepend=recall.new_zeros(1))
    return (step * tp / seen).sum().item()


def _pair(a, b, name_a: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Both as tensors on ``a``'s device, checked to have one shape."""
    a = torch.as_tensor(a)
    b = torch.as_tensor(b, device=a.device)
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} have shape {tuple(a.shape)} but targets have shape {tuple(b.shape)}"
        )
    return a, b


def _nonempty(targets: torch.Tensor) -> None:
    if targets.numel() == 0:
        raise ValueError("no targets to score: predictions and targets are empty")


def _check_range(values: torch.Tensor, n_classes: int, name: str) -> None:
    if values.is_floating_point():
        raise ValueError(f"{name} must be class indices (integers), got dtype {values.dtype}")
    bad = (values < 0) | (values >= n_classes)
    if bad.any():
        raise ValueError(
            f"{name} hold {values[bad][0].item()}, outside the {n_classes} classes [0, {n_classes})"
        )


def _binary(values: torch.Tensor, name: str) -> torch.Tensor:
    """``values`` checked to hold only 0 and 1."""
    bad = (values != 0) & (values != 1)
    if bad.any():
        raise ValueError(f"{name} must hold only 0 and 1, found {values[bad][0].item()}")
    return values


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan
