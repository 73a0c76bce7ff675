"""Latent MIM Lite (OlmoEarth; Herzog et al. 2025, arXiv:2511.13655): masked modelling in latent
space against targets from a frozen random projection, plus an instance contrastive term.

Per sample, the tokens of every sensor in the batch form one sequence, each token belonging to a
group: a band group where the tokenizer has them (``channel_groups``: one token per group and
patch) and a sensor otherwise. Then, for each of two masked views of the same sample:

1. Modality-aware masking assigns every token to the encoder's input, the decoder's targets, or
   neither. Each sample ranks its groups at random; the input takes ``encode_ratio`` of the
   tokens from the top of that ranking and the targets take ``target_ratio`` from the bottom,
   so whole groups (a sensor, a band group) are input or target wherever the budget allows and
   a group split by the budget gives a random share of its tokens. A sample of one group falls
   back to per-token random assignment, MAE's masking.
2. Targets ``y_j = P(x_j)``: the raw patch of target token j through a frozen projection ``P``
   (OlmoEarth's "linear, invariant token embeddings"): a copy of the encoder's tokenizer as
   randomly initialised when the objective is built, never updated. For the spectral,
   ``dofa`` and ``channel_groups`` tokenizers P is linear in the pixels, so it is defined for
   any band set exactly as the tokenizer is; for ``spectral_adapter`` (a small 3-D conv
   network) it is a fixed random non-linear map. It is held outside the module tree (the
   optimiser never sees it) and saved in the checkpoint through the module's extra state.
3. The learned encoder ``f`` sees the input tokens; a small decoder ``g`` (a transformer over
   the encoded input and one query per target: mask token + the target's position + a code of
   its group's mean wavelength) predicts ``y_hat_j``.
4. Patch discrimination, per sample and per group, with cosine similarities at
   temperature tau:
   ``L_patch = mean_j -log( exp(<y_hat_j, y_j>/tau) / sum_{k in group(j)} exp(<y_hat_j, y_k>/tau) )``
   over the target tokens j, k of that sample.

With pooled encoder outputs ``z_1, z_2`` of the two views (mean of the input tokens through a
projection head, unit length), the instance contrastive loss ``L_instance`` is the symmetric InfoNCE
with negatives from every rank (``contrastive.symmetric_info_nce``), and
``loss = (L_patch(view 1) + L_patch(view 2)) / 2 + contrast_weight * L_instance``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from eoforge.models.pos_embed import sincos_1d
from eoforge.models.vit import SpectralViT
from eoforge.pretrain.contrastive import (
    EXCLUDED_LOGIT,
    MomentumCopy,
    ProjectionHead,
    embedding_health,
    symmetric_info_nce,
)
from eoforge.pretrain.jepa import Predictor
from eoforge.pretrain.views import present_mask, single_date_views


def assign_roles(
    group: torch.Tensor, present: torch.Tensor, encode_ratio: float, target_ratio: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Modality-aware masking: token indices of the encoder's input and of the targets.

    Args:
        group: [L] group of each token.
        present: bool [B, L], False for tokens of a sensor the sample lacks (never assigned).
        encode_ratio, target_ratio: shares of the present tokens of the sample with the fewest.

    Returns:
        inputs [B, K] and targets [B, T], disjoint, each ascending.
    """
    b, length = present.shape
    available = int(present.sum(dim=1).min())
    n_in = max(1, round(available * encode_ratio))
    n_target = max(1, min(available - n_in, round(available * target_ratio)))
    # A random rank per group and sample; the noise orders the tokens within a group.
    rank = torch.rand(b, int(group.max()) + 1, device=present.device).argsort(dim=1)[:, group]
    noise = torch.rand(b, length, device=present.device)  # [B, L]
    absent = (~present).float() * 1e4
    inputs = (rank + noise + absent).argsort(dim=1)[:, :n_in]  # lowest ranks first
    taken = torch.zeros_like(present).scatter_(1, inputs, True)
    score = -rank + noise + absent + taken.float() * 1e4  # highest ranks first, inputs last
    targets = score.argsort(dim=1)[:, :n_target]
    return inputs.sort(dim=1).values, targets.sort(dim=1).values


