"""Wavelength-conditioned dynamic patch embedding (DOFA; SPECS T2).

A hypernetwork turns the band set of a batch into the kernel of a stride-p convolution:

1. each band c gets a code ``w_c = FCRes(sincos_128(lambda_c))`` (lambda in nm, DOFA's
   "micrometres * 1000"); ``FCResLayer`` is DOFA's residual two-layer MLP,
   ``x + ReLU(Linear(ReLU(Linear(x))))``;
2. the sequence ``[128 learned weight tokens; w_1..w_C; bias token]`` passes one transformer
   encoder layer (d = 128, 4 heads, feed-forward 2048, post-norm, GELU: DOFA's
   ``nn.TransformerEncoderLayer``);
3. band c's kernel slice is ``Linear(128, p*p*D)(out_c + w_c)`` and the bias is
   ``Linear(128, D)(out_bias)``; kernel [D, C, p, p] and bias are scaled by 0.01.

Because every band's kernel slice is generated from its own code (the transformer is
permutation-equivariant over the band tokens), permuting the bands together with their
wavelengths permutes the kernel's input channels and leaves the tokens unchanged. That needs
the generated [C, p*p*D] weights reshaped per band, [C, p, p, D] -> [D, C, p, p], the layout
of DOFA's later code; its first release ``view``ed them straight to [D, C, p, p], which mixes
rows of different bands into one input channel. Unlike DOFA the convolution has no padding:
DOFA pads by 1 with stride p, which shifts the patch grid by one pixel off the patches that
``positions`` and the reconstruction targets assume.

SAR bands: DOFA passes every band's wavelength through the same sincos code. A SAR band's
wavelength in eoforge is the radar wavelength, ~5.5e7 nm for Sentinel-1, where the code aliases
(its longest period is ~54 um) and carries nothing about polarisation. Here a SAR
band (wavelength >= 1 mm) takes instead a learned 128-d code per polarisation, named by the
band name after the colon (``"S1GRD:VV"`` -> ``VV``); the radar frequency is not encoded.
Refused, with an error naming the band: a SAR band whose polarisation has no code, and an
optical band outside (0, ``max_optical_nm``], beyond which the sincos code is ambiguous.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from eoforge.models.pos_embed import sincos_2d
from eoforge.models.sincos import sincos_wavelength
from eoforge.models.spectral import MICROWAVE_MIN_NM, UnsupportedBandError

WAVE_DIM = 128
NUM_WEIGHT_TOKENS = 128
KERNEL_SCALE = 0.01
# Longest period of the 128-d sincos code is 2*pi*10000**(63/64) nm ~ 54 um; stay below it.
MAX_OPTICAL_NM = 50_000.0


class FCResLayer(nn.Module):
    """DOFA's residual MLP on the wavelength code: ``x + ReLU(W2 ReLU(W1 x))``."""

    def __init__(self, dim: int = WAVE_DIM):
        super().__init__()
        self.w1 = nn.Linear(dim, dim)
        self.w2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.relu(self.w2(F.relu(self.w1(x))))


