"""Dense heads over a plain ViT: UPerNet segmentation and siamese change detection.

A plain ViT has one resolution (the patch grid), so, as BEiT and MAE do for ADE20K, the tokens
after four evenly spaced blocks are turned into a 4-scale pyramid (x4 and x2 by transposed
convolutions, identity, /2 by max pooling) and decoded by UPerNet (Xiao et al., "Unified
Perceptual Parsing for Scene Understanding", ECCV 2018): a pyramid pooling module on the
coarsest level, FPN top-down fusion, a 3x3 fusion of all levels at the finest scale, per-pixel
logits upsampled to the input size. Widths follow mmsegmentation's ``UPerHead`` (conv + BN +
ReLU blocks) and are configurable so tests run small.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

DEFAULT_POOL_SCALES = (1, 2, 3, 6)


def default_layers(depth: int) -> tuple[int, ...]:
    """Four evenly spaced block indices (0-based), ending at the last block.

    ``depth`` 12 gives (2, 5, 8, 11); encoders with fewer than 4 blocks repeat blocks.
    """
    if depth < 1:
        raise ValueError(f"an encoder needs at least one block, got depth {depth}")
    return tuple(math.ceil((k + 1) * depth / 4) - 1 for k in range(4))


def multilevel_features(
    encoder: nn.Module,
    images: torch.Tensor,
    band_ids: Sequence[str],
    wavelengths: torch.Tensor,
    layers: Sequence[int] | None = None,
) -> list[torch.Tensor]:
    """Patch tokens after the blocks ``layers`` as maps on the patch grid.

    Runs ``encode``'s block loop (cls token included, as the blocks were trained with it) and
    keeps the outputs of the tapped blocks, before the encoder's final norm, as BEiT's
    segmentation does. Tokenizers with several tokens per patch (channel groups, group major)
    are averaged over their groups.

    Args:
        encoder: a SpectralViT (``tokenize``, ``cls_token``, ``blocks``, ``grid``).
        images: [B, C, H, W] normalised; H, W multiples of the patch size.
        band_ids: registry keys of the C channels; wavelengths: [C] nm.
        layers: 0-based block indices to tap (default ``default_layers(depth)``).

    Returns:
        One map [B, D, H / p, W / p] per entry of ``layers``, in that order.
    """
    depth = len(encoder.blocks)
    layers = tuple(default_layers(depth) if layers is None else layers)
    bad = [i for i in layers if not 0 <= i < depth]
    if bad:
        raise ValueError(f"block index {bad[0]} is outside the encoder's {depth} blocks")
    grid_h, grid_w = encoder.grid(images)
    tokens = encoder.tokenize(images, band_ids, wavelengths)  # [B, G * N, D]
    x = torch.cat([encoder.cls_token(tokens), tokens], dim=1)  # [B, 1 + G * N, D]
    taps = {}
    for i, block in enumerate(encoder.blocks[: max(layers) + 1]):
        if getattr(encoder, "grad_checkpointing", False) and encoder.training:
            x = checkpoint(block, x, use_reentrant=False)
        else:
            x = block(x)
        if i in layers:
            taps[i] = x
    b, d = x.shape[0], x.shape[-1]
    maps = []
    for i in layers:
        patches = taps[i][:, 1:].reshape(b, -1, grid_h * grid_w, d).mean(1)  # [B, N, D]
        maps.append(patches.transpose(1, 2).reshape(b, d, grid_h, grid_w))  # [B, D, h, w]
    return maps


class ConvNormAct(nn.Sequential):
    """Conv (no bias) -> BatchNorm -> ReLU, mmsegmentation's ``ConvModule``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class FeaturePyramid(nn.Module):
    """Four same-scale ViT maps -> strides p/4, p/2, p, 2p (BEiT's ``fpn1..fpn4``).

    Args:
        embed_dim: width D of the maps (kept at every level).
    """

    def __init__(self, embed_dim: int):
        super().__init__()
        d = embed_dim
        self.levels = nn.ModuleList(
            [
                nn.Sequential(
                    nn.ConvTranspose2d(d, d, 2, stride=2),
                    nn.BatchNorm2d(d),
                    nn.GELU(),
                    nn.ConvTranspose2d(d, d, 2, stride=2),
                ),
                nn.ConvTranspose2d(d, d, 2, stride=2),
                nn.Identity(),
                # ceil_mode keeps the last row/column of odd grids.
                nn.MaxPool2d(2, stride=2, ceil_mode=True),
            ]
        )

    def forward(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """4 x [B, D, h, w] -> [B, D, 4h, 4w], [B, D, 2h, 2w], [B, D, h, w], [B, D, h/2, w/2]."""
        if len(maps) != 4:
            raise ValueError(f"the pyramid needs 4 feature maps, got {len(maps)}")
        return [level(m) for level, m in zip(self.levels, maps, strict=True)]


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling: average pools at ``scales`` bins, 1x1 conv, upsample, concat,
    3x3 bottleneck to ``channels``."""

    def __init__(self, in_channels: int, channels: int, scales: Sequence[int]):
        super().__init__()
        self.scales = tuple(scales)
        self.branches = nn.ModuleList(ConvNormAct(in_channels, channels, 1) for _ in self.scales)
        self.bottleneck = ConvNormAct(in_channels + len(self.scales) * channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, D, h, w] -> [B, channels, h, w]."""
        size = x.shape[-2:]
        pooled = [
            F.interpolate(
                branch(F.adaptive_avg_pool2d(x, scale)),
                size=size,
                mode="bilinear",
                align_corners=False,
            )
            for scale, branch in zip(self.scales, self.branches, strict=True)
        ]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))