def group_wavelengths(
    tokenizer: nn.Module, band_ids: Sequence[str], wavelengths: torch.Tensor
) -> torch.Tensor:
    """[G] mean wavelength (nm) of each group the tokenizer made: its band groups, or all bands."""
    row = wavelengths if wavelengths.dim() == 1 else wavelengths[0]  # [C]
    plan = getattr(tokenizer, "plan", None)
    if plan is None:
        return row.float().mean()[None]
    return torch.stack([row[index].float().mean() for _, index in plan(band_ids, row.device)])


def group_code(mean_nm: torch.Tensor, dim: int) -> torch.Tensor:
    """[G] wavelengths -> [G, D] sincos codes of log2(nm), 0.1 octave apart per unit angle, so
    the decoder's queries tell sensors and band groups at the same position apart."""
    return sincos_1d(10 * torch.log2(mean_nm.double()), dim).float()


class LatentMIM(nn.Module):
    """Latent MIM Lite over the shared encoder (module docstring).

    Args:
        encoder: a SpectralViT (any tokenizer).
        encode_ratio: share of the tokens the encoder sees (eoforge's default 0.25, MAE's).
        target_ratio: share of the tokens that are targets.
        decoder_dim, decoder_depth, decoder_heads: decoder size.
        temperature: tau of the patch discrimination.
        proj_dim: width of the instance embedding.
        contrast_temperature: temperature of the instance contrastive loss.
        contrast_weight: weight of the instance contrastive loss.
    """

    name = "latent_mim"

    def __init__(
        self,
        encoder: nn.Module,
        encode_ratio: float = 0.25,
        target_ratio: float = 0.5,
        decoder_dim: int = 256,
        decoder_depth: int = 4,
        decoder_heads: int = 8,
        temperature: float = 0.1,
        proj_dim: int = 128,
        contrast_temperature: float = 0.1,
        contrast_weight: float = 0.1,
    ):
        super().__init__()
        if not isinstance(encoder, SpectralViT):
            raise ValueError(
                "latent_mim masks and encodes patch tokens; build a ViT encoder (vit_*)"
            )
        for option, value, ok in (
            ("encode_ratio", encode_ratio, 0 < encode_ratio < 1),
            ("target_ratio", target_ratio, 0 < target_ratio <= 1 - encode_ratio),
            ("temperature", temperature, temperature > 0),
            ("contrast_temperature", contrast_temperature, contrast_temperature > 0),
            ("contrast_weight", contrast_weight, contrast_weight >= 0),
        ):
            if not ok:
                raise ValueError(
                    f"{option}={value}: out of range (see LatentMIM; encode_ratio + "
                    "target_ratio <= 1)"
                )
        self.encoder = encoder
        self.encode_ratio = encode_ratio
        self.target_ratio = target_ratio
        self.temperature = temperature
        self.contrast_weight = contrast_weight
        self.decoder = Predictor(encoder.embed_dim, decoder_dim, decoder_depth, decoder_heads)
        self.head = ProjectionHead(encoder.embed_dim, proj_dim)
        self.contrast_scale = 1 / contrast_temperature
        # The frozen projection: a copy of the tokenizer as initialised, never updated.
        self._projection = MomentumCopy({"tokenizer": encoder.patch_embed})

    @property
    def target_projection(self) -> nn.Module:
        """The frozen random projection P (not a submodule)."""
        return self._projection.module["tokenizer"]

    def get_extra_state(self) -> dict:
        return {"target_projection": self._projection.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        self._projection.load_state_dict(state["target_projection"])

    def forward(self, batch: dict, preview: bool = False) -> dict:
        """{"loss", "loss/patch", "loss/instance", "collapse/std", "collapse/mean_cosine"}
        (``contrastive.embedding_health`` of the first view's instance embeddings);
        ``preview`` returns ``{}`` (targets are latent: nothing to show as an image)."""
        if preview:
            return {}
        tokens, targets, queries, group, present = self.tokens(batch)
        patch, pooled = [], []
        for _ in range(2):  # two masked views of the same samples
            loss, z = self.view(tokens, targets, queries, group, present)
            patch.append(loss)
            pooled.append(z)
        paired = present.any(dim=1)  # [B]
        z_1, z_2 = self.head(pooled[0]), self.head(pooled[1])  # [B, E] each
        instance = symmetric_info_nce(z_1, z_2, self.contrast_scale, paired)
        patch_loss = torch.stack(patch).mean()
        return {
            "loss": patch_loss + self.contrast_weight * instance,
            "loss/patch": patch_loss.detach(),
            "loss/instance": instance.detach(),
            **embedding_health(z_1[paired]),
        }

    def tokens(self, batch: dict) -> tuple[torch.Tensor, ...]:
        """Every single-date sensor view's tokens, in one sequence per sample.

        Returns:
            tokens [B, L, D] with positions, targets [B, L, D] (frozen projection, no
            gradient), queries [L, D] (position + group code of each token), group [L],
            present bool [B, L].
        """
        enc = self.encoder
        parts, groups_seen = [], 0
        for _, view in single_date_views(batch, self.name):
            images, band_ids, wavelengths = view["image"], view["band_ids"], view["wavelengths"]
            grid = enc.grid(images)
            patches = grid[0] * grid[1]
            tokens = enc.tokenize(images, band_ids, wavelengths, view.get("gsd"), view.get("time"))
            positions = enc.patch_embed.positions(*grid, tokens)  # [L_s, D]
            with torch.no_grad():
                projection = self._projection.on(images.device)["tokenizer"]
                targets = projection(images, band_ids, wavelengths).float()  # [B, L_s, D]
            mean_nm = group_wavelengths(enc.patch_embed, band_ids, wavelengths)  # [G_s]
            code = group_code(mean_nm, enc.embed_dim)  # [G_s, D]
            n_groups = tokens.shape[1] // patches
            group = torch.arange(n_groups, device=tokens.device).repeat_interleave(patches)
            present = present_mask(view)[:, None].expand(-1, tokens.shape[1])  # [B, L_s]
            queries = positions + code.to(positions)[group]  # [L_s, D]
            parts.append((tokens, targets, queries, group + groups_seen, present))
            groups_seen += n_groups
        tokens, targets, queries, group, present = zip(*parts, strict=True)
        return (
            torch.cat(tokens, dim=1),  # [B, L, D]
            torch.cat(targets, dim=1),  # [B, L, D]
            torch.cat(queries),  # [L, D]
            torch.cat(group),  # [L]
            torch.cat(present, dim=1),  # [B, L]
        )

    def view(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor,
        queries: torch.Tensor,
        group: torch.Tensor,
        present: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One masked view -> (patch discrimination loss, pooled encoder output [B, D])."""
        inputs, target_index = assign_roles(group, present, self.encode_ratio, self.target_ratio)
        latent = self.encoder.encode(tokens, inputs)  # [B, 1 + K, D]
        pred = self.decoder(latent, queries[target_index])  # [B, T, D]
        dim = targets.shape[-1]
        y = torch.gather(targets, 1, target_index[..., None].expand(-1, -1, dim))  # [B, T, D]
        loss = patch_discrimination(
            pred, y, group[target_index], torch.gather(present, 1, target_index), self.temperature
        )
        return loss, latent[:, 1:].mean(dim=1)


def patch_discrimination(
    pred: torch.Tensor,
    target: torch.Tensor,
    group: torch.Tensor,
    present: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """OlmoEarth's patch discrimination: per sample, each prediction picks its own target out of
    the targets of its group (InfoNCE on cosines at ``temperature``).

    Args:
        pred, target: [B, T, D] predictions and targets of the target tokens.
        group: [B, T] group of each target token.
        present: bool [B, T]; absent tokens are neither rows nor columns.

    Returns:
        the mean over present target tokens.
    """
    pred, target = F.normalize(pred.float(), dim=-1), F.normalize(target.float(), dim=-1)
    logits = pred @ target.transpose(1, 2) / temperature  # [B, T, T]
    same = (group[:, :, None] == group[:, None, :]) & present[:, None, :]  # [B, T, T]
    logits = logits.masked_fill(~same, EXCLUDED_LOGIT)
    per_token = torch.logsumexp(logits, dim=-1) - logits.diagonal(dim1=1, dim2=2)  # [B, T]
    weight = present.float()
    return (per_token * weight).sum() / weight.sum().clamp_min(1.0)
