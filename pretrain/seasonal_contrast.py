"""Seasonal contrast (SeCo; SPECS O6): MoCo-v2 over two seasons of the same place.

Per sample, a query season i and a key season j != i are drawn from the time series. With
``t_q``, ``t_0``, ``t_2`` independent random augmentations (SeCo's recipe, below):

  query ``q  = t_q(x_i)``
  ``k0 = t_0(x_j)``  other season, augmented: differs from q in season and augmentation;
  ``k1 = t_q(x_j)``  other season under the query's own augmentation (not augmented on its own):
                     differs from q in season alone;
  ``k2 = t_2(x_i)``  same season, augmented: differs from q in augmentation alone.

Three projection heads embed the pooled features. Head 0 is invariant to everything (positive
k0, negatives from its queue); head 1 is invariant to season (positive k1; k0 and k2, which
carry another augmentation, are negatives too); head 2 is invariant to augmentation (positive
k2; k0 and k1, from another season, are negatives too). Keys come from a momentum (EMA) copy of
the encoder and heads; each head has a queue of past keys. The loss is the sum over heads of
the InfoNCE at temperature tau.

Augmentations (Manas et al. 2021, arXiv:2103.16607, MoCo-v2's recipe): random resized crop
(area 0.2-1) and flips, then with probability 0.8 a colour jitter of brightness, contrast,
saturation 0.4 and hue 0.1, random greyscale with probability 0.2, and with probability 0.5 a
Gaussian blur of sigma 0.1-2 pixels. Each draw holds its parameters, so ``t_q`` applies to both
seasons. Colour is defined for any band set (``ColourAugmentation``) through band groups: the
bands whose wavelengths lie in one range of ``GROUP_EDGES_NM`` (visible, red edge and NIR, SWIR,
thermal, radar) play the part of RGB's channels, so a visible group of blue, green and red is
jittered as torchvision jitters RGB, and a group is never mixed with another (a reflectance with
a backscatter). On standardised values, per sample:

* brightness b in [0.6, 1.4]: every band is offset by b - 1 (a gain on reflectance is an
  offset on standardised values, up to each band's mean-to-std ratio);
* contrast c in [0.6, 1.4], per band: ``x <- c x + (1 - c) mean_hw(x)`` about the band's own
  spatial mean;
* saturation s in [0.6, 1.4]: ``x <- s x + (1 - s) g`` with ``g`` the mean of the band's group
  at that pixel (the group's "grey");
* hue h in [-0.1, 0.1]: the chroma ``x - g`` of a group of n bands is shifted cyclically by
  h * n bands along the group's band order, interpolating between neighbours (RGB's hue is a
  rotation of the chroma about the grey axis, i.e. a cyclic shift over R, G, B; a
  single-band group has no chroma and is left unchanged);
* greyscale: every band replaced by its group's mean;
* blur: each band convolved with the same Gaussian.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

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
from eoforge.pretrain.views import present_mask

# What each head's embedding is invariant to, in SeCo's order (head i's positive is key k_i).
HEADS = ("all", "season", "augmentation")


def draw_seasons(batch: int, steps: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and key time indices [B] each, drawn per sample WITHOUT replacement.

    The key is the query shifted by 1..T-1 (mod T): uniform over the T*(T-1) ordered pairs of
    distinct seasons. **BUG** upstream: SeCo drew both seasons with replacement, so a query
    could be contrasted with its own season.
    """
    query = torch.randint(0, steps, (batch,), device=device)
    shift = torch.randint(1, steps, (batch,), device=device)
    return query, (query + shift) % steps