class UPerNetHead(nn.Module):
    """UPerNet decoder over four ViT feature maps (module docstring).

    Args:
        embed_dim: width D of the encoder's maps.
        n_classes: number of output classes K.
        channels: decoder width (mmsegmentation uses 512 for ViT-B; small values for tests).
        pool_scales: bins of the pyramid pooling module on the coarsest level; empty replaces
            it with one 3x3 conv (the lighter decoder of ``SiameseChangeHead``).
        dropout: dropout before the classifier (mmsegmentation: 0.1).
    """

    def __init__(
        self,
        embed_dim: int,
        n_classes: int,
        channels: int = 256,
        pool_scales: Sequence[int] = DEFAULT_POOL_SCALES,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.pyramid = FeaturePyramid(embed_dim)
        self.laterals = nn.ModuleList(ConvNormAct(embed_dim, channels, 1) for _ in range(3))
        self.top = (
            PyramidPooling(embed_dim, channels, pool_scales)
            if pool_scales
            else ConvNormAct(embed_dim, channels, 3)
        )
        self.fpn_convs = nn.ModuleList(ConvNormAct(channels, channels, 3) for _ in range(3))
        self.fuse = ConvNormAct(4 * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, n_classes, 1)

    def forward(self, maps: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """4 x [B, D, h, w] maps (``multilevel_features``) -> logits [B, K, *size]."""
        levels = self.pyramid(maps)  # strides p/4, p/2, p, 2p
        lateral = [conv(x) for conv, x in zip(self.laterals, levels[:3], strict=True)]
        lateral.append(self.top(levels[3]))  # 4 x [B, c, h_l, w_l]
        for i in range(3, 0, -1):  # top-down: each level adds the coarser one, upsampled
            lateral[i - 1] = lateral[i - 1] + resize(lateral[i], lateral[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, lateral[:3], strict=True)]
        outs.append(lateral[3])
        finest = outs[0].shape[-2:]
        fused = self.fuse(torch.cat([resize(o, finest) for o in outs], dim=1))  # [B, c, 4h, 4w]
        return resize(self.classifier(self.dropout(fused)), size)  # [B, K, H, W]


class SiameseChangeHead(nn.Module):
    """Change logits of two dates encoded by one shared encoder.

    The maps of the two dates are fused by their absolute difference at every level: it is
    symmetric in the dates (a change from A to B is labelled as one from B to A), it is zero
    where nothing changed, whatever the scene looks like, and it keeps the width D, as in
    FC-Siam-diff (Daudt et al., ICIP 2018); concatenation would double the width and make the
    decoder learn the symmetry. A light UPerNet (no pyramid pooling) decodes the difference.

    Args:
        embed_dim: width D of the encoder's maps.
        channels: decoder width.
        dropout: dropout before the classifier.
    """

    def __init__(self, embed_dim: int, channels: int = 128, dropout: float = 0.1):
        super().__init__()
        self.decoder = UPerNetHead(embed_dim, 2, channels, pool_scales=(), dropout=dropout)

    def forward(
        self,
        maps_a: Sequence[torch.Tensor],
        maps_b: Sequence[torch.Tensor],
        size: tuple[int, int],
    ) -> torch.Tensor:
        """Two dates' 4 x [B, D, h, w] maps -> logits [B, 2, *size] (class 1 = change)."""
        diff = [(a - b).abs() for a, b in zip(maps_a, maps_b, strict=True)]
        return self.decoder(diff, size)


def resize(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize of [B, C, h, w] to ``size`` (mmsegmentation: align_corners=False)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
