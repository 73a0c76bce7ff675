"""Seasonal contrast (SeCo; SPECS O6): MoCo-v2 over two seasons of the same place.

Per sample, a query season i and a key season j != i are drawn from the time series. With
``t_q``, ``t_0``, ``t_2`` independent random augmentations (resized crop, flips, brightness):

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
"""

from __future__ import annotations

import math
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
        brightness: largest brightness shift, in normalised units.
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
        brightness: float = 0.1,
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
            ("brightness", brightness, brightness >= 0),
        ):
            if not ok:
                raise ValueError(f"{option}={value}: out of range (see SeasonalContrast)")
        self.encoder = encoder
        self.temperature = temperature
        self.momentum = momentum
        self.min_crop_scale = min_crop_scale
        self.brightness = brightness
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
        aug_q, aug_0, aug_2 = (
            Augmentation.draw(b, device, self.min_crop_scale, self.brightness) for _ in range(3)
        )
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
