"""I-JEPA (Assran et al. 2023, arXiv:2301.08243): predict a target encoder's features of masked
blocks from a context block, in latent space.

Per image, I-JEPA's multi-block masking draws M = 4 target blocks (scale 0.15-0.2 of the patch
grid, aspect ratio 0.75-1.5) and one context block (scale 0.85-1.0, square) from which the
target patches are removed. With x the patch tokens:

  s_x = f_theta(x_context)                    the learned (context) encoder on the context tokens,
  s_y = LN(f_theta_bar(x))                    the target encoder on all tokens, layer-normalised
                                              over the feature dimension (no gradient),
  s_hat_y(i) = g_phi(s_x, positions of block i)   a narrow predictor transformer, mask tokens
                                              carrying the target positions,
  L = 1/M sum_i  mean_{j in block i} smoothL1(s_hat_y(i)_j, s_y_j)   (or the squared error),

and the target encoder is an exponential moving average of the context encoder,
``theta_bar <- m theta_bar + (1 - m) theta``, with m rising linearly from ``momentum`` to
``momentum_end`` over the run, updated once per optimizer step (``after_optimizer_step``, the
training loop's hook; under ZeRO-3 the engine gathers the parameters whole for it).

Tokenizers with several tokens per patch (``channel_groups``: one per band group, group major)
are masked per patch: a patch in a block brings all of its group tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from eoforge.models.attention import Block
from eoforge.models.vit import LearnedToken, SpectralViT
from eoforge.pretrain.contrastive import HoldsMomentumCopy, MomentumCopy, embedding_health, pool
from eoforge.pretrain.views import present_mask, single_date_views


def block_size(
    grid: tuple[int, int], scale: tuple[float, float], aspect: tuple[float, float]
) -> tuple[int, int]:
    """(rows, cols) of a block covering a share of the grid uniform in ``scale``, with height /
    width uniform in ``aspect``; smaller than the grid on both sides (as I-JEPA's collator)."""
    gh, gw = grid
    area = gh * gw * (scale[0] + (scale[1] - scale[0]) * torch.rand(()).item())
    ratio = aspect[0] + (aspect[1] - aspect[0]) * torch.rand(()).item()
    h = max(1, min(gh - 1, round(math.sqrt(area * ratio))))
    w = max(1, min(gw - 1, round(math.sqrt(area / ratio))))
    return h, w


def place_blocks(count: int, batch: int, grid: tuple[int, int], size: tuple[int, int], device):
    """bool [count, B, N]: ``count`` blocks of ``size`` per sample, each at a uniform position."""
    (gh, gw), (h, w) = grid, size
    top = torch.randint(0, gh - h + 1, (count, batch, 1), device=device)
    left = torch.randint(0, gw - w + 1, (count, batch, 1), device=device)
    rows = torch.arange(gh, device=device).repeat_interleave(gw)  # [N]
    cols = torch.arange(gw, device=device).repeat(gh)  # [N]
    return (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)


def multi_block_masks(
    batch: int,
    grid: tuple[int, int],
    device,
    targets: int = 4,
    target_scale: tuple[float, float] = (0.15, 0.2),
    target_aspect: tuple[float, float] = (0.75, 1.5),
    context_scale: tuple[float, float] = (0.85, 1.0),
) -> tuple[torch.Tensor, torch.Tensor]:
    """I-JEPA's multi-block masks over a patch grid.

    One block size is drawn per batch for the targets and one for the context (as I-JEPA's
    collator does), so every sample has the same number of target patches; the positions are
    drawn per sample. The context loses the target patches; every sample keeps as many
    context patches as the sample left with the fewest (at least one), chosen at random.

    Returns:
        context: [B, K] patch indices of the context, ascending,
        target: [M, B, T] patch indices of each target block.
    """
    size = block_size(grid, target_scale, target_aspect)
    blocks = place_blocks(targets, batch, grid, size, device)  # [M, B, N]
    around = place_blocks(1, batch, grid, block_size(grid, context_scale, (1.0, 1.0)), device)
    allowed = around[0] & ~blocks.any(dim=0)  # [B, N]
    n_keep = max(1, int(allowed.sum(dim=1).min()))
    # Allowed patches first, in random order; a sample left with none keeps a random patch.
    score = torch.rand(allowed.shape, device=device) + (~allowed).float()
    context = score.argsort(dim=1)[:, :n_keep].sort(dim=1).values  # [B, K]
    t = size[0] * size[1]
    target = blocks.float().argsort(dim=-1, descending=True, stable=True)[..., :t]  # [M, B, T]
    return context, target.sort(dim=-1).values


def patch_tokens(index: torch.Tensor, groups: int, patches: int) -> torch.Tensor:
    """Patch indices [..., K] -> the indices of their tokens [..., G * K] in a group-major
    sequence of G tokens per patch (``channel_groups``; G = 1 leaves them as they are)."""
    offsets = torch.arange(groups, device=index.device) * patches  # [G]
    return (index[..., None, :] + offsets[:, None]).flatten(-2)


class Predictor(nn.Module):
    """I-JEPA's narrow predictor: a transformer over the context features and one query per
    position to predict; returns the predictions at the queries.

    A query is a learned mask token plus the position code of its token, in the encoder's
    width; one linear layer maps context and queries into the predictor's width and another
    maps the predictions back.

    Args:
        dim: encoder width D.
        predictor_dim, depth, num_heads: predictor size (I-JEPA: 384 wide).
    """

    def __init__(self, dim: int, predictor_dim: int, depth: int, num_heads: int):
        super().__init__()
        self.mask_token = LearnedToken(dim)
        self.embed = nn.Linear(dim, predictor_dim)
        self.blocks = nn.ModuleList(
            Block(predictor_dim, num_heads, 4.0, qkv_bias=True) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(predictor_dim)
        self.proj = nn.Linear(predictor_dim, dim)

    def forward(self, context: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """context [B, K, D], positions [B, T, D] of the queries -> predictions [B, T, D]."""
        length = positions.shape[1]
        queries = self.mask_token(context, length) + positions.to(context.dtype)  # [B, T, D]
        x = self.embed(torch.cat([context, queries], dim=1))  # [B, K + T, Dp]
        for block in self.blocks:
            x = block(x)
        return self.proj(self.norm(x[:, -length:]))


class JEPA(HoldsMomentumCopy, nn.Module):
    """I-JEPA over the shared encoder (module docstring).

    Every single-date view of the batch is its own image; samples whose ``present`` is False
    count in no loss. The target encoder (``target_encoder``) is a ``contrastive.MomentumCopy``:
    outside the module tree, in float32, saved through the module's extra state, so a resumed
    run continues with the same target encoder.

    Args:
        encoder: a SpectralViT (any tokenizer).
        predictor_dim, predictor_depth, predictor_heads: predictor size (I-JEPA: 384 wide,
            6 to 12 deep).
        momentum, momentum_end: the EMA coefficient at the start and at the end of the run
            (I-JEPA: 0.996 -> 1.0, linear in steps).
        targets: target blocks per image (I-JEPA: 4).
        target_scale, target_aspect: share of the grid and height / width of a target block.
        context_scale: share of the grid of the context block.
        loss: ``"smooth_l1"`` (I-JEPA's code) or ``"mse"`` (its paper's L2).
    """

    name = "jepa"

    def __init__(
        self,
        encoder: nn.Module,
        predictor_dim: int = 384,
        predictor_depth: int = 6,
        predictor_heads: int = 12,
        momentum: float = 0.996,
        momentum_end: float = 1.0,
        targets: int = 4,
        target_scale: tuple[float, float] = (0.15, 0.2),
        target_aspect: tuple[float, float] = (0.75, 1.5),
        context_scale: tuple[float, float] = (0.85, 1.0),
        loss: str = "smooth_l1",
    ):
        super().__init__()
        if not isinstance(encoder, SpectralViT):
            raise ValueError("jepa masks and encodes patch tokens; build a ViT encoder (vit_*)")
        for option, value, ok in (
            ("momentum", momentum, 0 <= momentum <= momentum_end <= 1),
            ("targets", targets, targets >= 1),
            ("target_scale", target_scale, 0 < target_scale[0] <= target_scale[1] < 1),
            ("target_aspect", target_aspect, 0 < target_aspect[0] <= target_aspect[1]),
            ("context_scale", context_scale, 0 < context_scale[0] <= context_scale[1] <= 1),
            ("loss", loss, loss in ("smooth_l1", "mse")),
        ):
            if not ok:
                raise ValueError(f"{option}={value}: out of range (see JEPA)")
        self.encoder = encoder
        self.momentum = momentum
        self.momentum_end = momentum_end
        self.masking = dict(
            targets=targets,
            target_scale=tuple(target_scale),
            target_aspect=tuple(target_aspect),
            context_scale=tuple(context_scale),
        )
        self.loss_fn = F.smooth_l1_loss if loss == "smooth_l1" else F.mse_loss
        self.predictor = Predictor(
            encoder.embed_dim, predictor_dim, predictor_depth, predictor_heads
        )
        self._key = MomentumCopy({"encoder": encoder})
        self.progress = 0.0

    @property
    def target_encoder(self) -> nn.Module:
        """The EMA target encoder (not a submodule)."""
        return self.key_model["encoder"]

    @property
    def current_momentum(self) -> float:
        return self.momentum + (self.momentum_end - self.momentum) * self.progress

    def set_progress(self, fraction: float) -> None:
        self.progress = fraction

    def forward(self, batch: dict, preview: bool = False) -> dict:
        """{"loss", "loss/<sensor>", "collapse/std", "collapse/mean_cosine"} over the batch's
        single-date views (``contrastive.embedding_health`` of the pooled context features);
        ``preview`` returns ``{}`` (nothing to reconstruct)."""
        if preview:
            return {}
        out, losses, health = {}, [], []
        for sensor, view in single_date_views(batch, self.name):
            loss, stats = self.view_loss(view)
            out[f"loss/{sensor}"] = loss.detach()
            losses.append(loss)
            health.append(stats)
        out["loss"] = torch.stack(losses).mean()
        out.update({k: torch.stack([h[k] for h in health]).mean() for k in health[0]})
        return out

    def view_loss(self, view: dict) -> tuple[torch.Tensor, dict]:
        """(prediction loss, collapse statistics) of one sensor's view."""
        images, band_ids, wavelengths = view["image"], view["band_ids"], view["wavelengths"]
        gsd, time = view.get("gsd"), view.get("time")
        enc = self.encoder
        grid = enc.grid(images)
        tokens = enc.tokenize(images, band_ids, wavelengths, gsd, time)  # [B, L, D]
        positions = enc.patch_embed.positions(*grid, tokens)  # [L, D]
        b, length, dim = tokens.shape
        patches = grid[0] * grid[1]
        context, target = multi_block_masks(b, grid, tokens.device, **self.masking)
        groups = length // patches
        context = patch_tokens(context, groups, patches)  # [B, K]
        target = patch_tokens(target, groups, patches).flatten(0, 1)  # [M * B, T], block major
        m = target.shape[0] // b

        latent = enc.encode(tokens, context)  # [B, 1 + K, D]
        pred = self.predictor(latent.repeat(m, 1, 1), positions[target])  # [M * B, T, D]
        with torch.no_grad():
            key = self._key.on(images.device)["encoder"]
            features = key.encode(key.tokenize(images, band_ids, wavelengths, gsd, time))
            features = F.layer_norm(features[:, 1:].float(), (dim,))  # [B, L, D]
            s_y = torch.gather(
                features.repeat(m, 1, 1), 1, target[..., None].expand(-1, -1, dim)
            )  # [M * B, T, D]
        per_sample = self.loss_fn(pred.float(), s_y, reduction="none").mean(dim=(1, 2))
        present = present_mask(view)
        weight = present.repeat(m).float()  # [M * B]
        loss = (per_sample * weight).sum() / weight.sum().clamp_min(1.0)
        return loss, embedding_health(F.normalize(pool(latent)[present].float(), dim=-1))
