"""Dense finetuning protocols: semantic segmentation (UPerNet) and siamese change detection.

Both train a head on ``multilevel_features`` of the encoder, with the encoder frozen or
finetuned under layer-wise learning-rate decay (``eoforge.finetune.finetune``), per-pixel
cross-entropy with ``ignore_index=-1`` (unlabelled pixels give neither loss nor gradient), and
score the test images: mean IoU for segmentation, F1 and IoU of the change class for change
detection, over the labelled pixels only. Runs are reproducible under ``seed`` on the CPU and
train a copy of the encoder, leaving the caller's untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from eoforge.finetune.finetune import (
    DEFAULT_WARMUP_FRACTION,
    DEFAULT_WEIGHT_DECAY,
    encoder_copy,
    fit,
    seeded,
    take,
)
from eoforge.finetune.heads import SiameseChangeHead, UPerNetHead, multilevel_features
from eoforge.finetune.metrics import change_f1_iou, confusion_matrix, iou_from_confusion

IGNORE = -1


@dataclass
class SegmentationResult:
    """Outcome of ``train_segmentation``.

    Attributes:
        miou: mean IoU over the classes present in the test targets or predictions.
        per_class_iou: {class index: IoU} for those classes.
        predictions: [M, H, W] int64 predicted classes of the test images (every pixel).
        train_loss: mean training loss of each epoch.
        frozen: whether the encoder was kept frozen.
        encoder, head: the trained encoder copy (the input one when frozen) and head.
    """

    miou: float
    per_class_iou: dict[int, float]
    predictions: torch.Tensor
    train_loss: list[float]
    frozen: bool
    encoder: nn.Module
    head: nn.Module


@dataclass
class ChangeResult:
    """Outcome of ``train_change``: scores of the change class over the labelled test pixels.

    Attributes:
        f1, iou, precision, recall: of the change class 1 (NaN where undefined).
        predictions: [M, H, W] int64 predicted change maps of the test pairs (every pixel).
        train_loss: mean training loss of each epoch.
        frozen: whether the encoder was kept frozen.
        encoder, head: the trained encoder copy (the input one when frozen) and head.
    """

    f1: float
    iou: float
    precision: float
    recall: float
    predictions: torch.Tensor
    train_loss: list[float]
    frozen: bool
    encoder: nn.Module
    head: nn.Module


def pixel_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits [B, K, H, W] against targets [B, H, W] over the pixels != -1.

    A batch without a labelled pixel gives a zero loss that still reaches every parameter, so
    such batches are harmless instead of NaN.
    """
    if (targets == IGNORE).all():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, targets, ignore_index=IGNORE)


