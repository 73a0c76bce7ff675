"""Masked autoencoder (He et al. 2021, arXiv:2111.06377) over any one-token-per-patch tokenizer.

Random masking per sample (argsort of noise), the encoder sees the visible tokens only, a
transformer decoder fills in mask tokens, and band b of every patch is predicted by the
reconstruction head of its spectral range (the spectral tokenizer) or by a head conditioned on
its wavelength (DOFA's hypernetwork, the spectral adapter: ``reconstruction``). The loss is the MSE on masked patches against
per-patch normalised targets (norm_pix), computed per band over valid pixels and averaged over
bands, so a 224-band EnMAP tile and a 2-band Sentinel-1 tile weigh the same.

nodata: invalid pixels enter neither the encoder (they are zeroed before tokenizing), nor the
norm-pix mean and variance of their patch, nor the loss; whatever value they hold changes
nothing. The objectives built on MAE's tokens and loss (SelectiveMAE, multi-scale MAE, CROMA,
mixup) inherit this, and Hyper-MAE uses the same ``norm_pix``.
"""

from __future__ import annotations

import torch
from torch import nn

from eoforge.models.attention import Block
from eoforge.models.pos_embed import sincos_2d
from eoforge.models.reconstruction import WavelengthReconstructionHead
from eoforge.models.spectral import (
    SpectralReconstructionHead,
    SpectrumAwarePatchEmbed,
    patchify,
    unpatchify,
)
from eoforge.models.vit import LearnedToken
from eoforge.pretrain.views import sensor_views, valid_mask


