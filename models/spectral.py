"""Spectrum-aware patch projection and reconstruction heads (SMARTIES, ICCV'25; SPECS T1).

A fixed table of spectral ranges each owns a linear projection ``f_i: p*p -> D`` and a
reconstruction head ``g_i: D_dec -> p*p``. Band ``b`` of a patch maps to range ``pi(b)`` and the
token is ``S * mean_b f_pi(b)(patch_b)``, so any subset and order of bands works. Bands travel as
``band_ids`` (registry keys such as ``"S2L2A:B8A"``) plus centre wavelengths in nm; this module
never imports the data layer.

Band -> range resolution (``SpectralRanges.band_weights``), a [C, R] matrix of mixing weights:
  * SAR bands (wavelength >= 1 mm) match the range of their polarisation (the band name after
    the colon, e.g. ``VV``); a polarisation without a range is refused.
  * Optical bands match the narrowest range containing their wavelength; ranges restricted to a
    sensor (the RGB ranges) only match bands of that sensor, and win over generic ranges there.
  * A band in no range but within ``max_gap_nm`` of some range gets the inverse-distance
    weighted mix of the two nearest ranges, with a warning naming it. The upstream formula
    weighted the FARTHER range more; here the nearer range always gets the larger weight.
  * A band farther than ``max_gap_nm`` from every range (e.g. thermal infrared) is refused with
    an error naming it: nothing is ever zero-filled or guessed silently.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from eoforge.models.pos_embed import sincos_2d

MICROWAVE_MIN_NM = 1e6


@dataclass(frozen=True)
class SpectralRange:
    """One spectral range: a wavelength interval (nm), or a SAR polarisation."""

    name: str
    lo: float
    hi: float
    polarisation: str | None = None
    sensors: tuple[str, ...] = ()

    def distance(self, wavelength: float) -> float:
        return max(self.lo - wavelength, wavelength - self.hi, 0.0)


def _s2_range(name: str, centre: float, width: float) -> SpectralRange:
    return SpectralRange(f"S2_{name}", centre - width / 2, centre + width / 2)


# SMARTIES' 17 ranges: Sentinel-2 B01-B12 with B8A and without B10 (centre +- FWHM/2 of the
# Sentinel-2A spectral response), RGB R/G/B for RGB cameras, Sentinel-1 VV and VH.
SMARTIES_RANGES: tuple[SpectralRange, ...] = (
    _s2_range("B01", 442.7, 21.0),
    _s2_range("B02", 492.4, 66.0),
    _s2_range("B03", 559.8, 36.0),
    _s2_range("B04", 664.6, 31.0),
    _s2_range("B05", 704.1, 15.0),
    _s2_range("B06", 740.5, 15.0),
    _s2_range("B07", 782.8, 20.0),
    _s2_range("B08", 832.8, 106.0),
    _s2_range("B8A", 864.7, 21.0),
    _s2_range("B09", 945.1, 20.0),
    _s2_range("B11", 1613.7, 91.0),
    _s2_range("B12", 2202.4, 175.0),
    SpectralRange("RGB_R", 600.0, 700.0, sensors=("RGB",)),
    SpectralRange("RGB_G", 500.0, 600.0, sensors=("RGB",)),
    SpectralRange("RGB_B", 400.0, 500.0, sensors=("RGB",)),
    SpectralRange("SAR_VV", MICROWAVE_MIN_NM, math.inf, polarisation="VV"),
    SpectralRange("SAR_VH", MICROWAVE_MIN_NM, math.inf, polarisation="VH"),
)

RANGE_TABLES: dict[str, tuple[SpectralRange, ...]] = {"smarties17": SMARTIES_RANGES}


class UnsupportedBandError(ValueError):
    """A band the spectral ranges cannot represent; the message names the band."""


class SpectralRanges:
    """Resolves bands to mixing weights over a table of spectral ranges (see module docstring)."""

    def __init__(self, ranges: Sequence[SpectralRange], max_gap_nm: float = 500.0):
        self.ranges = tuple(ranges)
        self.max_gap_nm = max_gap_nm

    def __len__(self) -> int:
        return len(self.ranges)

    def resolve(self, band_id: str, wavelength: float) -> dict[int, float]:
        """Weights {range index: weight} for one band; they sum to 1."""
        sensor, _, name = band_id.partition(":")
        if wavelength >= MICROWAVE_MIN_NM:
            for i, r in enumerate(self.ranges):
                if r.polarisation and r.polarisation.upper() == name.upper():
                    return {i: 1.0}
            raise UnsupportedBandError(
                f"SAR band {band_id!r} has polarisation {name!r}, which no spectral range of this "
                f"model covers (it has: {[r.polarisation for r in self.ranges if r.polarisation]})"
            )
        optical = [
            (i, r)
            for i, r in enumerate(self.ranges)
            if r.polarisation is None and (not r.sensors or sensor in r.sensors)
        ]
        # Sensor-specific ranges win over generic ones, then the narrowest range wins.
        containing = [
            (not r.sensors, r.hi - r.lo, i) for i, r in optical if r.lo <= wavelength <= r.hi
        ]
        if containing:
            return {min(containing)[2]: 1.0}
        generic = [(r.distance(wavelength), i) for i, r in optical if not r.sensors]
        nearest = sorted(generic)[:2]
        if not nearest or nearest[0][0] > self.max_gap_nm:
            raise UnsupportedBandError(
                f"band {band_id!r} at {wavelength:.1f} nm lies more than {self.max_gap_nm:.0f} nm "
                "from every spectral range of this model; drop it from the input (bands=...)"
            )
        inverse = {i: 1.0 / d for d, i in nearest}
        total = sum(inverse.values())
        return {i: w / total for i, w in inverse.items()}

    def band_weights(self, band_ids: Sequence[str], wavelengths: Sequence[float]) -> torch.Tensor:
        """Mixing matrix [C, R] for a band set; warns once naming interpolated bands."""
        weights = torch.zeros(len(band_ids), len(self.ranges))
        interpolated = []
        for c, (band_id, wl) in enumerate(zip(band_ids, wavelengths, strict=True)):
            row = self.resolve(band_id, float(wl))
            for i, w in row.items():
                weights[c, i] = w
            if len(row) > 1:
                interpolated.append(f"{band_id} ({float(wl):.0f} nm)")
        if interpolated:
            shown = ", ".join(interpolated[:8]) + (" ..." if len(interpolated) > 8 else "")
            warnings.warn(
                f"{len(interpolated)} band(s) fall in no spectral range and are projected by "
                f"inverse-distance weighting of the two nearest ranges: {shown}",
                stacklevel=3,
            )
        return weights


class BandWeightCache(nn.Module):
    """Caches the [C, R] mixing matrix per band set, keyed by the band_ids alone.

    A band_id always names the same band, so wavelengths are read (a host copy) only the first
    time a band set is seen: no host synchronisation in the steady-state training step.
    """

    def __init__(self, ranges: SpectralRanges):
        super().__init__()
        self.ranges = ranges
        self._cache: dict[tuple[tuple[str, ...], torch.device, torch.dtype], torch.Tensor] = {}

    def forward(self, band_ids: Sequence[str], wavelengths: torch.Tensor, like: torch.Tensor):
        key = (tuple(band_ids), like.device, like.dtype)
        if key not in self._cache:
            row = wavelengths if wavelengths.dim() == 1 else wavelengths[0]
            weights = self.ranges.band_weights(band_ids, row.tolist())
            self._cache[key] = weights.to(device=like.device, dtype=like.dtype)
        return self._cache[key]


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, N, p*p] with N = (H/p)*(W/p) in row-major order."""
    return rearrange(images, "b c (h p) (w q) -> b c (h w) (p q)", p=patch_size, q=patch_size)


