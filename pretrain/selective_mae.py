"""SelectiveMAE: a masked autoencoder that encodes and reconstructs few, chosen patches (SPECS O2).

Per sample, the encoder sees K = 15% of the N patches (``mask_ratio`` 0.85) and a decoder made of
cross-attention blocks only reconstructs M = 25% of the patches (``target_ratio``), all among
the ones the encoder did not see: queries are the mask token plus the 2-D sincos position of
each target, keys and values the projected encoder output. Neither the encoder nor the decoder
ever runs over all N patches, which is where the speed-up over MAE comes from.

Patch selection (PSTS), on tensors, batched, without gradient, inside the step:

1. Score: the HOG energy of each patch (``eoforge.pretrain.hog``; the upstream scorer is
   identically 0 -- **BUG** fixed there), standardised over the patches of each image so the
   softmax below has the same sharpness on any sensor and normalisation. A blank (absent) image
   scores all patches equal, i.e. uniform selection.
2. Initial set: ``initial_fraction`` of the K visible patches drawn without replacement from
   softmax(score) (Gumbel top-k).
3. Growth to K in ``grow_steps`` steps: every unselected patch is compared with the selected set
   by its largest cosine similarity over the selected patches' features (patch embedding +
   position, the encoder's input tokens), and each step adds, by the phase of training, the
   most similar patches, a blend of most and least similar, the least similar, a blend of least
   similar and random, then random ones (``phase_counts``).
4. Targets: M patches drawn from softmax(score) among the patches left unselected.

The phase schedule follows the published one, given in epochs of an 800-epoch run: most similar
until epoch 280, blend shifting linearly from most to least similar over epochs 280-300, least
similar until 580, blend shifting from least similar to random over 580-600, random after. As
fractions of training (``set_progress``) these are the default ``phase_bounds`` (0.35, 0.375,
0.725, 0.75).

The loss is MAE's per-band norm-pix MSE over valid pixels (``MAE.loss``), over the M targets. A
sample lacking the sensor (``view["present"]`` False) has no valid pixel, so it adds no loss; it
still runs through the step. The published recipe scales the learning rate by
``target_ratio / mask_ratio`` (0.25 / 0.85) against MAE's; that belongs to the run's
``optim`` settings.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

from eoforge.models.attention import attention
from eoforge.models.pos_embed import sincos_2d
from eoforge.models.spectral import patchify, unpatchify
from eoforge.pretrain.hog import hog_energy
from eoforge.pretrain.mae import MAE, norm_pix, patch_targets
from eoforge.pretrain.views import sensor_views, valid_mask

PHASE_BOUNDS = (0.35, 0.375, 0.725, 0.75)  # epochs 280, 300, 580, 600 of 800


def phase_counts(
    progress: float, count: int, bounds: Sequence[float] = PHASE_BOUNDS
) -> tuple[int, int, int]:
    """How one growth step of ``count`` patches splits into (most similar, least similar,
    random) at ``progress`` (fraction of training done); see the module docstring."""
    similar_end, blend_end, dissimilar_end, random_start = bounds
    if progress < similar_end:
        return count, 0, 0
    if progress < blend_end:
        near = round((1 - (progress - similar_end) / (blend_end - similar_end)) * count)
        return near, count - near, 0
    if progress < dissimilar_end:
        return 0, count, 0
    if progress < random_start:
        far = round((1 - (progress - dissimilar_end) / (random_start - dissimilar_end)) * count)
        return 0, far, count - far
    return 0, 0, count


def gumbel_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """k indices per row drawn without replacement from softmax(logits [B, N]) -> [B, k].

    Entries at -inf are never drawn (as long as k does not exceed the finite ones).
    """
    uniform = torch.rand_like(logits).clamp_(1e-20, 1.0)
    return (logits - torch.log(-torch.log(uniform))).topk(k, dim=1).indices


def expand_selection(
    features: torch.Tensor, selected: torch.Tensor, near: int, far: int, random: int
) -> torch.Tensor:
    """Grow a selection by cosine similarity to it.

    Args:
        features: [B, N, D] unit-norm patch features.
        selected: [B, S] indices of the selected patches.
        near, far, random: how many unselected patches to add that are most similar to the
            selected set, least similar to it, and uniformly random. A patch's similarity to
            the set is its largest cosine similarity to a member.

    Returns:
        [B, S + near + far + random] indices: ``selected`` then the additions in that order.
    """
    chosen = features.gather(1, selected[..., None].expand(-1, -1, features.shape[-1]))
    similarity = (features @ chosen.transpose(1, 2)).amax(dim=-1)  # [B, N]
    taken = torch.zeros_like(similarity, dtype=torch.bool).scatter_(1, selected, True)
    picks = [selected]
    for count, key in ((near, similarity), (far, -similarity), (random, None)):
        if count == 0:
            continue
        if key is None:
            key = torch.rand_like(similarity)
        index = key.masked_fill(taken, -torch.inf).topk(count, dim=1).indices  # [B, count]
        taken.scatter_(1, index, True)
        picks.append(index)
    return torch.cat(picks, dim=1)


class CrossBlock(nn.Module):
    """Pre-norm cross-attention block: queries attend to a context, then an MLP.

    There is no self-attention among the queries: each target is reconstructed from the encoder
    output alone, so the cost is linear in the number of targets.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, eps: float = 1e-6):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"decoder width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.norm_q = nn.LayerNorm(dim, eps=eps)
        self.norm_kv = nn.LayerNorm(dim, eps=eps)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x [B, M, D] queries, context [B, L, D] -> [B, M, D]."""
        batch, length, dim = x.shape
        heads = self.num_heads
        q = self.q(self.norm_q(x)).reshape(batch, length, heads, dim // heads).transpose(1, 2)
        kv = self.kv(self.norm_kv(context)).reshape(batch, -1, 2, heads, dim // heads)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, L, d]
        out = attention(q, k, v)  # [B, H, M, d]
        x = x + self.proj(out.transpose(1, 2).reshape(batch, length, dim))
        return x + self.mlp(self.norm2(x))


class SelectiveMAE(MAE):
    """SelectiveMAE objective around a spectrum-aware encoder (SPECS O2).

    Args:
        encoder: a model with the encoder protocol and the spectral tokenizer (as for MAE).
        mask_ratio: fraction of patches hidden from the encoder (0.85 published: K = 15%).
        target_ratio: fraction of all patches reconstructed, drawn among the hidden ones
            (0.25 published); at most ``mask_ratio``.
        decoder_dim, decoder_depth, decoder_heads: cross-attention decoder size (512 x 8 x 16).
        norm_pix: normalise each band of each target patch by its own mean and variance.
        initial_fraction: share of the K visible patches drawn from the HOG score before the
            similarity-driven growth (0.5 published).
        grow_steps: steps of the growth to K (2 published).
        phase_bounds: training fractions where the growth rule changes (module docstring).
    """

    name = "selective_mae"

    def __init__(
        self,
        encoder: nn.Module,
        mask_ratio: float = 0.85,
        target_ratio: float = 0.25,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        norm_pix: bool = True,
        initial_fraction: float = 0.5,
        grow_steps: int = 2,
        phase_bounds: Sequence[float] = PHASE_BOUNDS,
    ):
        super().__init__(encoder, mask_ratio, decoder_dim, decoder_depth, decoder_heads, norm_pix)
        if not 0 < target_ratio <= mask_ratio:
            raise ValueError(f"target_ratio={target_ratio}: must be in (0, mask_ratio]")
        if not 0 < initial_fraction <= 1:
            raise ValueError(f"initial_fraction={initial_fraction}: must be in (0, 1]")
        if grow_steps < 1:
            raise ValueError(f"grow_steps={grow_steps}: must be >= 1")
        bounds = tuple(float(b) for b in phase_bounds)
        if len(bounds) != 4 or list(bounds) != sorted(bounds) or bounds[0] < 0 or bounds[-1] > 1:
            raise ValueError(
                f"phase_bounds={phase_bounds}: must be 4 increasing fractions in [0, 1]"
            )
        self.target_ratio = target_ratio
        self.initial_fraction = initial_fraction
        self.grow_steps = grow_steps
        self.phase_bounds = bounds
        self.progress = 0.0
        # MAE's self-attention decoder is replaced by cross-attention blocks over the targets.
        self.decoder_blocks = nn.ModuleList(
            CrossBlock(decoder_dim, decoder_heads) for _ in range(decoder_depth)
        )

    def set_progress(self, fraction: float) -> None:
        """Fraction of training done (step / total steps); drives the selection phase."""
        self.progress = float(fraction)

    def forward(self, batch: dict, preview: bool = False) -> dict:
        """Loss over every sensor in a batch -> {"loss", "loss/<sensor>"}; with ``preview=True``
        reconstruction images (``preview``)."""
        if preview:
            return self.preview(batch)
        out, losses = {}, []
        for sensor, view in sensor_views(batch):
            loss, *_ = self.reconstruct(view)
            out[f"loss/{sensor}"] = loss.detach()
            losses.append(loss)
        out["loss"] = torch.stack(losses).mean()
        return out

    def sizes(self, length: int) -> tuple[int, int]:
        """(K visible, M target) patches out of ``length``."""
        n_keep = max(1, round(length * (1 - self.mask_ratio)))
        n_target = min(length - n_keep, max(1, round(length * self.target_ratio)))
        return n_keep, n_target

    @torch.no_grad()
    def select(
        self, tokens: torch.Tensor, score: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """PSTS: tokens [B, N, D] (embedding + position), score [B, N] ->
        (keep [B, K] visible patches, targets [B, M] patches to reconstruct)."""
        n_keep, n_target = self.sizes(tokens.shape[1])
        mean, std = score.mean(dim=1, keepdim=True), score.std(dim=1, correction=0, keepdim=True)
        logits = (score - mean) / std.clamp_min(1e-6)  # [B, N]
        n_initial = max(1, round(n_keep * self.initial_fraction))
        keep = gumbel_top_k(logits, n_initial)  # [B, K0]
        features = F.normalize(tokens.float(), dim=-1)  # [B, N, D]
        to_add = n_keep - n_initial
        for step in range(self.grow_steps):
            count = to_add // self.grow_steps + (step < to_add % self.grow_steps)
            if count:
                counts = phase_counts(self.progress, count, self.phase_bounds)
                keep = expand_selection(features, keep, *counts)
        taken = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, keep, True)
        targets = gumbel_top_k(logits.masked_fill(taken, -torch.inf), n_target)  # [B, M]
        return keep, targets

    def reconstruct(
        self, view: dict
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One sensor's view -> (loss, predictions [B, C, M, p*p] at the targets, keep [B, K],
        targets [B, M])."""
        images, band_ids, wavelengths = view["image"], view["band_ids"], view["wavelengths"]
        valid = valid_mask(view)
        enc, p = self.encoder, self.encoder.patch_size
        tokens = self.tokenize(view)
        keep, targets = self.select(tokens.detach(), hog_energy(images, p, valid))
        latent = enc.encode(tokens, keep)  # [B, 1 + K, D]
        z = self.decode(latent, targets, enc.grid(images))  # [B, M, Dd]
        pred = self.head(z, band_ids, wavelengths)  # [B, C, M, p*p]
        index = targets[:, None, :, None].expand(-1, images.shape[1], -1, p * p)
        target_pixels = patchify(images, p).gather(2, index)  # [B, C, M, p*p]
        target_valid = patchify(valid, p).gather(2, index)  # [B, C, M, p*p]
        # MAE.loss patchifies images: hand it the targets laid out as a 1 x M strip of patches.
        loss = self.loss(
            unpatchify(target_pixels, p, 1),
            unpatchify(target_valid, p, 1),
            pred,
            torch.ones_like(targets, dtype=pred.dtype),
        )
        return loss, pred, keep, targets

    def decode(
        self, latent: torch.Tensor, targets: torch.Tensor, grid: tuple[int, int]
    ) -> torch.Tensor:
        """Encoder output [B, 1 + K, D], targets [B, M] -> decoder tokens at the targets
        [B, M, Dd]."""
        context = self.decoder_embed(latent)  # [B, 1 + K, Dd]
        positions = sincos_2d(*grid, self.decoder_dim, context.device, context.dtype)  # [N, Dd]
        x = self.mask_token(context, targets.shape[1]) + positions[targets]  # [B, M, Dd]
        for block in self.decoder_blocks:
            x = block(x, context)
        return self.decoder_norm(x)

    @torch.no_grad()
    def preview(self, batch: dict, max_images: int = 4) -> dict[str, dict[str, torch.Tensor]]:
        """Images for a reconstruction grid: {sensor: {"input", "masked", "reconstruction",
        "band_ids", "wavelengths"}}, each image [b, C, H, W] in normalised units. "masked" shows
        the visible patches; "reconstruction" adds the predicted targets, the other hidden
        patches stay blank (0)."""
        out = {}
        p = self.encoder.patch_size
        for sensor, view in sensor_views(batch):
            view = {k: (v[:max_images] if torch.is_tensor(v) else v) for k, v in view.items()}
            _, pred, keep, targets = self.reconstruct(view)
            images = view["image"]
            grid_h = images.shape[-2] // p
            patches, pixel_valid = patch_targets(images, valid_mask(view), p)  # [b, C, N, p*p]
            visible = torch.zeros(patches.shape[0], patches.shape[2], device=images.device)
            visible = visible.scatter_(1, keep, 1.0)[:, None, :, None]  # [b, 1, N, 1]
            index = targets[:, None, :, None].expand(-1, patches.shape[1], -1, p * p)
            recon = pred.float()  # [b, C, M, p*p]
            if self.norm_pix:  # undo norm_pix with each target patch's own statistics
                mean, std = norm_pix(patches.gather(2, index), pixel_valid.gather(2, index))
                recon = recon * std + mean
            shown = patches * visible
            out[sensor] = {
                "input": images,
                "masked": unpatchify(shown, p, grid_h),
                "reconstruction": unpatchify(shown.scatter(2, index, recon), p, grid_h),
                "band_ids": view["band_ids"],
                "wavelengths": view["wavelengths"],
            }
        return out
