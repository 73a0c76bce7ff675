"""Multi-scale masked reconstruction (SatMAE++; SPECS O4).

Targets at 1x, 2x and 4x the encoder's input scale, made the SatMAE++ way from single-resolution
data: the encoder sees the sample downsampled by 4 (area averaging), and

  * the 1x target is that downsampled input, reconstructed by MAE (masked MSE),
  * the 2x target is the sample downsampled by 2,
  * the 4x target is the original sample.

A downsampled pixel is valid only where every pixel it averages is valid. The decoder's
prediction for every patch is re-assembled into an image and upsampled by a small convolutional
head (``Conv1x1(1 -> 4) -> GELU -> LN`` then two blocks ``ConvT 4x4 s2 -> LN -> LeakyReLU ->
residual pair of 3x3 convs x0.5 -> LN``, each with a ``Conv3x3 -> 1`` output, the first at 2x,
the second at 4x). ``L = 0.6 * MSE_masked + 0.4 * (L1_2x + L1_4x) / 2``, the L1 terms over every
valid pixel of the whole image, per band and averaged over bands.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from eoforge.models.spectral import patchify, unpatchify
from eoforge.pretrain.mae import MAE
from eoforge.pretrain.views import sensor_views, valid_mask

MSE_WEIGHT = 0.6  # SatMAE++: weight of the 1x masked MSE; the upsampled L1 terms share 0.4
SCALE = 4  # the original sample is 4x the encoder's input
HEAD_WIDTH = 4  # SatMAE++ widens C bands to 4C channels; per band: 1 -> 4


def downsample(
    image: torch.Tensor, valid: torch.Tensor, factor: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Area-average ``image`` [B, C, H, W] by ``factor``; a coarse pixel is valid only where all
    ``factor x factor`` pixels under it are valid (invalid pixels enter the mean as 0)."""
    image = torch.where(valid, image, torch.zeros_like(image))  # nodata never leaks into means
    low = F.avg_pool2d(image, factor)  # [B, C, H/f, W/f]
    low_valid = F.max_pool2d((~valid).to(image.dtype), factor) == 0  # [B, C, H/f, W/f]
    return low, low_valid


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a [B, C, H, W] feature map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ResidualPair(nn.Module):
    """``x + 0.5 * conv3x3(relu(conv3x3(x)))``."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.5 * self.conv2(F.relu(self.conv1(x)))


class UpsampleBlock(nn.Module):
    """2x upsampling: ConvT 4x4 s2 -> LN -> LeakyReLU -> residual pair -> LN, plus a Conv3x3
    output projection. Returns (features [B, dim, 2H, 2W], output [B, out, 2H, 2W])."""

    def __init__(self, dim: int, out: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(dim, dim, 4, stride=2, padding=1)
        self.up_norm = LayerNorm2d(dim, eps=1e-6)
        self.residual = ResidualPair(dim)
        self.residual_norm = LayerNorm2d(dim, eps=1e-6)
        self.out = nn.Conv2d(dim, out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.leaky_relu(self.up_norm(self.up(x)))
        x = self.residual_norm(self.residual(x))
        return x, self.out(x)


class MultiScaleHead(nn.Module):
    """The SatMAE++ upsampler applied to every band alone, with weights shared across bands.

    SatMAE++ convolves all C bands jointly (C -> 4C channels), which fixes the band count. Here
    bands are folded into the batch and each is upsampled as a one-channel image (1 -> 4
    channels), so one head serves any band set, in any order, of any sensor.
    """

    def __init__(self, width: int = HEAD_WIDTH):
        super().__init__()
        self.proj = nn.Conv2d(1, width, 1)
        self.proj_norm = LayerNorm2d(width, eps=1e-6)
        self.up2 = UpsampleBlock(width, 1)
        self.up4 = UpsampleBlock(width, 1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):  # SatMAE++'s init of its convolutions
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image [B, C, h, w] -> (2x [B, C, 2h, 2w], 4x [B, C, 4h, 4w])."""
        b, c, h, w = image.shape
        x = image.reshape(b * c, 1, h, w)  # bands as batch
        x = self.proj_norm(F.gelu(self.proj(x)))  # [B*C, width, h, w]
        x, x2 = self.up2(x)  # [B*C, width, 2h, 2w], [B*C, 1, 2h, 2w]
        _, x4 = self.up4(x)  # [B*C, 1, 4h, 4w]
        return x2.reshape(b, c, 2 * h, 2 * w), x4.reshape(b, c, 4 * h, 4 * w)


