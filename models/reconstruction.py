"""A reconstruction head for any tokenizer: band pixels predicted from decoder tokens, conditioned
on each band's wavelength.

The spectral tokenizer's own heads (``spectral.SpectralReconstructionHead``) predict a band
through its spectral range; tokenizers without ranges (DOFA's hypernetwork, the spectral adapter)
need a head that can name any band. Here band c gets a code from its wavelength, and the code
modulates one shared linear map (FiLM, Perez et al. 2018, arXiv:1709.07871):

    code_c = MLP(sincos(ln lambda_c))                       # [E]
    (gamma_c, beta_c, b_c) = Linear(code_c)                 # [D], [D], [p*p]
    pred[c, n] = ((1 + gamma_c) * z_n + beta_c) W + b_c      # z_n [D], W [D, p*p]

which is computed as a per-band weight ``(1 + gamma_c)[:, None] * W`` [C, D, p*p] and bias
``beta_c W + b_c`` [C, p*p]. The code encodes the natural logarithm of the wavelength in nm, so
optical bands (400-2500 nm) and radar bands (about 5.5e7 nm for Sentinel-1) get distinct codes
without the aliasing a linear-wavelength sincos has at radar wavelengths; two bands of one
wavelength (SAR polarisations) get the same code, and so the same prediction map.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from eoforge.models.pos_embed import sincos_1d

CODE_DIM = 128
# ln(nm) of 100 nm .. 1 m spans about 4.6 .. 20.7; the code's positions are ln(nm) scaled so that
# neighbouring optical bands (a few nm apart, ~0.005 in ln) still differ in its finest terms.
LOG_SCALE = 1000.0


def wavelength_code(wavelengths: torch.Tensor, dim: int = CODE_DIM) -> torch.Tensor:
    """Sincos code of ln(wavelength / nm): wavelengths [C] nm -> [C, dim] float32."""
    positions = torch.log(wavelengths.detach().double().clamp_min(1.0)) * LOG_SCALE
    return sincos_1d(positions, dim).float()


class WavelengthReconstructionHead(nn.Module):
    """Per-band patch predictions from decoder tokens, conditioned on wavelength (module docstring).

    Args:
        decoder_dim: width D of the decoder tokens.
        patch_size: side p of a patch; each band of each token predicts p*p pixels.
        hidden: width of the code MLP.
    """

    def __init__(self, decoder_dim: int, patch_size: int, hidden: int = 256):
        super().__init__()
        k = patch_size**2
        self.decoder_dim = decoder_dim
        self.code = nn.Sequential(nn.Linear(CODE_DIM, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.film = nn.Linear(hidden, 2 * decoder_dim + k)
        nn.init.zeros_(self.film.weight)  # starts as the plain shared map: gamma = beta = b = 0
        nn.init.zeros_(self.film.bias)
        self.weight = nn.Parameter(torch.empty(decoder_dim, k))
        nn.init.uniform_(self.weight, -1 / math.sqrt(decoder_dim), 1 / math.sqrt(decoder_dim))

    def forward(
        self, z: torch.Tensor, band_ids: Sequence[str], wavelengths: torch.Tensor
    ) -> torch.Tensor:
        """Decoder tokens z [B, N, D] -> per-band patch predictions [B, C, N, p*p].

        ``wavelengths`` [C] (or [B, C] with the same row for every sample) in nm.
        """
        if wavelengths.dim() == 2:
            wavelengths = wavelengths[0]
        code = wavelength_code(wavelengths.to(z.device)).to(self.weight.dtype)  # [C, E]
        film = self.film(self.code(code))  # [C, 2D + p*p]
        gamma, beta, bias = film.split(
            [self.decoder_dim, self.decoder_dim, film.shape[1] - 2 * self.decoder_dim], dim=1
        )
        per_band = (1 + gamma)[:, :, None] * self.weight  # [C, D, p*p]
        bias = beta @ self.weight + bias  # [C, p*p]
        return (
            torch.einsum("bnd,cdk->bcnk", z, per_band.to(z.dtype))
            + bias.to(z.dtype)[None, :, None, :]
        )
