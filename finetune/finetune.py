"""Full finetuning of an encoder and a head with layer-wise learning-rate decay (BEiT, MAE).

Layer-wise decay (Bao et al., BEiT, 2021; He et al., MAE, 2021) trains the input side of a
pretrained encoder more gently than its output side: with ``depth`` blocks, block i (0-based)
learns at ``base_lr * decay^(depth - i)``, the tokenizer and cls token at
``base_lr * decay^(depth + 1)``, and the encoder's final norm and the head at ``base_lr``.
Norms, biases, tokens and position tables get no weight decay. AdamW, a linear warmup then a
cosine to 0, one step per batch.

``finetune_classifier`` is the image-level protocol: ``[cls, mean of patch tokens]`` (as
``eoforge.finetune.features`` pools them) through a LayerNorm and a linear layer, trained with
cross-entropy (accuracy) or, for multi-hot targets, binary cross-entropy (micro/macro mAP).
``frozen=True`` trains the head alone on features of the unchanged encoder.

Every run trains a copy of the encoder and leaves the caller's untouched, so one loaded release
serves several seeds. Runs are reproducible under ``seed`` on the CPU: the shuffling and the
head's initialisation are drawn from it, inside a forked RNG so the caller's RNG state is kept.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from eoforge.finetune.metrics import accuracy, average_precision_micro_macro

DEFAULT_WEIGHT_DECAY = 0.05
DEFAULT_WARMUP_FRACTION = 0.1
ADAMW_BETAS = (0.9, 0.999)
NO_DECAY_NAME_PARTS = ("token", "pos_embed")  # learned tokens and position tables


def layer_id(name: str, depth: int) -> int:
    """Depth level of an encoder parameter: 0 input side, i + 1 for block i, depth + 1 after.

    Args:
        name: parameter name inside the encoder (``blocks.3.attn.qkv.weight``).
        depth: number of blocks.
    """
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    if name.startswith("norm.") or name.startswith("fc_norm."):
        return depth + 1
    return 0  # tokenizer, cls token and any other input-side parameter


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """True for norms, biases, learned tokens and position tables (exempt from weight decay)."""
    return param.ndim <= 1 or name.endswith(".bias") or any(p in name for p in NO_DECAY_NAME_PARTS)


def param_groups_lrd(
    encoder: nn.Module | None,
    head: nn.Module,
    base_lr: float,
    weight_decay: float,
    layer_decay: float,
) -> list[dict]:
    """AdamW parameter groups with layer-wise learning-rate decay (module docstring).

    One group per (depth level, decayed or not); each carries ``lr`` (= ``base_lr * lr_scale``),
    ``lr_scale``, ``weight_decay``, ``layer_id`` and ``names``. Parameters with
    ``requires_grad=False`` are left out.

    Args:
        encoder: an encoder with ``blocks`` (a ModuleList), or None to train the head alone.
        head: the task head, trained at ``base_lr``.
        base_lr: learning rate of the head and the encoder's last level.
        weight_decay: AdamW weight decay of the decayed parameters.
        layer_decay: per-block factor in (0, 1]; 1 turns layer-wise decay off.

    Returns:
        Groups ordered from the input side to the head.
    """
    if not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay must be inside (0, 1], got {layer_decay}")
    if base_lr <= 0:
        raise ValueError(f"lr must be > 0, got {base_lr}")
    depth = len(encoder.blocks) if encoder is not None else 0
    named = []  # (layer id, name, parameter)
    if encoder is not None:
        named += [(layer_id(n, depth), n, p) for n, p in encoder.named_parameters()]
    named += [(depth + 1, f"head.{n}", p) for n, p in head.named_parameters()]
    groups: dict[tuple[int, bool], dict] = {}
    for level, name, param in named:
        if not param.requires_grad:
            continue
        decayed = not no_weight_decay(name, param)
        key = (level, decayed)
        if key not in groups:
            scale = layer_decay ** (depth + 1 - level)
            groups[key] = {
                "params": [],
                "names": [],
                "layer_id": level,
                "lr_scale": scale,
                "lr": base_lr * scale,
                "weight_decay": weight_decay if decayed else 0.0,
            }
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups, key=lambda k: (k[0], not k[1]))]


def lr_factor(step: int, total: int, warmup_fraction: float) -> float:
    """Linear warmup over ``warmup_fraction`` of the steps, then a cosine from 1 to 0."""
    warmup = int(warmup_fraction * total)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def n_batches(n: int, batch_size: int) -> int:
    """Batches per epoch of ``batches``."""
    count = math.ceil(n / batch_size)
    return count - 1 if count > 1 and n % batch_size == 1 else count


def batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A seeded shuffle of ``range(n)`` cut into batches; a last batch of one sample joins the
    one before it, so BatchNorm in a head never sees a single sample."""
    chunks = list(torch.randperm(n, generator=generator).split(batch_size))
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2:] = [torch.cat(chunks[-2:])]
    return chunks


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch for a run without disturbing the caller's RNG state."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def train_steps(
    groups: list[dict],
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    *,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    warmup_fraction: float = DEFAULT_WARMUP_FRACTION,
    progress: bool = False,
) -> list[float]:
    """AdamW over ``groups`` for ``epochs`` passes; ``loss_of(indices)`` is one batch's loss.

    Each group's learning rate is its ``lr`` times the warmup-cosine factor of the step.

    Returns:
        The mean training loss of each epoch.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if n < 2:
        raise ValueError(f"finetuning needs at least 2 training samples, got {n}")
    for group in groups:
        group["peak_lr"] = group["lr"]
    optimizer = torch.optim.AdamW(groups, betas=ADAMW_BETAS)
    total, step, losses = epochs * n_batches(n, batch_size), 0, []
    for _ in tqdm(range(epochs), desc="finetune", disable=not progress):
        epoch_loss = []
        for index in batches(n, batch_size, generator):
            factor = lr_factor(step, total, warmup_fraction)
            for group in optimizer.param_groups:
                group["lr"] = group["peak_lr"] * factor
            loss = loss_of(index)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite training loss {loss.item()} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            epoch_loss.append(loss.item())
            step += 1
        losses.append(sum(epoch_loss) / len(epoch_loss))
    return losses


def fit(
    encoder: nn.Module,
    head: nn.Module,
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    *,
    frozen: bool,
    epochs: int,
    lr: float,
    layer_decay: float,
    batch_size: int,
    seed: int,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    warmup_fraction: float = DEFAULT_WARMUP_FRACTION,
    progress: bool = False,
) -> list[float]:
    """Train ``head``, and ``encoder`` unless ``frozen``, with layer-wise decay; both end in eval.

    Args:
        encoder, head: the modules; a frozen encoder stays in eval mode and is never stepped.
        loss_of: batch indices [B] -> scalar loss through ``head`` (and ``encoder``).
        n: number of training samples.
        frozen, epochs, lr, layer_decay, batch_size, weight_decay, warmup_fraction: see
            ``param_groups_lrd`` and ``train_steps``.
        seed: seeds the shuffling.
        progress: show a tqdm bar over epochs.

    Returns:
        The mean training loss of each epoch.
    """
    groups = param_groups_lrd(None if frozen else encoder, head, lr, weight_decay, layer_decay)
    encoder.train(not frozen)
    head.train()
    try:
        return train_steps(
            groups,
            loss_of,
            n,
            epochs=epochs,
            batch_size=batch_size,
            generator=torch.Generator().manual_seed(seed),
            warmup_fraction=warmup_fraction,
            progress=progress,
        )
    finally:
        encoder.eval()
        head.eval()


def take(array, index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Rows ``index`` of an array-like as a float32 tensor on ``device``.

    Arrays other than tensors and ndarrays are read row by row, so lazy window arrays that only
    support integer indexing work too.
    """
    if isinstance(array, torch.Tensor):
        return array[index.to(array.device)].to(device, torch.float32)
    if isinstance(array, np.ndarray):
        rows = array[index.numpy()]
    else:
        rows = np.stack([np.asarray(array[i]) for i in index.tolist()])
    return torch.from_numpy(np.asarray(rows, dtype=np.float32)).to(device)


