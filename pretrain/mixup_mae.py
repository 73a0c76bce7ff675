"""Cross-sensor token mixup (SMARTIES with the spectrum-aware tokenizer; SPECS O7).

For co-registered views of two sensors A and B (same B, H, W, e.g. Sentinel-2 and Sentinel-1),
both are tokenized by the shared T1 tokenizer. Per sample, a random half of the patch positions
take A's token and the rest B's (view 1); view 2 takes the exact complement. A position carries
its sensor's target and spectral ranges along with its token: the reconstruction head predicts
A's bands where the token came from A and B's bands where it came from B. Both views share one
random 75% mask and go through the shared encoder and decoder of MAE; each view's loss is the
per-band norm-pix MSE of MAE (over valid pixels), each band counted over the masked positions where it is the
target, averaged over bands per sensor and then over the sensors. ``L = (L1 + L2) / 2``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from eoforge.models.spectral import unpatchify
from eoforge.pretrain.mae import MAE, norm_pix, patch_targets, random_masking
from eoforge.pretrain.views import present_mask, valid_mask


def mixup_choice(present_a: torch.Tensor, present_b: torch.Tensor, length: int) -> torch.Tensor:
    """Which sensor each position of each view takes: bool [2, B, N], True for sensor A.

    Per sample a random ``N // 2`` positions take A in view 1 and the others B; view 2 is the
    complement. A sample with only one of the two sensors takes every position from the sensor
    it has, in both views.

    Args:
        present_a, present_b: bool [B], which samples carry sensor A, resp. B.
        length: N, patches per image.
    """
    batch = present_a.shape[0]
    rank = torch.rand(batch, length, device=present_a.device).argsort(1).argsort(1)  # [B, N]
    first = rank < length // 2  # [B, N]
    views = torch.stack([first, ~first])  # [2, B, N]
    only_a = (present_a & ~present_b)[None, :, None]  # [1, B, 1]
    only_b = (present_b & ~present_a)[None, :, None]
    return (views | only_a) & ~only_b


@dataclass
class MixupPass:
    """Everything one step of mixup computes, for the loss, previews and tests.

    Attributes:
        sensors: the names of sensors A and B.
        loss: ``(L1 + L2) / 2``, with graph.
        view_losses: [2] the two views' losses, with graph.
        sensor_losses: [2, 2] (view, sensor A/B) norm-pix MSE over that sensor's targets.
        from_a: bool [2, B, N] True where the view takes sensor A (see ``mixup_choice``).
        tokens: [2, B, N, D] the mixed tokens the encoder is given (before masking).
        mask: [B, N] 1 where a position is hidden from the encoder, in both views.
        pred_a, pred_b: [2, B, C_A, N, p*p] and [2, B, C_B, N, p*p] predictions of each
            sensor's bands at every position.
    """

    sensors: tuple[str, str]
    loss: torch.Tensor
    view_losses: torch.Tensor
    sensor_losses: torch.Tensor
    from_a: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor
    pred_a: torch.Tensor
    pred_b: torch.Tensor


class MixupMAE(MAE):
    """Cross-sensor token mixup over one shared spectrum-aware encoder (SPECS O7).

    **BUG** fixed: upstream overwrites sensor A's token tensor in place to build view 1 and then
    builds view 2 from that overwritten tensor, so view 2 is just sensor B. Here both views are
    built from the original, untouched token tensors of A and B (``torch.where``), so view 2 is
    the true complement of view 1.

    Missing sensors (``view["present"]`` False): a sample lacking one of the two sensors takes
    every position, token and target from the sensor it has, in both views; the only honest
    option, since the absent view holds no data (never zeros as tokens or targets). A sample
    lacking both sensors has no valid pixel and adds nothing to the loss.

    Args:
        encoder: a SpectralViT with the spectral tokenizer (``tokenizer="spectral"``).
        sensors: the two sensor names to mix, as (A, B); by default the batch's two sensor
            views in batch order.
        mask_ratio: fraction of positions hidden, the same positions in both views.
        decoder_dim, decoder_depth, decoder_heads: the shared MAE decoder.
        norm_pix: per-patch, per-band normalised reconstruction targets.
    """

    name = "mixup_mae"

    def __init__(
        self,
        encoder: nn.Module,
        sensors: list[str] | tuple[str, str] | None = None,
        mask_ratio: float = 0.75,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        norm_pix: bool = True,
    ):
        super().__init__(encoder, mask_ratio, decoder_dim, decoder_depth, decoder_heads, norm_pix)
        if sensors is not None:
            sensors = tuple(sensors)
            if len(sensors) != 2 or sensors[0] == sensors[1]:
                raise ValueError(f"sensors={list(sensors)}: must name two different sensors")
        self.sensors = sensors

    def forward(self, batch: dict, preview: bool = False) -> dict:
        """{"loss", "loss/view1", "loss/view2", "loss/<A>", "loss/<B>"} (sensor terms averaged
        over the views); with ``preview=True`` reconstruction images (see ``preview``)."""
        if preview:
            return self.preview(batch)
        res = self.mix(batch)
        sensors = res.sensor_losses.detach().mean(0)  # [2]
        return {
            "loss": res.loss,
            "loss/view1": res.view_losses[0].detach(),
            "loss/view2": res.view_losses[1].detach(),
            f"loss/{res.sensors[0]}": sensors[0],
            f"loss/{res.sensors[1]}": sensors[1],
        }

    def pair(self, batch: dict) -> tuple[tuple[str, dict], tuple[str, dict]]:
        """((A, view), (B, view)); errors name the sensors needed and those found."""
        found = [k for k in batch if k != "meta"]
        if self.sensors is not None:
            missing = [s for s in self.sensors if s not in batch]
            if missing:
                raise ValueError(
                    f"mixup_mae needs co-registered views of sensors {list(self.sensors)}; the "
                    f"batch lacks {missing} (it has {found})"
                )
            names = self.sensors
        elif len(found) != 2:
            raise ValueError(
                "mixup_mae needs co-registered views of two sensors per batch (e.g. 'S2L2A' and "
                f"'S1GRD'; choose them with objective.kwargs.sensors); the batch has {found}"
            )
        else:
            names = tuple(found)
        views = [(name, batch[name]) for name in names]
        for name, view in views:
            if view["image"].dim() != 4:
                raise ValueError(f"mixup_mae needs single-date views [B, C, H, W]; {name} is not")
        (name_a, a), (name_b, b) = views
        shape_a, shape_b = tuple(a["image"].shape), tuple(b["image"].shape)  # [B, C, H, W]
        if shape_a[0] != shape_b[0] or shape_a[2:] != shape_b[2:]:
            raise ValueError(
                f"mixup_mae needs co-registered views with the same B, H, W: {name_a} is "
                f"{shape_a} but {name_b} is {shape_b}"
            )
        return views[0], views[1]

    def mix(self, batch: dict) -> MixupPass:
        """Both mixed views through the shared encoder and decoder, and their losses."""
        (name_a, a), (name_b, b) = self.pair(batch)
        enc = self.encoder
        present_a, present_b = present_mask(a), present_mask(b)
        tokens_a = self.tokenize(a)  # [B, N, D]
        tokens_b = self.tokenize(b)  # [B, N, D]
        batch_size, length, dim = tokens_a.shape
        from_a = mixup_choice(present_a, present_b, length)  # [2, B, N]
        # Both views from the original tensors (the upstream bug built view 2 from view 1).
        tokens = torch.where(from_a[..., None], tokens_a, tokens_b)  # [2, B, N, D]
        keep, mask = random_masking(batch_size, length, self.mask_ratio, tokens.device)
        # The views share the mask, encoder and decoder: run them as one batch of 2B.
        keep2 = keep.repeat(2, 1)  # [2B, K]
        latent = enc.encode(tokens.reshape(2 * batch_size, length, dim), keep2)  # [2B, 1+K, D]
        z = self.decode(latent, keep2, enc.grid(a["image"]))  # [2B, N, Dd]
        pred_a = self.head(z, a["band_ids"], a["wavelengths"]).unflatten(0, (2, batch_size))
        pred_b = self.head(z, b["band_ids"], b["wavelengths"]).unflatten(0, (2, batch_size))
        valid_a, valid_b = valid_mask(a), valid_mask(b)
        sensor_losses, view_losses = [], []
        for v in range(2):
            owned = from_a[v].to(mask.dtype)  # [B, N]
            terms = torch.stack(
                [
                    self.loss(a["image"], valid_a, pred_a[v], mask * owned),
                    self.loss(b["image"], valid_b, pred_b[v], mask * (1 - owned)),
                ]
            )  # [2]
            # A sensor that is the target nowhere (absent from the whole batch) is left out of
            # the mean rather than counted as a zero loss.
            has = torch.stack([(mask * owned).any(), (mask * (1 - owned)).any()]).to(terms.dtype)
            sensor_losses.append(terms)
            view_losses.append((terms * has).sum() / has.sum().clamp_min(1.0))
        view_losses = torch.stack(view_losses)  # [2]
        return MixupPass(
            sensors=(name_a, name_b),
            loss=view_losses.mean(),
            view_losses=view_losses,
            sensor_losses=torch.stack(sensor_losses),
            from_a=from_a,
            tokens=tokens,
            mask=mask,
            pred_a=pred_a,
            pred_b=pred_b,
        )

    @torch.no_grad()
    def preview(self, batch: dict, max_images: int = 4) -> dict[str, dict[str, torch.Tensor]]:
        """View 1 per sensor: {sensor: {"input", "masked", "reconstruction", "band_ids",
        "wavelengths"}}, each image [b, C, H, W] in normalised units. "masked" shows the sensor's
        patches the encoder saw; "reconstruction" adds its predictions where it was the target;
        positions given to the other sensor are zero in both."""
        small = {k: (_head(v, max_images) if k != "meta" else v) for k, v in batch.items()}
        (name_a, a), (name_b, b) = self.pair(small)
        res = self.mix(small)
        p = self.encoder.patch_size
        out = {}
        for name, view, pred, owned in (
            (name_a, a, res.pred_a[0], res.from_a[0]),
            (name_b, b, res.pred_b[0], ~res.from_a[0]),
        ):
            images = view["image"]
            target, pixel_valid = patch_targets(images, valid_mask(view), p)  # [b, C, N, p*p]
            pred = pred.float()
            if self.norm_pix:  # undo the per-patch normalisation of the targets
                mean, std = norm_pix(target, pixel_valid)
                pred = pred * std + mean
            owned = owned.to(target.dtype)[:, None, :, None]  # [b, 1, N, 1]
            hidden = res.mask[:, None, :, None]  # [b, 1, N, 1]
            seen = target * owned * (1 - hidden)
            grid_h = images.shape[-2] // p
            out[name] = {
                "input": images,
                "masked": unpatchify(seen, p, grid_h),
                "reconstruction": unpatchify(seen + pred * owned * hidden, p, grid_h),
                "band_ids": view["band_ids"],
                "wavelengths": view["wavelengths"],
            }
        return out


def _head(view: dict, n: int) -> dict:
    """The first ``n`` samples of a view."""
    return {k: (v[:n] if torch.is_tensor(v) else v) for k, v in view.items()}