def unpatchify(patches: torch.Tensor, patch_size: int, grid_h: int) -> torch.Tensor:
    """[B, C, N, p*p] -> [B, C, H, W]."""
    return rearrange(
        patches, "b c (h w) (p q) -> b c (h p) (w q)", h=grid_h, p=patch_size, q=patch_size
    )


class SpectrumAwarePatchEmbed(nn.Module):
    """Per-range linear patch projections averaged over the bands present (SPECS T1).

    All bands are projected in ONE matmul: the [C, R] mixing matrix folds the per-range weights
    [R, p*p, D] into per-band weights [C, p*p, D], and the patches [B, N, C*p*p] meet them as
    a single [C*p*p, D] matrix.
    """

    def __init__(
        self,
        patch_size: int,
        embed_dim: int,
        ranges: str = "smarties17",
        band_scale: float = 12.0,
        max_gap_nm: float = 500.0,
    ):
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.band_scale = band_scale
        self.ranges = SpectralRanges(RANGE_TABLES[ranges], max_gap_nm)
        self.weights = BandWeightCache(self.ranges)
        k = patch_size * patch_size
        self.weight = nn.Parameter(torch.empty(len(self.ranges), k, embed_dim))
        self.bias = nn.Parameter(torch.zeros(len(self.ranges), embed_dim))
        # Same init as a p*p -> D linear layer per range.
        nn.init.uniform_(self.weight, -1 / math.sqrt(k), 1 / math.sqrt(k))

    tokens_per_patch = 1

    def positions(self, grid_h: int, grid_w: int, like: torch.Tensor) -> torch.Tensor:
        """2-D sincos position table [N, D] in ``like``'s dtype and device."""
        return sincos_2d(grid_h, grid_w, self.embed_dim, like.device, like.dtype)

    def forward(
        self, images: torch.Tensor, band_ids: Sequence[str], wavelengths: torch.Tensor
    ) -> torch.Tensor:
        """images [B, C, H, W] -> tokens [B, N, D]."""
        mix = self.weights(band_ids, wavelengths, self.weight)  # [C, R]
        channels = mix.shape[0]
        per_band = torch.einsum("cr,rkd->ckd", mix, self.weight)  # [C, p*p, D]
        # Images arrive in float32; under bf16/fp16 engines the weights set the compute dtype.
        images = images.to(per_band.dtype)
        x = rearrange(patchify(images, self.patch_size), "b c n k -> b n (c k)")  # [B, N, C*p*p]
        scale = self.band_scale / channels  # S * mean over the bands present
        tokens = x @ per_band.flatten(0, 1)  # [B, N, D]
        return (tokens + mix.sum(0) @ self.bias) * scale


