"""Frozen feature extraction: one pooled vector per image from a release's encoder, and the
device evaluation runs on."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm


def resolve_device(name: str | None = None) -> torch.device:
    """The evaluation device: ``name`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``), or with None or
    ``"auto"`` CUDA when present, else the CPU.

    Raises:
        ValueError: naming the device when it is CUDA and no CUDA device is present.
    """
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is present here; use --device cpu")
    return device


def autocast_on(device: torch.device):
    """bf16 autocast on CUDA (features are pooled and probed in fp32 afterwards); on the CPU a
    no-op, so CPU features stay fp32 and bit-reproducible."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    images,
    band_ids: Sequence[str],
    wavelengths: torch.Tensor,
    *,
    batch_size: int = 256,
    progress: bool = True,
    desc: str = "features",
) -> torch.Tensor:
    """Encode ``images`` in batches and pool each into ``[cls, mean of patch tokens]``.

    The concatenation follows dinov2's linear evaluation: the cls token alone is untrained for
    objectives without a cls loss (MAE), and the patch mean alone drops what cls did learn.

    Args:
        encoder: an encoder with ``forward_features(images, band_ids, wavelengths) -> [B, 1+N, D]``;
            run in eval mode on the device of its parameters (under bf16 autocast on CUDA).
        images: array-like [N, C, H, W] float32, already normalised; sliced per batch, so lazy
            window arrays never materialise whole.
        band_ids, wavelengths: identity of the C channels (wavelengths [C] nm).
        batch_size: images per forward pass.
        progress: show a tqdm bar.
        desc: label of the progress bar.

    Returns:
        Features [N, 2 * D] float32 on the CPU.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    wavelengths = torch.as_tensor(wavelengths, dtype=torch.float32, device=device)
    chunks = []
    try:
        for start in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress):
            batch = np.asarray(images[start : start + batch_size], dtype=np.float32)
            batch = torch.from_numpy(batch).to(device)  # [B, C, H, W]
            with autocast_on(device):
                tokens = encoder.forward_features(batch, band_ids, wavelengths)  # [B, 1+N, D]
            tokens = tokens.float()
            pooled = torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=-1)  # [B, 2D]
            chunks.append(pooled.float().cpu())
    finally:
        encoder.train(was_training)
    if not chunks:
        raise ValueError("extract_features got no images")
    return torch.cat(chunks)  # [N, 2D]