def train_segmentation(
    encoder: nn.Module,
    x_train,
    y_train,
    x_test,
    y_test,
    n_classes: int,
    band_ids: Sequence[str],
    wavelengths,
    *,
    frozen: bool = False,
    epochs: int = 50,
    lr: float = 1e-4,
    layer_decay: float = 0.65,
    batch_size: int = 8,
    seed: int = 0,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    warmup_fraction: float = DEFAULT_WARMUP_FRACTION,
    layers: Sequence[int] | None = None,
    channels: int = 256,
    progress: bool = False,
) -> SegmentationResult:
    """Train an UPerNet head (and the encoder unless ``frozen``) and score test mIoU.

    Args:
        encoder: a SpectralViT (see ``multilevel_features``).
        x_train, x_test: array-like [N, C, H, W] normalised images, sides multiples of the patch.
        y_train, y_test: [N, H, W] class indices in [0, n_classes), -1 for unlabelled pixels.
        n_classes: number of classes K.
        band_ids: registry keys of the C channels; wavelengths: [C] nm.
        frozen: train the head alone; the encoder is left bit-identical.
        epochs, lr, layer_decay, batch_size, weight_decay, warmup_fraction: the optimisation
            (BEiT's ADE20K recipe uses layer_decay 0.65).
        seed: seeds the head's initialisation and the shuffling.
        layers: blocks tapped for the pyramid (default: four evenly spaced).
        channels: decoder width.
        progress: show a tqdm bar over epochs.
    """
    _check_batch_size(batch_size)
    y_train, y_test = _labels(y_train, x_train, "y_train"), _labels(y_test, x_test, "y_test")
    for name, y in (("y_train", y_train), ("y_test", y_test)):
        bad = (y != IGNORE) & ((y < 0) | (y >= n_classes))
        if bad.any():
            raise ValueError(
                f"{name} holds {y[bad][0].item()}, outside the {n_classes} classes and -1 (ignore)"
            )
    device = next(encoder.parameters()).device
    wavelengths = torch.as_tensor(wavelengths, dtype=torch.float32, device=device)
    model = encoder_copy(encoder, frozen)

    def logits_of(head: nn.Module, images: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            maps = multilevel_features(model, images, band_ids, wavelengths, layers)
        return head(maps, images.shape[-2:])  # [B, K, H, W]

    with seeded(seed, device):
        head = UPerNetHead(model.embed_dim, n_classes, channels).to(device)
        train_loss = fit(
            model,
            head,
            lambda index: pixel_loss(
                logits_of(head, take(x_train, index, device)), y_train[index].to(device)
            ),
            len(x_train),
            frozen=frozen,
            epochs=epochs,
            lr=lr,
            layer_decay=layer_decay,
            batch_size=batch_size,
            seed=seed,
            weight_decay=weight_decay,
            warmup_fraction=warmup_fraction,
            progress=progress,
        )
    predictions = _predict(lambda images: logits_of(head, images), x_test, batch_size, device)
    keep = y_test != IGNORE
    confusion = confusion_matrix(predictions[keep], y_test[keep], n_classes)
    scores = iou_from_confusion(confusion)
    return SegmentationResult(
        miou=scores.mean,
        per_class_iou=scores.per_class,
        predictions=predictions,
        train_loss=train_loss,
        frozen=frozen,
        encoder=model,
        head=head,
    )


def train_change(
    encoder: nn.Module,
    x_train,
    y_train,
    x_test,
    y_test,
    band_ids: Sequence[str],
    wavelengths,
    *,
    frozen: bool = False,
    epochs: int = 50,
    lr: float = 1e-4,
    layer_decay: float = 0.65,
    batch_size: int = 8,
    seed: int = 0,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    warmup_fraction: float = DEFAULT_WARMUP_FRACTION,
    layers: Sequence[int] | None = None,
    channels: int = 128,
    progress: bool = False,
) -> ChangeResult:
    """Train a siamese change head (and the shared encoder unless ``frozen``); score test F1/IoU.

    Args:
        encoder: a SpectralViT, applied with the same weights to both dates.
        x_train, x_test: array-like [N, 2, C, H, W] co-registered pairs (date 1, date 2),
            normalised, sides multiples of the patch.
        y_train, y_test: [N, H, W] 1 change, 0 no change, -1 unlabelled.
        band_ids: registry keys of the C channels (the same for both dates); wavelengths: [C] nm.
        frozen, epochs, lr, layer_decay, batch_size, seed, weight_decay, warmup_fraction,
            layers, channels, progress: as in ``train_segmentation``.
    """
    _check_batch_size(batch_size)
    y_train, y_test = _labels(y_train, x_train, "y_train"), _labels(y_test, x_test, "y_test")
    for name, y in (("y_train", y_train), ("y_test", y_test)):
        bad = (y != IGNORE) & (y != 0) & (y != 1)
        if bad.any():
            raise ValueError(f"{name} holds {y[bad][0].item()}; change maps hold 0, 1 or -1")
    if len(x_train[0]) != 2:
        raise ValueError(f"change pairs must be [N, 2, C, H, W], got {len(x_train[0])} dates")
    device = next(encoder.parameters()).device
    wavelengths = torch.as_tensor(wavelengths, dtype=torch.float32, device=device)
    model = encoder_copy(encoder, frozen)

    def logits_of(head: nn.Module, pairs: torch.Tensor) -> torch.Tensor:
        b = pairs.shape[0]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            # Both dates in one pass: [2B, C, H, W], date 1 first.
            both = pairs.transpose(0, 1).flatten(0, 1)
            maps = multilevel_features(model, both, band_ids, wavelengths, layers)
        return head([m[:b] for m in maps], [m[b:] for m in maps], pairs.shape[-2:])

    with seeded(seed, device):
        head = SiameseChangeHead(model.embed_dim, channels).to(device)
        train_loss = fit(
            model,
            head,
            lambda index: pixel_loss(
                logits_of(head, take(x_train, index, device)), y_train[index].to(device)
            ),
            len(x_train),
            frozen=frozen,
            epochs=epochs,
            lr=lr,
            layer_decay=layer_decay,
            batch_size=batch_size,
            seed=seed,
            weight_decay=weight_decay,
            warmup_fraction=warmup_fraction,
            progress=progress,
        )
    predictions = _predict(lambda pairs: logits_of(head, pairs), x_test, batch_size, device)
    scores = change_f1_iou(predictions, y_test, ignore=IGNORE)
    return ChangeResult(
        f1=scores.f1,
        iou=scores.iou,
        precision=scores.precision,
        recall=scores.recall,
        predictions=predictions,
        train_loss=train_loss,
        frozen=frozen,
        encoder=model,
        head=head,
    )


def _check_batch_size(batch_size: int) -> None:
    # The heads' BatchNorm sees a 1x1 map in pyramid pooling: one image gives one value.
    if batch_size < 2:
        raise ValueError(f"dense heads need batch_size >= 2 (BatchNorm), got {batch_size}")


def _labels(y, x, name: str) -> torch.Tensor:
    """``y`` as an int64 tensor, checked to have one map per image of ``x``."""
    y = torch.as_tensor(y).long()
    if y.dim() != 3 or len(y) != len(x):
        raise ValueError(f"{name} must be [N, H, W] with N = {len(x)}, got {tuple(y.shape)}")
    return y


@torch.no_grad()
def _predict(logits_of, x, batch_size: int, device: torch.device) -> torch.Tensor:
    """Argmax class maps [M, H, W] int64 of every test image, on the CPU."""
    return torch.cat(
        [
            logits_of(take(x, index, device)).argmax(1).cpu()
            for index in torch.arange(len(x)).split(batch_size)
        ]
    )