class ClassifierHead(nn.Module):
    """``[cls, mean of patch tokens]`` -> LayerNorm -> linear logits.

    Args:
        embed_dim: encoder width D (the head reads 2 D features).
        n_classes: number of outputs K.
    """

    def __init__(self, embed_dim: int, n_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(2 * embed_dim)
        self.fc = nn.Linear(2 * embed_dim, n_classes)
        nn.init.trunc_normal_(self.fc.weight, std=2e-5)  # MAE's finetuning head init
        nn.init.zeros_(self.fc.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, 1 + N, D] -> logits [B, K]."""
        pooled = torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=-1)  # [B, 2D]
        return self.fc(self.norm(pooled))


@dataclass
class FinetuneResult:
    """Outcome of ``finetune_classifier``.

    Attributes:
        accuracy: test accuracy (single-label), else None.
        map_micro, map_macro: test mean average precision (multilabel), else None.
        per_class_ap: {class: AP} for the classes with a positive test target (multilabel).
        loss: ``"cross_entropy"`` or ``"binary_cross_entropy"``.
        train_loss: mean training loss of each epoch.
        frozen: whether the encoder was kept frozen.
        encoder, head: the trained copy of the encoder (the input one when frozen) and head.
    """

    accuracy: float | None
    map_micro: float | None
    map_macro: float | None
    per_class_ap: dict[int, float] | None
    loss: str
    train_loss: list[float]
    frozen: bool
    encoder: nn.Module
    head: nn.Module


def encoder_copy(encoder: nn.Module, frozen: bool) -> nn.Module:
    """The encoder to train: the input itself when frozen (never stepped), else a deep copy."""
    return encoder if frozen else copy.deepcopy(encoder)


def finetune_classifier(
    encoder: nn.Module,
    train_x,
    train_y,
    test_x,
    test_y,
    band_ids: Sequence[str],
    wavelengths,
    *,
    multilabel: bool = False,
    frozen: bool = False,
    epochs: int = 50,
    lr: float = 1e-3,
    layer_decay: float = 0.75,
    batch_size: int = 64,
    seed: int = 0,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    warmup_fraction: float = DEFAULT_WARMUP_FRACTION,
    n_classes: int | None = None,
    progress: bool = False,
) -> FinetuneResult:
    """Finetune ``encoder`` with a linear head on images, then score the test images.

    Args:
        encoder: a SpectralViT-like encoder (``forward_features``, ``blocks``, ``embed_dim``).
        train_x, test_x: array-like [N, C, H, W] normalised images.
        train_y, test_y: [N] int64 classes, or [N, K] multi-hot {0, 1} when ``multilabel``.
        band_ids: registry keys of the C channels; wavelengths: [C] nm.
        multilabel: binary cross-entropy over K outputs, scored by mAP; else cross-entropy,
            scored by accuracy.
        frozen: train the head alone; the encoder is left bit-identical.
        epochs, lr, layer_decay, batch_size, weight_decay, warmup_fraction: the optimisation
            (``lr`` is the head's peak learning rate, see ``param_groups_lrd``).
        seed: seeds the head's initialisation and the shuffling.
        n_classes: K for single-label (default: 1 + the largest label seen).
        progress: show a tqdm bar over epochs.
    """
    device = next(encoder.parameters()).device
    train_y, test_y = torch.as_tensor(train_y), torch.as_tensor(test_y)
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise ValueError(
            f"images and labels differ in length: train {len(train_x)} vs {len(train_y)}, "
            f"test {len(test_x)} vs {len(test_y)}"
        )
    if multilabel:
        if train_y.dim() != 2:
            raise ValueError(f"multilabel targets must be [N, K], got {tuple(train_y.shape)}")
        k = train_y.shape[1]
    else:
        train_y, test_y = train_y.long(), test_y.long()
        k = int(max(train_y.max(), test_y.max())) + 1 if n_classes is None else n_classes
    wavelengths = torch.as_tensor(wavelengths, dtype=torch.float32, device=device)
    model = encoder_copy(encoder, frozen)

    def features(images: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            return model.forward_features(images, band_ids, wavelengths)  # [B, 1 + N, D]

    def loss_of(index: torch.Tensor) -> torch.Tensor:
        logits = head(features(take(train_x, index, device)))  # [B, K]
        target = train_y[index].to(device)
        if multilabel:
            return F.binary_cross_entropy_with_logits(logits, target.float())
        return F.cross_entropy(logits, target)

    with seeded(seed, device):
        head = ClassifierHead(model.embed_dim, k).to(device)
        train_loss = fit(
            model,
            head,
            loss_of,
            len(train_x),
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
    with torch.no_grad():
        logits = torch.cat(
            [
                head(features(take(test_x, index, device))).float().cpu()
                for index in torch.arange(len(test_x)).split(batch_size)
            ]
        )  # [M, K]
    ap = average_precision_micro_macro(logits, test_y.long()) if multilabel else None
    return FinetuneResult(
        accuracy=None if multilabel else accuracy(logits.argmax(-1), test_y),
        map_micro=ap.micro if ap else None,
        map_macro=ap.macro if ap else None,
        per_class_ap=ap.per_class if ap else None,
        loss="binary_cross_entropy" if multilabel else "cross_entropy",
        train_loss=train_loss,
        frozen=frozen,
        encoder=model,
        head=head,
    )
