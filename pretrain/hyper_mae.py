"""Hyper-MAE: masked autoencoding of bands and patches with the LESS encoder (SPECS O3).

The LESS encoder holds one token per (band, patch), [B, C+1, N+1, D] with its cls row, column and
corner, so masking happens on two axes. Per sample, first half of each sensor's bands are
hidden (at least ``min_channels`` stay visible), then 75% of the patches; the encoder sees only
visible bands x visible patches. A light LESS decoder (``LessDecoder``) fills every other slot
with a mask token and predicts its pixels. Two terms, each a per-patch norm-pix MSE over valid
pixels:

* ``loss/position``: the masked patches of the visible bands;
* ``loss/channel``: the masked bands, at every patch;

``loss = loss/position + loss/channel``, each averaged over the sensors (modalities) of the batch
that have targets of that kind.

Several co-registered sensors in one batch are encoded as one LESS token grid, their bands
side by side on the channel axis (the wavelength embedding tells them apart; the patch grid is
shared, with the first sensor's GSD). Each sensor's bands are masked on their own (ratio and
``min_channels`` per sensor), the patch mask is shared. A sensor a sample lacks
(``view["present"]`` False) is fully masked for that sample: every band of it is a channel
target, generated from the other sensors' tokens. Its pixels hold no data, so it adds no loss;
``drop_sensor`` hides a present sensor of a sample the same way, which gives that cross-modal
generation real targets to train on.

nodata: invalid pixels never count in the loss, and the norm-pix statistics of a target patch
come from its valid pixels only (its nodata fill would otherwise set them). Bands without any
valid pixel in a sample (e.g. EnMAP's water-vapour bands) are hidden before any band with data,
so the visible bands carry data wherever the sample has enough of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from eoforge.models.less import LessDecoder, LessTokens, LessViT
from eoforge.models.spectral import patchify, unpatchify
from eoforge.pretrain.mae import norm_pix, patch_targets, random_masking
from eoforge.pretrain.views import present_mask, sensor_views, valid_mask


def channel_masking(
    has_data: torch.Tensor, mask_ratio: float, min_keep: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample random band masking by argsort of noise, bands without data hidden first.

    Args:
        has_data: [B, C] True where the band holds at least one valid pixel in the sample.
        mask_ratio: fraction of bands to hide.
        min_keep: fewest bands kept visible (all of them when C is smaller).

    Returns:
        keep: [B, Kc] indices of the visible bands, Kc = min(C, max(min_keep, round(C (1 - r)))),
        mask: [B, C] True where the band is hidden.
    """
    b, c = has_data.shape
    n_keep = min(c, max(min_keep, round(c * (1 - mask_ratio))))
    # Noise in [0, 1) for bands with data and [1, 2) for empty ones: empty bands sort last.
    noise = torch.rand(b, c, device=has_data.device) + (~has_data).float()  # [B, C]
    keep = torch.argsort(noise, dim=1)[:, :n_keep]  # [B, Kc]
    mask = torch.ones(b, c, dtype=torch.bool, device=has_data.device)
    mask.scatter_(1, keep, False)
    return keep, mask


@dataclass
class Reconstruction:
    """One Hyper-MAE pass over a batch.

    Attributes:
        loss_position, loss_channel: the two loss terms (scalars).
        sensor_position, sensor_channel: {sensor: scalar} each sensor's terms (0 where it has no
            target of that kind, and then left out of the average).
        latent: [B, Kc+1, Kn+1, D] encoder output for the visible bands x patches.
        predictions: {sensor: [B, C, N, p*p]} predicted pixels, norm-pix units if ``norm_pix``.
        seen: {sensor: [B, C, N]} True where the encoder saw the (band, patch) token.
        channel_targets: {sensor: [B, C]} True for the bands reconstructed at every patch (the
            masked ones, all of a missing or dropped sensor).
        position_mask: [B, N] True at the masked patches (shared by all sensors).
    """

    loss_position: torch.Tensor
    loss_channel: torch.Tensor
    sensor_position: dict[str, torch.Tensor]
    sensor_channel: dict[str, torch.Tensor]
    latent: torch.Tensor
    predictions: dict[str, torch.Tensor]
    seen: dict[str, torch.Tensor]
    channel_targets: dict[str, torch.Tensor]
    position_mask: torch.Tensor


