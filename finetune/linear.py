"""Linear probe on frozen features, as MAE and dinov2 run it.

Features go through ``BatchNorm1d(affine=False)`` (MAE: it puts features of any encoder on one
scale, so one learning-rate grid suits them all), then a grid of linear heads, one per
(learning rate, weight decay) pair, is trained together: every batch makes ONE forward of the
stacked heads (dinov2's trick), so the grid costs little more than one head. SGD with momentum
and a cosine schedule, seeded. The head is chosen on a held-out part of the TRAIN features;
the test labels are only used to score that one head.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

DEFAULT_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
DEFAULT_WEIGHT_DECAYS = (0.0, 1e-4, 1e-3)
MOMENTUM = 0.9


class LinearHeadGrid(nn.Module):
    """``n_heads`` linear classifiers over shared non-affine BatchNorm, applied in one einsum.

    Args:
        in_dim: feature width D.
        n_classes: number of classes K.
        n_heads: number of heads H.
    """

    def __init__(self, in_dim: int, n_classes: int, n_heads: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(in_dim, affine=False)
        # Zeros: the problem is convex, so the start does not matter, and every head starts equal.
        self.weight = nn.Parameter(torch.zeros(n_heads, in_dim, n_classes))
        self.bias = nn.Parameter(torch.zeros(n_heads, n_classes))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [B, D] -> logits [H, B, K]."""
        z = self.norm(features)  # [B, D]
        return torch.einsum("bd,hdk->hbk", z, self.weight) + self.bias[:, None]


@dataclass
class ProbeResult:
    """Outcome of ``linear_probe``.

    Attributes:
        accuracy: test accuracy of the selected head.
        per_class_accuracy: {class index: test accuracy} for the classes present in the test set.
        majority_baseline: test accuracy of always predicting the most frequent TRAIN class
            (a majority classifier fitted like the heads, without test labels).
        test_majority_share: share of the test set's most frequent class; no constant
            prediction scores higher, so it is the stricter floor where the class mix shifts
            between splits (spatially blocked ones).
        best_lr, best_weight_decay: hyperparameters of the selected head.
        lr_at_grid_edge: the selected learning rate is the grid's largest or smallest, so the
            best one may lie outside it (a warning says which way to widen ``lrs``).
        best_head: index of the selected head in ``grid``.
        val_accuracy: held-out accuracy of the selected head.
        grid: one {lr, weight_decay, val_accuracy, val_loss} per head, in head order.
        n_fit, n_val: train samples used to fit the heads and to select among them.
    """

    accuracy: float
    per_class_accuracy: dict[int, float]
    majority_baseline: float
    test_majority_share: float
    best_lr: float
    best_weight_decay: float
    lr_at_grid_edge: bool
    best_head: int
    val_accuracy: float
    grid: list[dict[str, float]]
    n_fit: int
    n_val: int