class TransformerWeightGenerator(nn.Module):
    """Band codes [C, 128] -> per-band kernel rows [C, p*p*D] and a bias [D] (unscaled)."""

    def __init__(self, out_per_band: int, embed_dim: int, dim: int = WAVE_DIM, num_heads: int = 4):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(
            dim, num_heads, activation="gelu", dropout=0.0, batch_first=True
        )
        self.fc_weight = nn.Linear(dim, out_per_band)
        self.fc_bias = nn.Linear(dim, embed_dim)
        self.weight_tokens = nn.Parameter(torch.empty(NUM_WEIGHT_TOKENS, dim))
        self.bias_token = nn.Parameter(torch.empty(1, dim))
        nn.init.normal_(self.weight_tokens, std=0.02)
        nn.init.normal_(self.bias_token, std=0.02)

    def forward(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seq = torch.cat([self.weight_tokens, codes, self.bias_token])  # [128 + C + 1, 128]
        out = self.layer(seq[None])[0]
        weights = self.fc_weight(out[NUM_WEIGHT_TOKENS:-1] + codes)  # [C, p*p*D]
        return weights, self.fc_bias(out[-1])  # [D]


class DynamicPatchEmbed(nn.Module):
    """DOFA's wavelength-conditioned patch embedding; any number and order of bands.

    Args:
        patch_size: side of a square patch in pixels.
        embed_dim: token width D.
        sar_polarisations: polarisations that get a learned SAR code.
        max_optical_nm: longest optical/thermal wavelength accepted.
        trained_bands: band_ids seen in pretraining; when set, other bands draw a warning
            naming them (they still work: the kernel is generated from the wavelength).

    Attributes:
        tokens_per_patch: always 1.
        trained_bands: as the argument; may be set after construction (e.g. from a release card).
    """

    tokens_per_patch = 1

    def __init__(
        self,
        patch_size: int,
        embed_dim: int,
        sar_polarisations: Sequence[str] = ("VV", "VH", "HH", "HV"),
        max_optical_nm: float = MAX_OPTICAL_NM,
        trained_bands: set[str] | None = None,
    ):
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.max_optical_nm = max_optical_nm
        self.trained_bands = trained_bands
        self.sar_polarisations = tuple(p.upper() for p in sar_polarisations)
        self.sar_codes = nn.Parameter(torch.empty(len(self.sar_polarisations), WAVE_DIM))
        nn.init.normal_(self.sar_codes, std=0.02)
        self.fclayer = FCResLayer()
        self.weight_generator = TransformerWeightGenerator(patch_size**2 * embed_dim, embed_dim)
        # band_ids -> SAR code index per band (-1 for optical), checked once per band set.
        self._sar_index: dict[tuple[tuple[str, ...], torch.device], torch.Tensor] = {}
        self._init_linear()

    def _init_linear(self) -> None:
        # DOFA's init of the generator and the residual MLP.
        for module in [*self.weight_generator.modules(), *self.fclayer.modules()]:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.constant_(module.bias, 0.01)

    def sar_index(self, band_ids: Sequence[str], wavelengths: torch.Tensor) -> torch.Tensor:
        """[C] index into ``sar_codes`` per band, -1 for optical bands; refuses what it can't code.

        Cached per band set: a band_id always names the same band, so the wavelengths are read
        to the host only the first time a band set is seen.
        """
        key = (tuple(band_ids), wavelengths.device)
        if key not in self._sar_index:
            index = []
            for band_id, wl in zip(band_ids, wavelengths.tolist(), strict=True):
                index.append(self._resolve(band_id, wl))
            self._sar_index[key] = torch.tensor(index, device=wavelengths.device)
        return self._sar_index[key]

    def _resolve(self, band_id: str, wavelength: float) -> int:
        polarisation = band_id.partition(":")[2].upper()
        if wavelength >= MICROWAVE_MIN_NM:
            if polarisation not in self.sar_polarisations:
                raise UnsupportedBandError(
                    f"SAR band {band_id!r}: polarisation {polarisation!r} has no learned code "
                    f"(this model has {list(self.sar_polarisations)}); drop the band"
                )
            return self.sar_polarisations.index(polarisation)
        if not 0 < wavelength <= self.max_optical_nm:
            raise UnsupportedBandError(
                f"band {band_id!r} at {wavelength:.1f} nm lies outside (0, "
                f"{self.max_optical_nm:.0f}] nm, where the wavelength code is unambiguous; "
                "drop the band"
            )
        return -1

    def _warn_untrained(self, band_ids: Sequence[str]) -> None:
        if self.trained_bands is None:
            return
        unseen = [b for b in band_ids if b not in self.trained_bands]
        if unseen:
            warnings.warn(
                f"band(s) not seen in pretraining, embedded from their wavelength alone: "
                f"{', '.join(unseen)}",
                stacklevel=3,
            )

    def band_codes(self, band_ids: Sequence[str], wavelengths: torch.Tensor) -> torch.Tensor:
        """Per-band codes ``w_c`` [C, 128] after the residual MLP."""
        row = wavelengths if wavelengths.dim() == 1 else wavelengths[0]  # one band set per batch
        row = row.to(self.sar_codes.device)
        index = self.sar_index(band_ids, row)  # [C]
        codes = sincos_wavelength(row, WAVE_DIM, like=self.sar_codes)  # [C, 128]
        if self.sar_polarisations:  # none: every band is optical (``_resolve`` refused SAR)
            sar = self.sar_codes[index.clamp(min=0)]  # [C, 128]
            codes = torch.where(index[:, None] >= 0, sar, codes)
        return self.fclayer(codes)

    def generate(
        self, band_ids: Sequence[str], wavelengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The convolution for a band set: kernel [D, C, p, p] and bias [D], both scaled."""
        self._warn_untrained(band_ids)
        weights, bias = self.weight_generator(self.band_codes(band_ids, wavelengths))
        p = self.patch_size
        kernel = weights.reshape(len(band_ids), p, p, self.embed_dim).permute(3, 0, 1, 2)
        return kernel * KERNEL_SCALE, bias * KERNEL_SCALE

    def forward(
        self, images: torch.Tensor, band_ids: Sequence[str], wavelengths: torch.Tensor
    ) -> torch.Tensor:
        """images [B, C, H, W] -> tokens [B, N, D], N = (H/p)(W/p) row-major, no positions.

        ``wavelengths`` is [C] or [B, C] in nm; batches are sensor-homogeneous, so with [B, C]
        the first row names the band set.
        """
        kernel, bias = self.generate(band_ids, wavelengths)
        # Images arrive in float32; under bf16/fp16 engines the weights set the compute dtype.
        out = F.conv2d(images.to(kernel.dtype), kernel, bias, stride=self.patch_size)
        return out.flatten(2).transpose(1, 2)  # [B, N, D]

    def positions(self, grid_h: int, grid_w: int, like: torch.Tensor) -> torch.Tensor:
        """Plain 2-D sincos [N, D] in ``like``'s dtype and device."""
        return sincos_2d(grid_h, grid_w, self.embed_dim, like.device, like.dtype)