def masked_l1(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """L1 over valid pixels of [B, C, H, W] images, per band, averaged over bands."""
    weight = valid.to(torch.float32)
    error = torch.where(valid, (pred.float() - target.float()).abs(), 0.0)
    per_band = error.sum(dim=(0, 2, 3)) / weight.sum(dim=(0, 2, 3)).clamp_min(1.0)  # [C]
    return per_band.mean()


class MultiScaleMAE(MAE):
    """MAE with 2x and 4x reconstruction from a 4x-downsampled input (SatMAE++; SPECS O4).

    Image sides must be multiples of ``4 * patch_size``. The encoder's input carries GSD x 4.
    Targets are in the data's normalised units, without norm_pix: the upsampler works on the
    1x reconstruction as an image, and per-patch normalised patches have lost the mean and
    scale the 2x and 4x targets need (restoring them from the target would leak it). A sample
    lacking a sensor (``view["present"]`` False) has no valid pixel of it and adds nothing.

    Args:
        encoder: a SpectralViT with the spectral tokenizer (``tokenizer="spectral"``).
        mask_ratio: fraction of patches hidden from the encoder.
        decoder_dim, decoder_depth, decoder_heads: decoder transformer size.
    """

    name = "multiscale_mae"

    def __init__(
        self,
        encoder: nn.Module,
        mask_ratio: float = 0.75,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
    ):
        super().__init__(
            encoder, mask_ratio, decoder_dim, decoder_depth, decoder_heads, norm_pix=False
        )
        self.upsampler = MultiScaleHead()

    def forward(self, batch: dict, preview: bool = False) -> dict:
        """{"loss", "loss/mse_1x", "loss/l1_2x", "loss/l1_4x", "loss/<sensor>"}, the terms
        averaged over sensors; with ``preview=True`` reconstruction images (see ``preview``)."""
        if preview:
            return self.preview(batch)
        out, losses, terms = {}, [], []
        for sensor, view in sensor_views(batch):
            res = self.scales(sensor, view)
            loss = MSE_WEIGHT * res["mse_1x"] + (1 - MSE_WEIGHT) * (res["l1_2x"] + res["l1_4x"]) / 2
            out[f"loss/{sensor}"] = loss.detach()
            losses.append(loss)
            terms.append(torch.stack([res["mse_1x"], res["l1_2x"], res["l1_4x"]]).detach())
        mean_terms = torch.stack(terms).mean(0)  # [3]
        out.update(
            {f"loss/{name}": mean_terms[i] for i, name in enumerate(("mse_1x", "l1_2x", "l1_4x"))}
        )
        out["loss"] = torch.stack(losses).mean()
        return out

    def scales(self, sensor: str, view: dict) -> dict[str, torch.Tensor]:
        """One sensor's view -> the three loss terms (with graph), the targets, predictions and
        mask: "mse_1x", "l1_2x", "l1_4x", "input" / "pred_1x" [B, C, H/4, W/4], "target_2x" /
        "pred_2x" [B, C, H/2, W/2], "target_4x" / "pred_4x" [B, C, H, W], "mask" [B, N]."""
        image = view["image"]
        if image.dim() != 4:
            raise ValueError(
                f"multiscale_mae needs single-date views [B, C, H, W]; {sensor} is not"
            )
        side = SCALE * self.encoder.patch_size
        if image.shape[-2] % side or image.shape[-1] % side:
            raise ValueError(
                f"multiscale_mae: {sensor} images are {tuple(image.shape[-2:])} pixels; both sides "
                f"must be multiples of {side} (4 x patch size {self.encoder.patch_size})"
            )
        valid = valid_mask(view)
        low, low_valid = downsample(image, valid, SCALE)  # [B, C, H/4, W/4]
        half, half_valid = downsample(image, valid, 2)  # [B, C, H/2, W/2]
        gsd = view.get("gsd")
        low_view = dict(view, image=low, valid=low_valid, gsd=None if gsd is None else gsd * SCALE)
        mse, pred, mask = self.reconstruct(low_view)  # pred [B, C, N, p*p]
        pred_1x = unpatchify(pred, self.encoder.patch_size, self.encoder.grid(low)[0])
        pred_2x, pred_4x = self.upsampler(pred_1x)
        target_4x = torch.where(valid, image, torch.zeros_like(image))
        return {
            "mse_1x": mse,
            "l1_2x": masked_l1(pred_2x, half, half_valid),
            "l1_4x": masked_l1(pred_4x, target_4x, valid),
            "input": low,
            "pred_1x": pred_1x,
            "target_2x": half,
            "pred_2x": pred_2x,
            "target_4x": target_4x,
            "pred_4x": pred_4x,
            "mask": mask,
        }

    @torch.no_grad()
    def preview(self, batch: dict, max_images: int = 4) -> dict[str, dict[str, torch.Tensor]]:
        """Full-resolution images: {sensor: {"input", "masked", "reconstruction", "band_ids",
        "wavelengths"}}, each [b, C, H, W] in normalised units: the original, the encoder's
        visible low-resolution patches (nearest-upsampled, hidden ones zero) and the 4x output."""
        out = {}
        p = self.encoder.patch_size
        for sensor, view in sensor_views(batch):
            view = {k: (v[:max_images] if torch.is_tensor(v) else v) for k, v in view.items()}
            res = self.scales(sensor, view)
            low = res["input"]
            visible = (1 - res["mask"])[:, None, :, None]  # [b, 1, N, 1]
            seen = unpatchify(patchify(low, p) * visible, p, self.encoder.grid(low)[0])
            out[sensor] = {
                "input": view["image"],
                "masked": F.interpolate(seen, scale_factor=SCALE, mode="nearest"),
                "reconstruction": res["pred_4x"].float(),
                "band_ids": view["band_ids"],
                "wavelengths": view["wavelengths"],
            }
        return out