def train_head_grid(
    features: torch.Tensor,
    labels: torch.Tensor,
    n_classes: int,
    lrs: Sequence[float],
    weight_decays: Sequence[float],
    *,
    epochs: int = 40,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> LinearHeadGrid:
    """Train one head per (lrs[h], weight_decays[h]) together, one forward per batch.

    SGD with momentum is written out here because the heads share stacked parameter tensors,
    which one ``torch.optim`` param group cannot give different learning rates.

    Args:
        features: [N, D] frozen features; labels: [N] int64 class indices.
        n_classes: number of classes K of the heads.
        lrs, weight_decays: per-head peak learning rate and weight decay (equal lengths).
        epochs: passes over the features; the learning rate follows a cosine from peak to 0.
        batch_size: samples per step; the last partial batch of an epoch is dropped so
            BatchNorm never sees a batch of one.
        generator: seeds the shuffling.
        progress: show a tqdm bar over epochs.

    Returns:
        The trained grid in eval mode.
    """
    if len(lrs) != len(weight_decays):
        raise ValueError(f"got {len(lrs)} learning rates but {len(weight_decays)} weight decays")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    n = len(features)
    if n < 2:
        raise ValueError(f"a linear probe needs at least 2 training samples, got {n}")
    grid = LinearHeadGrid(features.shape[1], n_classes, len(lrs)).train()
    lr = torch.tensor(lrs, dtype=torch.float32)  # [H]
    wd = torch.tensor(weight_decays, dtype=torch.float32)[:, None, None]  # [H, 1, 1]
    params = (grid.weight, grid.bias)
    buffers = [torch.zeros_like(p) for p in params]
    batch_size = min(batch_size, n)
    per_epoch = n // batch_size
    total, step = epochs * per_epoch, 0
    for _ in tqdm(range(epochs), desc="linear heads", disable=not progress):
        order = torch.randperm(n, generator=generator)
        for b in range(per_epoch):
            idx = order[b * batch_size : (b + 1) * batch_size]
            logits = grid(features[idx])  # [H, B, K]
            # Mean over samples, summed over heads: each head gets the gradient of its own loss.
            loss = F.cross_entropy(logits.flatten(0, 1), labels[idx].repeat(len(lrs))) * len(lrs)
            grads = torch.autograd.grad(loss, params)
            scale = 0.5 * (1.0 + math.cos(math.pi * step / total))
            with torch.no_grad():
                for p, g, buf, decay in zip(params, grads, buffers, (wd, 0.0), strict=True):
                    buf.mul_(MOMENTUM).add_(g + decay * p)  # weight decay on weights, not biases
                    p.sub_(scale * lr.view(-1, *[1] * (p.dim() - 1)) * buf)  # lr per head
            step += 1
    return grid.eval()


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    n_classes: int | None = None,
    lrs: Sequence[float] = DEFAULT_LRS,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    epochs: int = 40,
    batch_size: int = 256,
    val_fraction: float = 0.2,
    seed: int = 0,
    progress: bool = False,
) -> ProbeResult:
    """Fit the head grid on part of the train features, select on the rest, score on test.

    The held-out part is a seeded class-stratified share of the train features. For windows
    cut from one scene it is spatially close to the fitted part, so its accuracy is optimistic;
    it is only used to rank heads.

    Args:
        train_features, test_features: [N, D] frozen features.
        train_labels, test_labels: [N] int64 class indices.
        n_classes: number of classes (default: 1 + the largest label seen).
        lrs, weight_decays: the grid; every pair of the two gets a head.
        epochs, batch_size: see ``train_head_grid``.
        val_fraction: share of each train class held out for selection.
        seed: seeds the hold-out and the shuffling.
        progress: show a tqdm bar.

    Returns:
        The selected head's test metrics and the whole grid's validation scores.
    """
    train_features, test_features = train_features.float(), test_features.float()
    train_labels, test_labels = train_labels.long(), test_labels.long()
    if n_classes is None:
        n_classes = int(max(train_labels.max(), test_labels.max())) + 1
    generator = torch.Generator().manual_seed(seed)
    fit, val = stratified_holdout(train_labels, val_fraction, generator)
    pairs = [(lr, wd) for lr in lrs for wd in weight_decays]
    grid = train_head_grid(
        train_features[fit],
        train_labels[fit],
        n_classes,
        [lr for lr, _ in pairs],
        [wd for _, wd in pairs],
        epochs=epochs,
        batch_size=batch_size,
        generator=generator,
        progress=progress,
    )
    with torch.no_grad():
        val_logits = grid(train_features[val])  # [H, V, K]
        val_acc = (val_logits.argmax(-1) == train_labels[val]).float().mean(1)  # [H]
        val_loss = torch.stack([F.cross_entropy(lg, train_labels[val]) for lg in val_logits])
        # Best accuracy, then lowest loss (a diverged head's NaN loss ranks last), then head order.
        val_loss = torch.nan_to_num(val_loss, nan=math.inf)
        best = min(range(len(pairs)), key=lambda h: (-val_acc[h].item(), val_loss[h].item(), h))
        predictions = grid(test_features)[best].argmax(-1)  # [M]
    best_lr = pairs[best][0]
    side = grid_edge(best_lr, lrs)
    if side:
        wider = widened(lrs, side)
        warnings.warn(
            f"linear probe: the selected learning rate {best_lr:g} is the grid's {side} "
            f"({', '.join(f'{lr:g}' for lr in lrs)}); a better one may lie beyond it: widen the "
            f"grid with the linear protocol's option lrs=[{', '.join(f'{lr:g}' for lr in wider)}]",
            stacklevel=2,
        )
    correct = predictions == test_labels
    majority = torch.bincount(train_labels, minlength=n_classes).argmax()
    return ProbeResult(
        accuracy=correct.float().mean().item(),
        per_class_accuracy={
            int(c): correct[test_labels == c].float().mean().item() for c in test_labels.unique()
        },
        majority_baseline=(test_labels == majority).sum().item() / len(test_labels),
        test_majority_share=torch.bincount(test_labels).max().item() / len(test_labels),
        best_lr=best_lr,
        best_weight_decay=pairs[best][1],
        lr_at_grid_edge=side is not None,
        best_head=best,
        val_accuracy=val_acc[best].item(),
        grid=[
            {
                "lr": lr,
                "weight_decay": wd,
                "val_accuracy": val_acc[h].item(),
                "val_loss": val_loss[h].item(),
            }
            for h, (lr, wd) in enumerate(pairs)
        ],
        n_fit=len(fit),
        n_val=len(val),
    )


def widened(lrs: Sequence[float], side: str) -> list[float]:
    """``lrs`` sorted and extended by two rates past its ``side`` end, 3x and 10x beyond it."""
    rates = sorted(set(lrs))
    if side == "largest":
        return [*rates, rates[-1] * 3, rates[-1] * 10]
    return [rates[0] / 10, rates[0] / 3, *rates]


def grid_edge(lr: float, lrs: Sequence[float]) -> str | None:
    """Which end of a grid of several rates ``lr`` is: "largest", "smallest" or None."""
    if len(set(lrs)) < 2:
        return None
    return "largest" if lr == max(lrs) else "smallest" if lr == min(lrs) else None


def stratified_holdout(
    labels: torch.Tensor, fraction: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices into (fit, held-out), holding out ``floor(fraction * n_c)`` of each class c.

    Rare classes (fewer than 1 / fraction samples) stay wholly in the fit part.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"val_fraction must be inside (0, 1), got {fraction}")
    order = torch.randperm(len(labels), generator=generator)
    fit, val = [], []
    for c in labels.unique():
        members = order[labels[order] == c]
        n_val = int(fraction * len(members))
        val.append(members[:n_val])
        fit.append(members[n_val:])
    fit, val = torch.cat(fit).sort().values, torch.cat(val).sort().values
    if len(val) == 0:
        raise ValueError(
            f"no class has {math.ceil(1 / fraction)} or more train samples, so none can be held "
            f"out for head selection ({len(labels)} train samples); raise max_train or val_fraction"
        )
    return fit, val