class HyperMAE(nn.Module):
    """Hyper-MAE objective around a LESS encoder (SPECS O3).

    Args:
        encoder: a ``LessViT``.
        channel_mask_ratio: fraction of each sensor's bands hidden per sample (0.5 published).
        position_mask_ratio: fraction of patches hidden per sample (0.75 published).
        min_channels: bands of each sensor that stay visible at least (2 published); a sensor
            with no more bands than this has none masked and only the position term.
        decoder_dim, decoder_depth, decoder_heads: the LESS decoder's size. Small by default
            (128 wide, 2 blocks, 4 heads, rank 4): it runs over every band of every patch, so its
            cost grows with C * N, against the encoder's visible quarter of half the bands.
        norm_pix: normalise each band of each target patch by its own mean and std.
        drop_sensor: per sample, the probability of hiding one of its present sensors entirely
            (when it has two or more), to train cross-modal generation; 0 keeps every sensor.
    """

    name = "hyper_mae"

    def __init__(
        self,
        encoder: nn.Module,
        channel_mask_ratio: float = 0.5,
        position_mask_ratio: float = 0.75,
        min_channels: int = 2,
        decoder_dim: int = 128,
        decoder_depth: int = 2,
        decoder_heads: int = 4,
        norm_pix: bool = True,
        drop_sensor: float = 0.0,
    ):
        super().__init__()
        for option, ratio in (
            ("channel_mask_ratio", channel_mask_ratio),
            ("position_mask_ratio", position_mask_ratio),
        ):
            if not 0 < ratio < 1:
                raise ValueError(f"{option}={ratio}: must be in (0, 1)")
        if min_channels < 1:
            raise ValueError(f"min_channels={min_channels}: must be >= 1")
        if not 0 <= drop_sensor < 1:
            raise ValueError(f"drop_sensor={drop_sensor}: must be in [0, 1)")
        if not isinstance(encoder, LessViT):
            raise ValueError(
                "hyper_mae masks bands and patches of the LESS token grid; build the encoder as "
                f"a less_* model (model.name), not {type(encoder).__name__}"
            )
        if decoder_dim % (2 * decoder_heads):
            raise ValueError(
                f"decoder_dim={decoder_dim}: must divide by 2 * decoder_heads = {2 * decoder_heads}"
            )
        self.encoder = encoder
        self.channel_mask_ratio = channel_mask_ratio
        self.position_mask_ratio = position_mask_ratio
        self.min_channels = min_channels
        self.norm_pix = norm_pix
        self.drop_sensor = drop_sensor
        self.decoder = LessDecoder(
            encoder.embed_dim,
            encoder.patch_size,
            decoder_dim,
            decoder_depth,
            decoder_heads,
            k=2,
            rank=4,
            perception_radius_m=encoder.perception_radius_m,
        )

    def forward(self, batch: dict, preview: bool = False) -> dict:
        """Loss over a batch -> {"loss", "loss/position", "loss/channel", "loss/<sensor>"}, the
        last the sum of that sensor's two terms.

        With ``preview=True`` returns reconstruction images instead (see ``preview``).
        """
        if preview:
            return self.preview(batch)
        r = self.reconstruct(batch)
        out = {
            f"loss/{sensor}": (r.sensor_position[sensor] + r.sensor_channel[sensor]).detach()
            for sensor in r.sensor_position
        }
        out["loss/position"] = r.loss_position.detach()
        out["loss/channel"] = r.loss_channel.detach()
        out["loss"] = r.loss_position + r.loss_channel
        return out

    def reconstruct(self, batch: dict) -> Reconstruction:
        """Mask, encode, decode and score every sensor of a batch."""
        views = _check_views(batch)
        enc = self.encoder
        b = views[0][1]["image"].shape[0]
        device = views[0][1]["image"].device
        present = torch.stack([present_mask(v) for _, v in views], dim=1)  # [B, M]
        hidden = ~present | self._dropped(present)  # [B, M]

        parts, keeps, visible, targets, valids, offset = [], [], [], [], [], 0
        for m, (_, view) in enumerate(views):
            valid = valid_mask(view)  # [B, C, H, W], absent samples all False
            keep, mask = channel_masking(
                valid.flatten(2).any(2), self.channel_mask_ratio, self.min_channels
            )  # [B, Kc_m], [B, C_m]
            # A hidden sensor's kept bands still fill their slots of the fixed-size index, but
            # as tokens without data, which the encoder leaves out of every attention.
            seen_valid = valid & ~hidden[:, m, None, None, None]
            parts.append(
                enc.tokenize(
                    view["image"],
                    view["band_ids"],
                    view["wavelengths"],
                    view.get("gsd"),
                    seen_valid,
                )
            )
            keeps.append(keep + offset)
            visible.append(~mask & ~hidden[:, m, None])  # [B, C_m]
            targets.append(mask | hidden[:, m, None])  # [B, C_m]
            valids.append(valid)
            offset += valid.shape[1]
        tokens = _concat(parts)  # [B, C, N, D] over all sensors' bands
        keep_channels = torch.cat(keeps, dim=1)  # [B, Kc]
        keep_positions, position_mask = random_masking(
            b, tokens.tokens.shape[2], self.position_mask_ratio, device
        )  # [B, Kn], [B, N]
        position_mask = position_mask.bool()
        latent = enc.encode(tokens, keep_channels, keep_positions)  # [B, Kc+1, Kn+1, D]
        seen = torch.cat(visible, 1)[:, :, None] & ~position_mask[:, None] & tokens.valid
        pred = self.decoder(latent, tokens, keep_channels, keep_positions, seen)  # [B, C, N, pp]

        position_losses, channel_losses, out_pred, out_seen, out_targets = [], [], {}, {}, {}
        start = 0
        for m, (sensor, view) in enumerate(views):
            c = valids[m].shape[1]
            pred_m = pred[:, start : start + c]  # [B, C_m, N, p*p]
            error = self._error(view["image"], valids[m], pred_m)  # [B, C_m, N, p*p]
            pixel_valid = patchify(valids[m], self.encoder.patch_size)  # [B, C_m, N, p*p]
            position_targets = visible[m][:, :, None] & position_mask[:, None]  # [B, C_m, N]
            position_losses.append(_masked_mean(error, pixel_valid & position_targets[..., None]))
            channel_losses.append(_masked_mean(error, pixel_valid & targets[m][:, :, None, None]))
            out_pred[sensor] = pred_m
            out_seen[sensor] = seen[:, start : start + c]
            out_targets[sensor] = targets[m]
            start += c
        return Reconstruction(
            loss_position=_mean_over_sensors(position_losses),
            loss_channel=_mean_over_sensors(channel_losses),
            sensor_position={
                s: loss for (s, _), (loss, _) in zip(views, position_losses, strict=True)
            },
            sensor_channel={
                s: loss for (s, _), (loss, _) in zip(views, channel_losses, strict=True)
            },
            latent=latent,
            predictions=out_pred,
            seen=out_seen,
            channel_targets=out_targets,
            position_mask=position_mask,
        )

    def _dropped(self, present: torch.Tensor) -> torch.Tensor:
        """[B, M] True for the one present sensor hidden in a sample, per ``drop_sensor``."""
        if self.drop_sensor == 0 or present.shape[1] < 2:
            return torch.zeros_like(present)
        b, m = present.shape
        drop = (torch.rand(b, device=present.device) < self.drop_sensor) & (present.sum(1) >= 2)
        # A random present sensor: the largest noise among the present ones.
        choice = (torch.rand(b, m, device=present.device) + present.float()).argmax(1)  # [B]
        one_hot = nn.functional.one_hot(choice, m).bool()  # [B, M]
        return one_hot & drop[:, None]

    def _error(self, images: torch.Tensor, valid: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """Squared norm-pix error of pred [B, C, N, p*p], zero at invalid pixels."""
        target, pixel_valid = patch_targets(images, valid, self.encoder.patch_size)
        if self.norm_pix:
            mean, std = norm_pix(target, pixel_valid)
            target = (target - mean) / std
        return (pred.float() - target).square() * pixel_valid

    @torch.no_grad()
    def preview(self, batch: dict, max_images: int = 4) -> dict[str, dict[str, torch.Tensor]]:
        """Images for a reconstruction grid: {sensor: {"input", "masked", "reconstruction",
        "band_ids", "wavelengths"}}, each image [b, C, H, W] in normalised units. "masked" shows
        what the encoder saw (zeros elsewhere); "reconstruction" is the input where seen and the
        prediction everywhere else."""
        batch = {
            sensor: view if sensor == "meta" else _first_samples(view, max_images)
            for sensor, view in batch.items()
        }
        r = self.reconstruct(batch)
        p = self.encoder.patch_size
        out = {}
        for sensor, view in sensor_views(batch):
            images, valid = view["image"].float(), valid_mask(view)
            grid_h = images.shape[-2] // p
            target, pixel_valid = patch_targets(images, valid, p)  # [b, C, N, p*p]
            recon = r.predictions[sensor].float()
            if self.norm_pix:
                mean, std = norm_pix(target, pixel_valid)
                recon = recon * std + mean
            seen = r.seen[sensor][..., None]  # [b, C, N, 1]
            out[sensor] = {
                "input": images,
                "masked": unpatchify(target * seen, p, grid_h),
                "reconstruction": unpatchify(torch.where(seen, target, recon), p, grid_h),
                "band_ids": view["band_ids"],
                "wavelengths": view["wavelengths"],
            }
        return out


def _check_views(batch: dict) -> list[tuple[str, dict]]:
    """The sensor views, checked to be single images on one grid."""
    views = sensor_views(batch)
    if not views:
        raise ValueError("hyper_mae: the batch holds no sensor view")
    first, shape = views[0][0], None
    for sensor, view in views:
        if view["image"].ndim != 4:
            raise ValueError(
                f"hyper_mae: sensor {sensor!r} has image of shape {tuple(view['image'].shape)}; "
                "it takes [B, C, H, W] views, not time series"
            )
        b, _, h, w = view["image"].shape
        if shape is not None and (b, h, w) != shape:
            raise ValueError(
                f"hyper_mae: sensor {sensor!r} is [B={b}, H={h}, W={w}] but {first!r} is "
                f"[B, H, W]={list(shape)}; several sensors must be co-registered on one grid"
            )
        shape = (b, h, w)
    return views


def _first_samples(view: dict, count: int) -> dict:
    """The view cut to its first ``count`` samples; per-band tensors ([C] wavelengths) stay."""
    per_band = ("wavelengths", "bandwidths")
    return {
        key: value[:count]
        if torch.is_tensor(value) and value.ndim > 0 and not (key in per_band and value.ndim == 1)
        else value
        for key, value in view.items()
    }


def _concat(parts: list[LessTokens]) -> LessTokens:
    """Several sensors' tokens on one patch grid -> one token set with their bands side by side."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    return LessTokens(
        tokens=torch.cat([t.tokens for t in parts], dim=1),
        wavelengths=torch.cat([t.wavelengths for t in parts], dim=1),
        positions=first.positions,
        valid=torch.cat([t.valid for t in parts], dim=1),
        grid=first.grid,
        spacing_m=first.spacing_m,
        min_spacing_m=first.min_spacing_m,
    )


def _masked_mean(error: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of error over the True entries of weight -> (mean, their count); 0 when none."""
    count = weight.sum()
    return (error * weight).sum() / count.clamp_min(1), count


def _mean_over_sensors(terms: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Average of (loss, weight) terms over the sensors whose weight is positive (0 if none);
    a sensor without targets of a kind (e.g. 2 bands, none masked) does not dilute the others."""
    losses = torch.stack([loss for loss, _ in terms])  # [M]
    has = torch.stack([weight > 0 for _, weight in terms]).float()  # [M]
    return (losses * has).sum() / has.sum().clamp_min(1.0)