@dataclass
class Augmentation:
    """Per-sample random resized crop, flips and brightness shift, drawn once and applicable to
    several images (SeCo's k1 reuses the query's).

    Attributes:
        theta: [B, 2, 3] affine sampling grid of the crop (negative scales flip).
        shift: [B] additive brightness change in normalised units.
    """

    theta: torch.Tensor
    shift: torch.Tensor

    @classmethod
    def draw(
        cls, batch: int, device, min_scale: float, brightness: float, ratio: float = 4 / 3
    ) -> Augmentation:
        """Crop area uniform in [min_scale, 1] of the image, aspect ratio log-uniform in
        [1/ratio, ratio], each flip with probability 1/2, shift uniform in +-brightness."""
        area = min_scale + (1 - min_scale) * torch.rand(batch, device=device)  # [B]
        aspect = torch.exp((2 * torch.rand(batch, device=device) - 1) * math.log(ratio))
        width = (area * aspect).sqrt().clamp(max=1.0)  # fraction of the image side
        height = (area / aspect).sqrt().clamp(max=1.0)
        # Crop centre in [-1, 1] grid units, kept inside the image.
        cx = (2 * torch.rand(batch, device=device) - 1) * (1 - width)
        cy = (2 * torch.rand(batch, device=device) - 1) * (1 - height)
        flip = torch.where(torch.rand(batch, 2, device=device) < 0.5, -1.0, 1.0)  # [B, 2]
        theta = torch.zeros(batch, 2, 3, device=device)
        theta[:, 0, 0], theta[:, 0, 2] = width * flip[:, 0], cx
        theta[:, 1, 1], theta[:, 1, 2] = height * flip[:, 1], cy
        shift = (2 * torch.rand(batch, device=device) - 1) * brightness
        return cls(theta, shift)

    def __call__(self, images: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """[B, C, H, W] -> the crops resized to [B, C, size, size] (default: back to H x W)."""
        shape = list(images.shape) if size is None else [*images.shape[:2], size, size]
        grid = F.affine_grid(self.theta.to(images.dtype), shape, align_corners=False)
        out = F.grid_sample(
            images, grid, mode="bilinear", padding_mode="border", align_corners=False
        )
        return out + self.shift.to(images.dtype)[:, None, None, None]


# Band-group boundaries (nm) of the colour augmentation: visible | red edge and NIR | SWIR |
# thermal | radar (SAR bands carry the radar wavelength, 5.5e7 nm for C-band).
GROUP_EDGES_NM = (700.0, 1000.0, 3000.0, 1e5)
BLUR_RADIUS = 6  # pixels each side of the blur kernel: 3 sigma at the largest sigma, 2


def band_groups(wavelengths: torch.Tensor) -> torch.Tensor:
    """Group index [C] of every band, from wavelengths [C] or [B, C] (every row the same bands)."""
    row = wavelengths if wavelengths.dim() == 1 else wavelengths[0]
    edges = torch.tensor(GROUP_EDGES_NM, device=row.device)
    return torch.bucketize(row.float(), edges)


def group_mean(groups: torch.Tensor) -> torch.Tensor:
    """[C, C] averaging matrix: ``M @ x`` puts each band's group mean in its place."""
    same = (groups[:, None] == groups[None, :]).float()  # [C, C]
    return same / same.sum(dim=1, keepdim=True)


def hue_shift(groups: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """[B, C, C] matrices shifting each group's bands cyclically by ``hue`` [B] x its size, with
    linear interpolation between neighbouring bands (the identity at hue 0)."""
    b, c = hue.shape[0], groups.shape[0]
    out = torch.zeros(b, c, c, device=hue.device)
    rows = torch.arange(b, device=hue.device)[:, None]  # [B, 1]
    for g in groups.unique():
        members = (groups == g).nonzero().squeeze(1)  # [n] the group's bands, in band order
        n = members.numel()
        source = torch.arange(n, device=hue.device) - hue[:, None] * n  # [B, n] fractional
        low = source.floor()
        frac = source - low  # [B, n]
        low = low.long() % n
        target = members.expand(b, n)  # [B, n]
        out.index_put_((rows, target, members[low]), 1 - frac, accumulate=True)
        out.index_put_((rows, target, members[(low + 1) % n]), frac, accumulate=True)
    return out


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> every band of sample i blurred with a Gaussian of ``sigma[i]`` pixels
    (separable, edges replicated); sigma 0 leaves the sample unchanged."""
    b, c, h, w = images.shape
    offsets = torch.arange(-BLUR_RADIUS, BLUR_RADIUS + 1, device=images.device).float()  # [K]
    kernel = torch.exp(-(offsets**2) / (2 * sigma.clamp_min(1e-6)[:, None] ** 2))  # [B, K]
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).to(images.dtype)
    kernel = kernel.repeat_interleave(c, dim=0)  # [B*C, K], one per band
    x = F.pad(images.reshape(1, b * c, h, w), [BLUR_RADIUS] * 4, mode="replicate")
    x = F.conv2d(x, kernel[:, None, None, :], groups=b * c)  # along W
    x = F.conv2d(x, kernel[:, None, :, None], groups=b * c)  # along H
    return x.reshape(b, c, h, w)


@dataclass
class ColourAugmentation:
    """SeCo's colour jitter, greyscale and blur for any band set (module docstring), drawn once
    per sample and applicable to several images.

    Attributes:
        offset: [B] brightness offset in normalised units (0 where the jitter is off).
        contrast: [B] contrast factor (1 where off).
        mix: [B, C, C] saturation, hue and greyscale as one band mixing (``x <- mix @ x``).
        blur: [B] Gaussian sigma in pixels (0: no blur).
    """

    offset: torch.Tensor
    contrast: torch.Tensor
    mix: torch.Tensor
    blur: torch.Tensor

    @classmethod
    def draw(
        cls,
        batch: int,
        wavelengths: torch.Tensor,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.4,
        hue: float = 0.1,
        p_jitter: float = 0.8,
        p_grey: float = 0.2,
        p_blur: float = 0.5,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
    ) -> ColourAugmentation:
        """Factors uniform in ``1 +- brightness`` (etc.) and hue in ``+- hue``, each jitter on
        with probability ``p_jitter``, greyscale with ``p_grey`` and blur with ``p_blur``, per
        sample; the bands' groups come from ``wavelengths`` [C] or [B, C]."""
        device = wavelengths.device
        groups = band_groups(wavelengths)  # [C]
        eye = torch.eye(groups.shape[0], device=device)  # [C, C]
        mean = group_mean(groups)  # [C, C]

        def uniform(spread: float) -> torch.Tensor:
            return (2 * torch.rand(batch, device=device) - 1) * spread  # [B]

        on = torch.rand(batch, device=device) < p_jitter  # [B]
        offset = torch.where(on, uniform(brightness), 0.0)
        contrast_factor = torch.where(on, 1 + uniform(contrast), 1.0)
        sat = torch.where(on, 1 + uniform(saturation), 1.0)[:, None, None]  # [B, 1, 1]
        saturate = sat * eye + (1 - sat) * mean  # [B, C, C]
        # The hue shift moves the chroma (x - g) and keeps the grey g.
        rotate = mean + hue_shift(groups, torch.where(on, uniform(hue), 0.0)) @ (eye - mean)
        grey = (torch.rand(batch, device=device) < p_grey)[:, None, None]  # [B, 1, 1]
        mix = torch.where(grey, mean, eye) @ rotate @ saturate  # [B, C, C]
        low, high = blur_sigma
        sigma = low + (high - low) * torch.rand(batch, device=device)
        blur = torch.where(torch.rand(batch, device=device) < p_blur, sigma, 0.0)
        return cls(offset, contrast_factor, mix, blur)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> the same images jittered, mixed and blurred."""
        dtype = images.dtype
        x = images + self.offset.to(dtype)[:, None, None, None]
        c = self.contrast.to(dtype)[:, None, None, None]  # [B, 1, 1, 1]
        x = c * x + (1 - c) * x.mean(dim=(2, 3), keepdim=True)
        x = torch.einsum("bij,bjhw->bihw", self.mix.to(dtype), x)
        return gaussian_blur(x, self.blur)


class SeasonalContrast(HoldsMomentumCopy, nn.Module):
    """SeCo's seasonal contrast over the shared encoder (see module docstring; SPECS O6).

    The batch holds an optical sensor as a time series: ``image`` [B, T, C, H, W] with T >= 2,
    optional ``time`` [B, T]. Samples whose ``present`` is False count in no loss and enter no
    queue.

    Momentum key encoder: a deep copy of the encoder and heads, updated as ``k = m k + (1 - m) q``
    once per optimizer step (``after_optimizer_step``, which the training loop calls; with
    gradient accumulation an update per micro-batch would give momentum m^A, and MoCo's update
    before the keys of the next step is the same thing). It is held outside the module
    tree, so the optimiser never sees it, ZeRO never partitions or casts it (the EMA stays in
    float32 under bf16: a 0.1% update would round away in bf16), and engines move it lazily to
    the encoder's device. It is saved and restored through the module's extra state
    (``get_extra_state``/``set_extra_state``, the ``..._extra_state`` entry of ``state_dict()``):
    DeepSpeed ZeRO-1/2 checkpoints store the module's state dict, so a resumed run continues
    with the same key encoder. Queues are buffers and are checkpointed as such. Under ZeRO-3 the
    update reads the query parameters whole through the engine's ``full_parameters``.

    Args:
        encoder: a SpectralViT (any tokenizer).
        proj_dim: width of each head's embedding (MoCo-v2: 128).
        queue_size: keys kept per head (65536 published; small in tests).
        temperature: tau of the InfoNCE.
        momentum: EMA coefficient m of the key encoder.
        min_crop_scale: smallest crop area, as a fraction of the image.
        brightness, contrast, saturation, hue: the colour jitter's spreads (SeCo: 0.4, 0.4,
            0.4, 0.1; ``ColourAugmentation``).
        p_jitter, p_grey, p_blur: probabilities of the colour jitter, greyscale and blur (SeCo:
            0.8, 0.2, 0.5).
    """

    name = "seasonal_contrast"

    def __init__(
        self,
        encoder: nn.Module,
        proj_dim: int = 128,
        queue_size: int = 65536,
        temperature: float = 0.07,
        momentum: float = 0.999,
        min_crop_scale: float = 0.2,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.4,
        hue: float = 0.1,
        p_jitter: float = 0.8,
        p_grey: float = 0.2,
        p_blur: float = 0.5,
    ):
        super().__init__()
        if not isinstance(encoder, SpectralViT):
            raise ValueError(
                "seasonal_contrast pools patch tokens [B, N, D]; build a ViT encoder (vit_*)"
            )
        for option, value, ok in (
            ("proj_dim", proj_dim, proj_dim >= 1),
            ("queue_size", queue_size, queue_size >= 1),
            ("temperature", temperature, temperature > 0),
            ("momentum", momentum, 0 <= momentum < 1),
            ("min_crop_scale", min_crop_scale, 0 < min_crop_scale <= 1),
            ("brightness", brightness, 0 <= brightness <= 1),
            ("contrast", contrast, 0 <= contrast <= 1),
            ("saturation", saturation, 0 <= saturation <= 1),
            ("hue", hue, 0 <= hue <= 0.5),
            ("p_jitter", p_jitter, 0 <= p_jitter <= 1),
            ("p_grey", p_grey, 0 <= p_grey <= 1),
            ("p_blur", p_blur, 0 <= p_blur <= 1),
        ):
            if not ok:
                raise ValueError(f"{option}={value}: out of range (see SeasonalContrast)")
        self.encoder = encoder
        self.temperature = temperature
        self.momentum = momentum
        self.min_crop_scale = min_crop_scale
        self.colour = dict(
            brightness=brightness,
            contrast=contrast,
            saturation=saturation,
            hue=hue,
            p_jitter=p_jitter,
            p_grey=p_grey,
            p_blur=p_blur,
        )
        dim = encoder.embed_dim
        # MoCo-v2 heads: Linear -> ReLU -> Linear.
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, proj_dim)) for _ in HEADS
        )
        self.queues = nn.ModuleList(KeyQueue(queue_size, proj_dim) for _ in HEADS)
        self._key = MomentumCopy({"encoder": encoder, "heads": self.heads})

    def forward(self, batch: dict, preview: bool = False) -> dict:
        """{"loss", "loss/invariant_<all|season|augmentation>", "collapse/std",
        "collapse/mean_cosine"} over the batch's time series.

        ``preview`` returns ``{}``: there is no reconstruction to show.
        """
        if preview:
            return {}
        series = [(s, v) for s, v in batch.items() if s != "meta" and v["image"].dim() == 5]
        if not series:
            sensors = [s for s in batch if s != "meta"]
            raise ValueError(
                f"seasonal_contrast needs a time series view (image [B, T, C, H, W]); the "
                f"views of {sensors} are single-date"
            )
        per_view, health = zip(
            *(self.view_losses(sensor, view) for sensor, view in series), strict=True
        )  # each [heads], {statistic}
        per_head = torch.stack(per_view).mean(dim=0)  # [heads]
        out = {"loss": per_head.sum()}
        out.update({k: torch.stack([h[k] for h in health]).mean() for k in health[0]})
        out.update({f"loss/invariant_{h}": per_head[i].detach() for i, h in enumerate(HEADS)})
        return out

    def view_losses(self, sensor: str, view: dict) -> tuple[torch.Tensor, dict]:
        """The three heads' InfoNCE losses [3] on one time-series view, and the collapse
        statistics of head 0's queries (``contrastive.embedding_health``)."""
        images = view["image"]  # [B, T, C, H, W]
        b, steps = images.shape[:2]
        if steps < 2:
            raise ValueError(
                f"seasonal_contrast: sensor {sensor!r} has {steps} time step(s) per sample; "
                "at least 2 seasons are needed"
            )
        device = images.device
        rows = torch.arange(b, device=device)
        q_idx, k_idx = draw_seasons(b, steps, device)
        own, other = images[rows, q_idx], images[rows, k_idx]  # [B, C, H, W] each
        time = view.get("time")
        t_own = t_other = None
        if time is not None:
            t_own, t_other = time[rows, q_idx], time[rows, k_idx]  # [B]
        aug_q, aug_0, aug_2 = (self.augmentation(b, view["wavelengths"]) for _ in range(3))
        present = present_mask(view)

        v_q = pool(self._encode(self.encoder, aug_q(own), view, t_own))  # [B, D]
        with torch.no_grad():
            key = self._key.on(device)
            keys = torch.cat([aug_0(other), aug_q(other), aug_2(own)])  # k0, k1, k2: [3B, C, H, W]
            key_times = None if time is None else torch.cat([t_other, t_other, t_own])
            v_k = pool(self._encode(key["encoder"], keys, view, key_times, copies=3)).chunk(3)

        losses, positives = [], []
        for i, (head, key_head, queue) in enumerate(
            zip(self.heads, key["heads"], self.queues, strict=True)
        ):
            z_q = F.normalize(head(v_q), dim=-1)  # [B, E]
            with torch.no_grad():
                z_k = [F.normalize(key_head(v), dim=-1) for v in v_k]  # 3 x [B, E]
                negatives = [queue.keys]  # [Q, E]
                if i > 0:  # keys that differ in what this head must tell apart
                    negatives += [z_k[j][present] for j in range(len(HEADS)) if j != i]
            losses.append(
                info_nce(z_q, z_k[i], torch.cat(negatives), self.temperature, present.float())
            )
            positives.append(z_k[i])
            if i == 0:
                health = embedding_health(z_q[present])
        if self.training:
            self._enqueue(positives, present)
        return torch.stack(losses), health

    def augmentation(self, batch: int, wavelengths: torch.Tensor) -> Callable:
        """One random draw of SeCo's augmentation: images [B, C, H, W] -> views [B, C, H, W]
        (crop and flips, then colour), the same parameters for every image it is applied to."""
        # Brightness is the colour jitter's, not the crop's offset.
        crop = Augmentation.draw(batch, wavelengths.device, self.min_crop_scale, brightness=0.0)
        colour = ColourAugmentation.draw(batch, wavelengths, **self.colour)
        return lambda images: colour(crop(images))

    def _encode(self, encoder, images, view, time, copies: int = 1) -> torch.Tensor:
        """Encoder features [B', 1 + N, D] of images [B', C, H, W] = ``copies`` x the batch."""
        wavelengths, gsd = view["wavelengths"], view.get("gsd")
        if copies > 1:
            wavelengths = wavelengths.repeat(copies, 1) if wavelengths.dim() == 2 else wavelengths
            gsd = gsd.repeat(copies) if torch.is_tensor(gsd) and gsd.dim() == 1 else gsd
        return encoder.encode(encoder.tokenize(images, view["band_ids"], wavelengths, gsd, time))

    def _enqueue(self, keys: list[torch.Tensor], present: torch.Tensor) -> None:
        """Every rank's keys of present samples enter each head's queue (same on every rank)."""
        for queue, k in zip(self.queues, keys, strict=True):
            enqueue_everywhere(queue, k, present)
