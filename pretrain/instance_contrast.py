"""Instance contrast: MoCo-v2 (Chen et al. 2020, arXiv:2003.04297) on two augmented views of one
single-date image.

Per sample, two independent random augmentations ``t_q`` and ``t_k`` (the resized crop, flips
and brightness shift of ``seasonal_contrast.Augmentation``, plus the band jitter below) give a query ``q = f_q(t_q(x))`` and a key
``k = f_k(t_k(x))``; ``f_k`` is a momentum (EMA) copy of the encoder and projection head. The loss
is MoCo's InfoNCE, ``-log exp(q.k / tau) / (exp(q.k / tau) + sum_n exp(q.n / tau))``, with the
negatives ``n`` from a queue of past keys gathered from every rank. It teaches the encoder what
stays the same under the augmentations (the scene), which suits frozen-feature probes.

Band jitter, defined for any band set: each band of each view is scaled by a gain drawn uniformly
in ``1 +- band_jitter`` (on normalised values, so the band's contrast changes, MoCo's colour jitter
generalised beyond RGB), and with probability ``p_mean_bands`` every band is replaced by the mean
over bands (MoCo's random grayscale). SeCo (``seasonal_contrast``) contrasts seasons of one place
and needs a time series; this objective needs only single-date shards.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from eoforge.models.vit import SpectralViT
from eoforge.pretrain.contrastive import (
    HoldsMomentumCopy,
    KeyQueue,
    MomentumCopy,
    embedding_health,
    enqueue_everywhere,
    info_nce,
    pool,
)
from eoforge.pretrain.seasonal_contrast import Augmentation
from eoforge.pretrain.views import present_mask, single_date_views


def jitter_bands(images: torch.Tensor, gain: float, p_mean: float) -> torch.Tensor:
    """[B, C, H, W] -> per-sample, per-band gains in ``1 +- gain``, then the band mean in place of
    every band for a share ``p_mean`` of the samples."""
    b, c = images.shape[:2]
    scale = 1 + (2 * torch.rand(b, c, 1, 1, device=images.device) - 1) * gain  # [B, C, 1, 1]
    out = images * scale.to(images.dtype)
    grey = torch.rand(b, 1, 1, 1, device=images.device) < p_mean  # [B, 1, 1, 1]
    return torch.where(grey, out.mean(dim=1, keepdim=True).expand_as(out), out)


class InstanceContrast(HoldsMomentumCopy, nn.Module):
    """MoCo-v2 over the shared encoder (module docstring).

    Every single-date view of the batch is contrasted on its own (one sensor per micro-batch is
    the reader's default); samples whose ``present`` is False count in no loss and enter no queue.
    The momentum copy (``contrastive.MomentumCopy``) is held outside the module tree, in float32,
    saved through the module's extra state, and updated once per optimizer step by the training
    loop's hook (``after_optimizer_step``; under ZeRO-3 it reads the parameters gathered whole).

    Args:
        encoder: a SpectralViT (any tokenizer).
        proj_dim: width of the embedding (MoCo-v2: 128).
        queue_size: keys kept (MoCo: 65536; a small data set needs fewer, or the queue holds
            stale keys of the same images).
        temperature: tau of the InfoNCE (MoCo-v2: 0.2).
        momentum: EMA coefficient of the key encoder (MoCo: 0.999; short runs: 0.99).
        min_crop_scale: smallest crop area, as a fraction of the image.
        brightness: largest brightness shift, in normalised units.
        band_jitter: largest relative change of a band's gain.
        p_mean_bands: probability of replacing every band by the band mean.
        crop_size: side in pixels the crops are resized to (None: the input's side). Smaller
            views cost less per step (a quarter of the tokens at half the side); the crops
            cover 0.45-1 of the side, so at crop_size = side / 2 the encoder sees objects at
            0.5-1.1 times the scale that full-resolution evaluation shows it.
    """

    name = "instance_contrast"

    def __init__(
        self,
        encoder: nn.Module,
        proj_dim: int = 128,
        queue_size: int = 65536,
        temperature: float = 0.2,
        momentum: float = 0.999,
        min_crop_scale: float = 0.2,
        brightness: float = 0.4,
        band_jitter: float = 0.4,
        p_mean_bands: float = 0.2,
        crop_size: int | None = None,
    ):
        super().__init__()
        if not isinstance(encoder, SpectralViT):
            raise ValueError(
                "instance_contrast pools patch tokens [B, N, D]; build a ViT encoder (vit_*)"
            )
        for option, value, ok in (
            ("proj_dim", proj_dim, proj_dim >= 1),
            ("queue_size", queue_size, queue_size >= 1),
            ("temperature", temperature, temperature > 0),
            ("momentum", momentum, 0 <= momentum < 1),
            ("min_crop_scale", min_crop_scale, 0 < min_crop_scale <= 1),
            ("brightness", brightness, brightness >= 0),
            ("band_jitter", band_jitter, 0 <= band_jitter < 1),
            ("p_mean_bands", p_mean_bands, 0 <= p_mean_bands <= 1),
            ("crop_size", crop_size, crop_size is None or crop_size % encoder.patch_size == 0),
        ):
            if not ok:
                raise ValueError(
                    f"{option}={value}: out of range (see InstanceContrast; crop_size is a "
                    "multiple of the patch size)"
                )
        self.encoder = encoder
        self.temperature = temperature
        self.momentum = momentum
        self.min_crop_scale = min_crop_scale
        self.brightness = brightness
        self.band_jitter = band_jitter
        self.p_mean_bands = p_mean_bands
        self.crop_size = crop_size
        dim = encoder.embed_dim
        # MoCo-v2 head: Linear -> ReLU -> Linear.
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, proj_dim))
        self.queue = KeyQueue(queue_size, proj_dim)
        self._key = MomentumCopy({"encoder": encoder, "head": self.head})

    def forward(self, batch: dict, preview: bool = False) -> dict:
        """{"loss", "positive_cosine", "collapse/std", "collapse/mean_cosine"} over the batch's
        single-date views (``contrastive.embedding_health`` of the queries); ``preview`` returns
        ``{}`` (nothing to reconstruct)."""
        if preview:
            return {}
        views = single_date_views(batch, self.name)
        losses, cosines, health = zip(*(self.view_loss(view) for _, view in views), strict=True)
        return {
            "loss": torch.stack(losses).mean(),
            "positive_cosine": torch.stack(cosines).mean().detach(),
            **{key: torch.stack([h[key] for h in health]).mean() for key in health[0]},
        }

    def augment(self, images: torch.Tensor) -> torch.Tensor:
        """One random view [B, C, H, W] of each image."""
        crop = Augmentation.draw(
            images.shape[0], images.device, self.min_crop_scale, self.brightness
        )
        return jitter_bands(crop(images, self.crop_size), self.band_jitter, self.p_mean_bands)

    def view_loss(self, view: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(InfoNCE, mean query-key cosine, the queries' collapse statistics) of one view."""
        images = view["image"]  # [B, C, H, W]
        present = present_mask(view)
        z_q = F.normalize(
            self.head(pool(self._encode(self.encoder, self.augment(images), view))), dim=-1
        )
        with torch.no_grad():
            key = self._key.on(images.device)
            z_k = F.normalize(
                key["head"](pool(self._encode(key["encoder"], self.augment(images), view))), dim=-1
            )
        # A copy: the queue is overwritten below, before the backward pass reads the negatives.
        negatives = self.queue.keys.clone()  # [Q, E]
        loss = info_nce(z_q, z_k, negatives, self.temperature, present.float())
        if self.training:
            enqueue_everywhere(self.queue, z_k, present)
        cosine = (z_q.detach().float() * z_k.float()).sum(-1).mean()
        return loss, cosine, embedding_health(z_q[present])

    def _encode(self, encoder, images: torch.Tensor, view: dict) -> torch.Tensor:
        """Encoder features [B, 1 + N, D] of augmented images [B, C, H, W]."""
        tokens = encoder.tokenize(images, view["band_ids"], view["wavelengths"], view.get("gsd"))
        return encoder.encode(tokens)