class SpectralReconstructionHead(nn.Module):
    """Per-range heads ``g_i: D_dec -> p*p``; band b is predicted by its range's head (SPECS T1)."""

    def __init__(self, patch_embed: SpectrumAwarePatchEmbed, decoder_dim: int):
        super().__init__()
        k = patch_embed.patch_size**2
        self.weights = BandWeightCache(patch_embed.ranges)  # same band -> range resolution
        self.weight = nn.Parameter(torch.empty(len(patch_embed.ranges), decoder_dim, k))
        self.bias = nn.Parameter(torch.zeros(len(patch_embed.ranges), k))
        nn.init.uniform_(self.weight, -1 / math.sqrt(decoder_dim), 1 / math.sqrt(decoder_dim))

    def forward(
        self, z: torch.Tensor, band_ids: Sequence[str], wavelengths: torch.Tensor
    ) -> torch.Tensor:
        """Decoder tokens z [B, N, D_dec] -> per-band patch predictions [B, C, N, p*p]."""
        mix = self.weights(band_ids, wavelengths, self.weight)  # [C, R]
        per_band = torch.einsum("cr,rdk->cdk", mix, self.weight)  # [C, D_dec, p*p]
        bias = mix @ self.bias  # [C, p*p]
        return torch.einsum("bnd,cdk->bcnk", z, per_band) + bias[None, :, None, :]
