"""Cross-sensor contrastive learning with joint masked reconstruction (CROMA; SPECS O5).

Per step, optical and radar views of the same co-registered scenes share one random 75% mask.
Each masked view goes through the shared encoder; its pooled patch tokens give an embedding
``z = normalize(Linear(LN-MLP(GAP)))`` per modality, and the two are aligned by the symmetric
InfoNCE ``(CE(s z_o z_r^T) + CE(s z_r z_o^T)) / 2`` with negatives gathered from every rank.
A cross encoder lets the optical tokens attend to the radar tokens, and one MAE decoder
reconstructs both modalities' masked patches from that joint representation (per-band norm-pix
MSE over valid pixels, as MAE's). ``loss = L_con + MSE_opt + MSE_rad``.
"""

from __future__ import annotations

import torch
from torch import nn

from eoforge.models.attention import Attention, attention
from eoforge.models.spectral import unpatchify
from eoforge.pretrain.contrastive import (
    LogitScale,
    ProjectionHead,
    embedding_health,
    pool,
    symmetric_info_nce,
)
from eoforge.pretrain.mae import MAE, norm_pix, patch_targets, random_masking
from eoforge.pretrain.views import present_mask, valid_mask

# Optical bands are given in nm up to thermal infrared; SAR bands carry the radar wavelength
# (5.547e7 nm for C-band). Anything at or above this is radar.
RADAR_MIN_NM = 1e5


class CrossAttention(nn.Module):
    """Multi-head attention of queries [B, L, D] to a context [B, M, D]."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, length, dim = x.shape
        d = dim // self.num_heads
        q = self.q(x).reshape(b, length, self.num_heads, d).transpose(1, 2)  # [B, H, L, d]
        kv = self.kv(context).reshape(b, context.shape[1], 2, self.num_heads, d)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, M, d]
        out = attention(q, k, v)  # [B, H, L, d]
        return self.proj(out.transpose(1, 2).reshape(b, length, dim))


class CrossBlock(nn.Module):
    """Pre-norm block of CROMA's cross encoder: self-attention, cross-attention, MLP.

    ``gate`` [B] scales the cross-attention per sample: 0 where the context (radar) is absent,
    so such a sample's joint tokens are its optical tokens alone.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.norm_context = nn.LayerNorm(dim, eps=1e-6)
        self.cross = CrossAttention(dim, num_heads)
        self.norm3 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        cross = self.cross(self.norm2(x), self.norm_context(context))  # [B, L, D]
        x = x + gate.to(x.dtype)[:, None, None] * cross
        return x + self.mlp(self.norm3(x))