def norm_pix(target: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch mean and std of target [..., p*p] over its valid pixels -> (mean, std) [..., 1].

    Unbiased variance like ``torch.var``; a patch with fewer than two valid pixels gets std 1e-3
    (it has no spread to normalise by). Invalid pixels must hold finite values (e.g. 0): they are
    weighted out, not skipped.
    """
    weight = valid.to(target.dtype)
    count = weight.sum(-1, keepdim=True)
    mean = (target * weight).sum(-1, keepdim=True) / count.clamp_min(1.0)
    var = ((target - mean).square() * weight).sum(-1, keepdim=True) / (count - 1).clamp_min(1.0)
    return mean, (var + 1e-6).sqrt()


def patch_targets(
    images: torch.Tensor, valid: torch.Tensor, patch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """images [B, C, H, W], valid bool [B, C, H, W] -> (pixels, valid) [B, C, N, p*p], the pixels
    in fp32 with nodata set to 0 (so a NaN fill cannot poison sums it is weighted out of)."""
    pixels = patchify(images.float().masked_fill(~valid, 0.0), patch_size)
    return pixels, patchify(valid, patch_size)


def random_masking(
    batch: int, length: int, mask_ratio: float, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample random masking by argsort of uniform noise.

    Returns:
        keep: [B, K] indices of visible tokens (K = round(L * (1 - mask_ratio)), at least 1),
        mask: [B, L] 1 where the token is masked, 0 where visible.
    """
    n_keep = max(1, round(length * (1 - mask_ratio)))
    noise = torch.rand(batch, length, device=device)  # [B, L]
    order = torch.argsort(noise, dim=1)  # ascending: small noise is kept
    keep = order[:, :n_keep]  # [B, K]
    mask = torch.ones(batch, length, device=device)
    mask.scatter_(1, keep, 0.0)
    return keep, mask


class MAE(nn.Module):
    """Masked autoencoder objective around a spectrum-aware encoder.

    Args:
        encoder: a model with the encoder protocol (``tokenize``/``encode``) and a
            ``patch_embed`` making one token per patch.
        mask_ratio: fraction of patches hidden from the encoder.
        decoder_dim, decoder_depth, decoder_heads: decoder transformer size (512 x 8 x 16 published).
        norm_pix: normalise each band of each target patch by its own mean and variance.
    """

    name = "mae"

    def __init__(
        self,
        encoder: nn.Module,
        mask_ratio: float = 0.75,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        norm_pix: bool = True,
    ):
        super().__init__()
        if not 0 < mask_ratio < 1:
            raise ValueError(f"mask_ratio={mask_ratio}: must be in (0, 1)")
        tokenizer = getattr(encoder, "patch_embed", None)
        if getattr(tokenizer, "tokens_per_patch", None) != 1:
            raise ValueError(
                "MAE masks and reconstructs one token per patch; the channel_groups tokenizer "
                "makes one per band group and patch, which this MAE does not mask per group: "
                "use tokenizer spectral, dofa or spectral_adapter (model.kwargs.tokenizer)"
            )
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.norm_pix = norm_pix
        self.decoder_dim = decoder_dim
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = LearnedToken(decoder_dim)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_heads, 4.0, qkv_bias=True) for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        # The spectral tokenizer's per-range heads where it has them; a wavelength-conditioned
        # head for tokenizers without spectral ranges (DOFA, the spectral adapter).
        if isinstance(tokenizer, SpectrumAwarePatchEmbed):
            self.head = SpectralReconstructionHead(tokenizer, decoder_dim)
        else:
            self.head = WavelengthReconstructionHead(decoder_dim, encoder.patch_size)

    def forward(self, batch: dict, preview: bool = False) -> dict:
        """Loss over every sensor in a batch -> {"loss", "loss/<sensor>"}.

        With ``preview=True`` returns reconstruction images instead (see ``preview``); going
        through forward lets ZeRO-3 gather the parameters.
        """
        if preview:
            return self.preview(batch)
        out, losses = {}, []
        for sensor, view in sensor_views(batch):
            loss, _, _ = self.reconstruct(view)
            out[f"loss/{sensor}"] = loss.detach()
            losses.append(loss)
        out["loss"] = torch.stack(losses).mean()
        return out

    def reconstruct(self, view: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One sensor's view -> (loss, predictions [B, C, N, p*p], mask [B, N])."""
        images, band_ids, wavelengths = view["image"], view["band_ids"], view["wavelengths"]
        enc = self.encoder
        tokens = self.tokenize(view)
        batch, length, _ = tokens.shape
        keep, mask = random_masking(batch, length, self.mask_ratio, tokens.device)
        latent = enc.encode(tokens, keep)  # [B, 1 + K, D]
        z = self.decode(latent, keep, enc.grid(images))  # [B, N, Dd]
        pred = self.head(z, band_ids, wavelengths)  # [B, C, N, p*p]
        loss = self.loss(images, valid_mask(view), pred, mask)
        return loss, pred, mask

    def tokenize(self, view: dict) -> torch.Tensor:
        """One sensor's view -> the encoder's tokens [B, L, D], nodata pixels read as 0."""
        image = view["image"].masked_fill(~valid_mask(view), 0.0)
        return self.encoder.tokenize(
            image, view["band_ids"], view["wavelengths"], view.get("gsd"), view.get("time")
        )

    def decode(
        self, latent: torch.Tensor, keep: torch.Tensor, grid: tuple[int, int]
    ) -> torch.Tensor:
        """Encoder output [B, 1 + K, D] -> decoder tokens for all patches [B, N, Dd]."""
        x = self.decoder_embed(latent)  # [B, 1 + K, Dd]
        length = grid[0] * grid[1]
        full = self.mask_token(x, length).clone()  # [B, N, Dd]
        full.scatter_(1, keep[..., None].expand(-1, -1, x.shape[-1]), x[:, 1:])
        full = full + sincos_2d(*grid, self.decoder_dim, x.device, x.dtype)
        x = torch.cat([x[:, :1], full], dim=1)  # [B, 1 + N, Dd]
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_norm(x)[:, 1:]

    def loss(self, images, valid, pred, mask) -> torch.Tensor:
        """Norm-pix MSE on masked patches, per band over valid pixels, averaged over bands.

        Args:
            images: [B, C, H, W] targets; valid: bool [B, C, H, W]; pred: [B, C, N, p*p];
            mask: [B, N] 1 where a patch is a target.
        """
        target, pixel_valid = patch_targets(images, valid, self.encoder.patch_size)
        if self.norm_pix:  # statistics of each patch's valid pixels only
            mean, std = norm_pix(target, pixel_valid)
            target = (target - mean) / std
        weight = mask[:, None, :, None].float() * pixel_valid  # [B, C, N, p*p]
        error = (pred.float() - target) ** 2 * weight
        per_band = error.sum(dim=(0, 2, 3)) / weight.sum(dim=(0, 2, 3)).clamp_min(1.0)  # [C]
        return per_band.mean()

    @torch.no_grad()
    def preview(self, batch: dict, max_images: int = 4) -> dict[str, dict[str, torch.Tensor]]:
        """Images for a reconstruction grid: {sensor: {"input", "masked", "reconstruction",
        "band_ids", "wavelengths"}}, each image [b, C, H, W] in normalised units."""
        out = {}
        p = self.encoder.patch_size
        for sensor, view in sensor_views(batch):
            view = {k: (v[:max_images] if torch.is_tensor(v) else v) for k, v in view.items()}
            _, pred, mask = self.reconstruct(view)
            images = view["image"]
            grid_h = images.shape[-2] // p
            target, pixel_valid = patch_targets(images, valid_mask(view), p)
            mean, std = norm_pix(target, pixel_valid)
            recon = pred.float() * std + mean if self.norm_pix else pred.float()  # undo norm_pix
            visible = (1 - mask)[:, None, :, None]
            out[sensor] = {
                "input": images,
                "masked": unpatchify(target * visible, p, grid_h),
                "reconstruction": unpatchify(
                    recon * mask[:, None, :, None] + target * visible, p, grid_h
                ),
                "band_ids": view["band_ids"],
                "wavelengths": view["wavelengths"],
            }
        return out
