"""Spectral adapter for hyperspectral cubes (SpectralEarth; SPECS T4) and its tokenizer.

The adapter convolves along the spectral axis only (kernels (k, 1, 1)), three strided blocks
Conv3d -> BatchNorm3d -> ReLU (kernel/stride/padding 7/5/1 1->32, 7/5/1 32->64, 5/3/1
64->128), then averages what is left of the spectrum: [B, C, H, W] -> [B, 128, H, W] for any
C large enough. The strides (5, 5, 3) shrink the spectrum about 75-fold: fewer than 75 bands
leave no spectral sample after the last block (``spectral_length``) and are refused.

A spectral convolution needs neighbouring channels to be neighbouring wavelengths, so the
tokenizer sorts the bands by wavelength before the adapter: any input order gives the same
output.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from eoforge.models.pos_embed import sincos_2d
from eoforge.models.spectral import MICROWAVE_MIN_NM, UnsupportedBandError

# (in, out, kernel, stride, padding) along the spectrum, as SpectralEarth.
ADAPTER_BLOCKS = ((1, 32, 7, 5, 1), (32, 64, 7, 5, 1), (64, 128, 5, 3, 1))


def spectral_length(bands: int) -> int:
    """Spectral samples left after the adapter's strided convolutions (<= 0: too few bands)."""
    length = bands
    for _, _, kernel, stride, padding in ADAPTER_BLOCKS:
        length = (length + 2 * padding - kernel) // stride + 1
    return length


# Fewest bands that leave one spectral sample: 75.
MIN_BANDS = next(c for c in range(1, 1000) if spectral_length(c) >= 1)


class SpectralAdapter(nn.Module):
    """Spectral-only 3-D convolutions pooled over the spectrum: [B, C, H, W] -> [B, 128, H, W].

    Bands must arrive sorted by wavelength (``SpectralAdapterPatchEmbed`` sorts them).
    """

    out_channels = ADAPTER_BLOCKS[-1][1]

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        for cin, cout, kernel, stride, padding in ADAPTER_BLOCKS:
            layers += [
                nn.Conv3d(cin, cout, (kernel, 1, 1), (stride, 1, 1), (padding, 0, 0)),
                nn.BatchNorm3d(cout),
                nn.ReLU(inplace=True),
            ]
        self.blocks = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool3d((1, None, None))

    def forward(self, cube: torch.Tensor) -> torch.Tensor:
        bands = cube.shape[1]
        if bands < MIN_BANDS:
            raise ValueError(
                f"the spectral adapter needs at least {MIN_BANDS} bands, got {bands}: its strided "
                f"spectral convolutions (strides 5, 5, 3) leave {spectral_length(bands)} spectral "
                "samples; use a tokenizer for multispectral input (spectrum-aware or DOFA)"
            )
        x = self.blocks(cube[:, None])  # [B, 128, L, H, W]
        return self.pool(x)[:, :, 0]  # [B, 128, H, W]


class SpectralAdapterPatchEmbed(nn.Module):
    """Tokenizer: spectral adapter, then a p x p stride-p Conv2d 128 -> D (SPECS T4).

    Args:
        patch_size: side of a square patch in pixels.
        embed_dim: token width D.

    Attributes:
        tokens_per_patch: always 1.
    """

    tokens_per_patch = 1

    def __init__(self, patch_size: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.adapter = SpectralAdapter()
        self.proj = nn.Conv2d(SpectralAdapter.out_channels, embed_dim, patch_size, patch_size)
        self._checked: set[tuple[str, ...]] = set()

    def _check_bands(self, band_ids: Sequence[str], wavelengths: torch.Tensor) -> None:
        # Once per band set (a host read): a radar band has no place on an optical spectrum.
        key = tuple(band_ids)
        if key in self._checked:
            return
        row = wavelengths if wavelengths.dim() == 1 else wavelengths[0]
        for band_id, wl in zip(band_ids, row.tolist(), strict=True):
            if wl >= MICROWAVE_MIN_NM:
                raise UnsupportedBandError(
                    f"SAR band {band_id!r} cannot enter the spectral adapter, which convolves "
                    "along an optical spectrum; drop it"
                )
        self._checked.add(key)

    def forward(
        self, images: torch.Tensor, band_ids: Sequence[str], wavelengths: torch.Tensor
    ) -> torch.Tensor:
        """images [B, C, H, W] -> tokens [B, N, D], N = (H/p)(W/p) row-major, no positions.

        ``wavelengths`` is [C] or [B, C] in nm; bands are sorted by it per sample.
        """
        self._check_bands(band_ids, wavelengths)
        order = wavelengths.to(images.device).expand(images.shape[0], -1).argsort(dim=1)
        cube = torch.gather(images, 1, order[:, :, None, None].expand_as(images))  # [B, C, H, W]
        cube = cube.to(self.proj.weight.dtype)  # under bf16 engines the weights set the dtype
        out = self.proj(self.adapter(cube))  # [B, D, H/p, W/p]
        return out.flatten(2).transpose(1, 2)  # [B, N, D]

    def positions(self, grid_h: int, grid_w: int, like: torch.Tensor) -> torch.Tensor:
        """Plain 2-D sincos [N, D] in ``like``'s dtype and device."""
        return sincos_2d(grid_h, grid_w, self.embed_dim, like.device, like.dtype)