class CROMA(MAE):
    """CROMA over one shared spectrum-aware encoder (SPECS O5).

    The batch holds co-registered views of one optical sensor (every wavelength < 1e5 nm) and
    one radar sensor (every band at the radar wavelength), with the same B, H and W; roles are
    told by the bands' wavelengths, not by sensor names.

    Deviation from CROMA, which trains two separate unimodal encoders: eoforge composes
    objectives over ONE shared encoder, and the spectrum-aware tokenizer (T1) embeds optical
    and SAR bands alike, so both modalities go through that encoder. The objective owns
    everything else: the two projection heads, the logit scale, the cross encoder (radar ->
    optical cross-attention blocks) and the MAE decoder with its per-range reconstruction heads.

    Missing modalities (``view["present"]`` False): such samples are left out of the
    contrastive pairs (their logit rows and columns masked) and out of that modality's MAE
    term; their tokens are zeroed before the encoder and a missing radar view is gated out of
    the cross encoder, so nothing is ever paired with, or learnt from, the zero-filled image.
    A batch with no complete pair has a contrastive term of 0 (still in the graph).

    Args:
        encoder: a SpectralViT with the spectral tokenizer (``tokenizer="spectral"``).
        mask_ratio: fraction of patches hidden, the same patches in both modalities.
        decoder_dim, decoder_depth, decoder_heads: the joint MAE decoder (CROMA uses 1 block).
        cross_depth, cross_heads: the cross encoder.
        proj_dim: width of the contrastive embeddings.
        norm_pix: per-patch, per-band normalised reconstruction targets.
    """

    name = "croma"

    def __init__(
        self,
        encoder: nn.Module,
        mask_ratio: float = 0.75,
        decoder_dim: int = 512,
        decoder_depth: int = 1,
        decoder_heads: int = 16,
        cross_depth: int = 2,
        cross_heads: int | None = None,
        proj_dim: int = 512,
        norm_pix: bool = True,
    ):
        super().__init__(encoder, mask_ratio, decoder_dim, decoder_depth, decoder_heads, norm_pix)
        dim = encoder.embed_dim
        cross_heads = cross_heads or encoder.num_heads
        if cross_depth < 1:
            raise ValueError(f"cross_depth={cross_depth}: CROMA needs at least one cross block")
        if dim % cross_heads:
            raise ValueError(f"cross_heads={cross_heads}: must divide the encoder width {dim}")
        if proj_dim < 1:
            raise ValueError(f"proj_dim={proj_dim}: must be >= 1")
        self.cross_blocks = nn.ModuleList(CrossBlock(dim, cross_heads) for _ in range(cross_depth))
        self.cross_norm = nn.LayerNorm(dim, eps=1e-6)
        self.optical_head = ProjectionHead(dim, proj_dim)
        self.radar_head = ProjectionHead(dim, proj_dim)
        self.logit_scale = LogitScale()
        self._roles: dict[tuple[str, ...], str] = {}  # band set -> "optical" | "radar"

    def forward(self, batch: dict, preview: bool = False) -> dict:
        """{"loss", "loss/contrastive", "loss/optical", "loss/radar", "logit_scale"} and the
        collapse statistics of both embeddings (``contrastive.embedding_health``)."""
        if preview:
            return self.preview(batch)
        terms = self.losses(batch)
        loss = terms["contrastive"] + terms["optical"] + terms["radar"]
        out = {"loss": loss}
        out.update({f"loss/{k}": terms[k].detach() for k in ("contrastive", "optical", "radar")})
        out["logit_scale"] = terms["logit_scale"].detach()
        for side in ("optical", "radar"):
            health = embedding_health(terms[f"z_{side}"][terms["paired"]])
            out.update({f"{key}_{side}": value for key, value in health.items()})
        return out

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """The three loss terms (with graph), the logit scale, both embeddings z_optical and
        z_radar [B, E] and which samples are paired [B]."""
        (_, optical), (_, radar) = self.modalities(batch)
        res = self.joint_pass(optical, radar)
        scale = self.logit_scale()
        paired = res["present_o"] & res["present_r"]  # [B]
        z_o = self.optical_head(pool(res["latent_o"]))  # [B, E]
        z_r = self.radar_head(pool(res["latent_r"]))  # [B, E]
        return {
            "contrastive": symmetric_info_nce(z_o, z_r, scale, paired),
            "optical": self.loss(optical["image"], res["valid_o"], res["pred_o"], res["mask"]),
            "radar": self.loss(radar["image"], res["valid_r"], res["pred_r"], res["mask"]),
            "logit_scale": scale,
            "z_optical": z_o,
            "z_radar": z_r,
            "paired": paired,
        }

    def joint_pass(self, optical: dict, radar: dict) -> dict[str, torch.Tensor]:
        """Shared mask, unimodal encodings, cross encoder and decoder for both views."""
        enc = self.encoder
        present_o, present_r = present_mask(optical), present_mask(radar)
        tokens_o = self._tokens(optical, present_o)  # [B, N, D]
        tokens_r = self._tokens(radar, present_r)  # [B, N, D]
        batch, length, _ = tokens_o.shape
        keep, mask = random_masking(batch, length, self.mask_ratio, tokens_o.device)
        latent_o = enc.encode(tokens_o, keep)  # [B, 1 + K, D]
        latent_r = enc.encode(tokens_r, keep)  # [B, 1 + K, D]
        joint = latent_o
        for block in self.cross_blocks:
            joint = block(joint, latent_r, present_r)
        z = self.decode(self.cross_norm(joint), keep, enc.grid(optical["image"]))  # [B, N, Dd]
        return {
            "present_o": present_o,
            "present_r": present_r,
            "latent_o": latent_o,
            "latent_r": latent_r,
            "mask": mask,
            "pred_o": self.head(z, optical["band_ids"], optical["wavelengths"]),  # [B, C, N, p*p]
            "pred_r": self.head(z, radar["band_ids"], radar["wavelengths"]),  # [B, C', N, p*p]
            "valid_o": valid_mask(optical),
            "valid_r": valid_mask(radar),
        }

    def _tokens(self, view: dict, present: torch.Tensor) -> torch.Tensor:
        """Tokens [B, N, D] of a view, zero for samples without it (``where``: NaN-safe)."""
        tokens = self.tokenize(view)
        return torch.where(present[:, None, None], tokens, torch.zeros_like(tokens))

    def modalities(self, batch: dict) -> tuple[tuple[str, dict], tuple[str, dict]]:
        """((optical sensor, view), (radar sensor, view)); errors name the sensors at fault."""
        found: dict[str, list[tuple[str, dict]]] = {"optical": [], "radar": []}
        for sensor, view in batch.items():
            if sensor == "meta":
                continue
            found[self._role(sensor, view)].append((sensor, view))
        if len(found["optical"]) != 1 or len(found["radar"]) != 1:
            names = {role: [s for s, _ in views] for role, views in found.items()}
            raise ValueError(
                f"croma needs exactly one optical and one radar view per batch; got optical "
                f"{names['optical']} and radar {names['radar']}"
            )
        (o_name, optical), (r_name, radar) = found["optical"][0], found["radar"][0]
        if optical["image"].dim() != 4 or radar["image"].dim() != 4:
            raise ValueError(f"croma needs single-date views [B, C, H, W] of {o_name}, {r_name}")
        if optical["image"].shape[-2:] != radar["image"].shape[-2:]:
            raise ValueError(
                f"croma needs co-registered views: {o_name} is "
                f"{tuple(optical['image'].shape[-2:])} but {r_name} is "
                f"{tuple(radar['image'].shape[-2:])} pixels"
            )
        return found["optical"][0], found["radar"][0]

    def _role(self, sensor: str, view: dict) -> str:
        """ "optical" or "radar" from the wavelengths, read once per band set (a host copy)."""
        key = tuple(view["band_ids"])
        if key not in self._roles:
            wavelengths = view["wavelengths"]  # [C] or [B, C]; every row names the same bands
            row = wavelengths if wavelengths.dim() == 1 else wavelengths[0]
            kinds = set((row >= RADAR_MIN_NM).tolist())
            if len(kinds) != 1:
                raise ValueError(
                    f"sensor {sensor!r} mixes optical and radar bands ({list(key)}); croma "
                    "needs one view per modality"
                )
            self._roles[key] = "radar" if kinds.pop() else "optical"
        return self._roles[key]

    @torch.no_grad()
    def preview(self, batch: dict, max_images: int = 4) -> dict[str, dict[str, torch.Tensor]]:
        """Joint reconstructions of both views: {sensor: {"input", "masked", "reconstruction",
        "band_ids", "wavelengths"}}, each image [b, C, H, W] in normalised units."""
        (o_name, optical), (r_name, radar) = self.modalities(batch)
        optical, radar = _head(optical, max_images), _head(radar, max_images)
        res = self.joint_pass(optical, radar)
        p = self.encoder.patch_size
        out = {}
        for sensor, view, pred in (
            (o_name, optical, res["pred_o"]),
            (r_name, radar, res["pred_r"]),
        ):
            images = view["image"]
            target, pixel_valid = patch_targets(images, valid_mask(view), p)  # [b, C, N, p*p]
            if self.norm_pix:  # undo the per-patch normalisation of the targets
                mean, std = norm_pix(target, pixel_valid)
                pred = pred.float() * std + mean
            masked = res["mask"][:, None, :, None]  # [b, 1, N, 1]
            grid_h = images.shape[-2] // p
            out[sensor] = {
                "input": images,
                "masked": unpatchify(target * (1 - masked), p, grid_h),
                "reconstruction": unpatchify(pred * masked + target * (1 - masked), p, grid_h),
                "band_ids": view["band_ids"],
                "wavelengths": view["wavelengths"],
            }
        return out


def _head(view: dict, n: int) -> dict:
    """The first ``n`` samples of a view."""
    return {k: (v[:n] if torch.is_tensor(v) else v) for k, v in view.items()}
