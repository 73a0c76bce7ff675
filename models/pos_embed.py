"""Fixed sine-cosine position embeddings, computed for any grid size."""

from __future__ import annotations

import torch


def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Sine-cosine embedding of positions [L] -> [L, dim] (dim even)."""
    omega = torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # [dim/2]
    angles = positions.to(torch.float64)[:, None] * omega[None, :]  # [L, dim/2]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(grid_h: int, grid_w: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """MAE's 2-D sine-cosine table for a grid_h x grid_w patch grid -> [grid_h*grid_w, dim].

    Half of the channels encode the row, half the column. Computed in float64 and cast to
    ``dtype`` so bf16 runs get the table in the compute dtype (DeepSpeed casts parameters,
    not tensors made in forward).
    """
    if dim % 4:
        raise ValueError(f"embedding dim {dim} must be divisible by 4 for 2-D sincos")
    rows = torch.arange(grid_h, device=device).repeat_interleave(grid_w)  # [N]
    cols = torch.arange(grid_w, device=device).repeat(grid_h)  # [N]
    table = torch.cat([sincos_1d(rows, dim // 2), sincos_1d(cols, dim // 2)], dim=1)
    return table.to(dtype)


def patch_grid(images: torch.Tensor, patch_size: int) -> tuple[int, int]:
    """Patch grid (rows, cols) of images [..., H, W]; sides must be multiples of the patch."""
    h, w = images.shape[-2:]
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {h}x{w} is not a multiple of patch size {patch_size}")
    return h // patch_size, w // patch_size
