"""Histogram-of-oriented-gradients energy of image patches, the PSTS score of SelectiveMAE (SPECS O2).

Sobel gradients of a single-band image, unsigned orientation in 9 bins over [0, pi), gradient
magnitudes summed per bin over 8 x 8 pixel cells; the HOG vector of a patch is its cells'
histograms side by side ([9 * cells]). Everything runs on the tensor, batched: one convolution,
one scatter and reshapes, no loop over patches.

**BUG** upstream: the published scorer standardises each patch's HOG vector (minus its mean,
over its std) and then averages it, which is 0 for every patch up to rounding, so the
"HOG-weighted" selection is uniform. ``hog_energy`` keeps the vector un-normalised and scores a
patch by its root-mean-square bin (its HOG energy): textured patches, and among equally textured
ones those with a dominant edge direction, score higher.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BINS = 9
CELL = 8


def luminance(images: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the valid bands of each pixel: images [B, C, H, W] -> [B, 1, H, W].

    Bands are normalised per band upstream of the objective, so their mean is a luminance-like
    image whatever the sensor; a pixel without any valid band is 0.
    """
    if valid is None:
        return images.float().mean(dim=1, keepdim=True)
    weight = valid.float()
    total = (images.float() * weight).sum(dim=1, keepdim=True)
    return total / weight.sum(dim=1, keepdim=True).clamp_min(1.0)


def hog_cells(image: torch.Tensor, cell: int = CELL, bins: int = BINS) -> torch.Tensor:
    """Cell histograms of oriented gradients: image [B, 1, H, W] -> [B, bins, H/cell, W/cell].

    Each pixel adds its Sobel gradient magnitude to the bin of its unsigned orientation.
    """
    b, _, h, w = image.shape
    if h % cell or w % cell:
        raise ValueError(f"image size {h}x{w} is not a multiple of the HOG cell size {cell}")
    sobel_x = image.new_tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
    kernels = torch.stack([sobel_x, sobel_x.T])[:, None]  # [2, 1, 3, 3]: d/dx, d/dy
    padded = F.pad(image.float(), (1, 1, 1, 1), mode="replicate")
    grad = F.conv2d(padded, kernels.float())  # [B, 2, H, W]
    magnitude = grad.norm(dim=1, keepdim=True)  # [B, 1, H, W]
    angle = torch.atan2(grad[:, 1:], grad[:, :1]).remainder(math.pi)  # [B, 1, H, W] in [0, pi)
    index = (angle * (bins / math.pi)).long().clamp_max(bins - 1)  # [B, 1, H, W]
    hist = image.new_zeros(b, bins, h, w, dtype=torch.float32)
    hist.scatter_(1, index, magnitude)  # [B, bins, H, W], one non-zero bin per pixel
    hist = hist.reshape(b, bins, h // cell, cell, w // cell, cell)
    return hist.sum(dim=(3, 5))  # [B, bins, H/cell, W/cell]


def patch_hog(image: torch.Tensor, patch_size: int) -> torch.Tensor:
    """HOG vector of every patch: image [B, 1, H, W] -> [B, N, bins * cells] (row-major patches).

    Cells are 8 x 8 pixels where the patch side is a multiple of 8, else one cell per patch.
    """
    cell = CELL if patch_size % CELL == 0 else patch_size
    hist = hog_cells(image, cell)  # [B, bins, Hc, Wc]
    b, bins, hc, wc = hist.shape
    per = patch_size // cell  # cells per patch side
    hist = hist.reshape(b, bins, hc // per, per, wc // per, per)
    # -> [B, gh, gw, per, per, bins]: one patch's cells and bins together.
    return hist.permute(0, 2, 4, 3, 5, 1).reshape(b, (hc // per) * (wc // per), -1)


def hog_energy(
    images: torch.Tensor, patch_size: int, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """HOG energy per patch: images [B, C, H, W] -> [B, N], the RMS of each un-normalised HOG
    vector of the band-mean image (see the module docstring for the upstream bug it fixes)."""
    # A score, not a trained path: in fp32 even under autocast, whose bf16 Sobel responses
    # would also coarsen the orientation bins.
    with torch.autocast(images.device.type, enabled=False):
        vectors = patch_hog(luminance(images.float(), valid), patch_size)  # [B, N, bins * cells]
    return vectors.square().mean(dim=-1).sqrt()
