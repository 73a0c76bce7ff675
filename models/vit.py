"""Vision Transformer encoder over spectrum-aware tokens.

Encoder protocol used by every objective:
  ``tokenize(images, band_ids, wavelengths) -> [B, N, D]`` patch tokens with positions added,
  ``encode(tokens, keep=None) -> [B, 1 + K, D]`` cls token + the kept tokens through the blocks,
  ``forward_features(images, band_ids, wavelengths) -> [B, 1 + N, D]`` both, nothing masked.
Objectives mask between ``tokenize`` and ``encode``. Blocks are pre-norm blocks with timm's
parameter layout (see ``eoforge.models.timm_interop``), attention through SDPA or flash-attn.

The tokenizer is chosen by name (``tokenizer=``): every tokenizer maps
``(images [B, C, H, W], band_ids, wavelengths)`` to tokens [B, L, D] without positions and
supplies its own position encodings through ``positions(grid_h, grid_w, like)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from eoforge.models.attention import Block
from eoforge.models.channel_groups import ChannelGroupPatchEmbed
from eoforge.models.dofa import DynamicPatchEmbed
from eoforge.models.pos_embed import patch_grid
from eoforge.models.registry import check_options, register_model, unknown_choice
from eoforge.models.sincos import sincos_2d_gsd, sincos_2d_temporal
from eoforge.models.spectral import SpectrumAwarePatchEmbed
from eoforge.models.spectral_adapter import SpectralAdapterPatchEmbed

TOKENIZERS = {
    "spectral": SpectrumAwarePatchEmbed,  # SPECS T1 (SMARTIES)
    "dofa": DynamicPatchEmbed,  # SPECS T2 (wavelength hypernetwork)
    "channel_groups": ChannelGroupPatchEmbed,  # SPECS T3 (SatMAE)
    "spectral_adapter": SpectralAdapterPatchEmbed,  # SPECS T4 (SpectralEarth)
}


def build_tokenizer(name: str, patch_size: int, embed_dim: int, **kwargs) -> nn.Module:
    """The tokenizer registered as ``name`` (see ``TOKENIZERS``)."""
    if name not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; known tokenizers: {sorted(TOKENIZERS)}")
    return TOKENIZERS[name](patch_size=patch_size, embed_dim=embed_dim, **kwargs)


class SpectralViT(nn.Module):
    """ViT with the spectrum-aware tokenizer (SPECS T1) and fixed 2-D sincos positions.

    Args:
        patch_size: side of a square patch in pixels.
        embed_dim, depth, num_heads, mlp_ratio: transformer size.
        tokenizer: ``"spectral"`` (T1), ``"dofa"`` (T2), ``"channel_groups"`` (T3) or
            ``"spectral_adapter"`` (T4).
        tokenizer_kwargs: options of that tokenizer (e.g. ``ranges``, ``band_scale``).
        attn_backend: ``"sdpa"`` or ``"flash_attn"`` (see ``eoforge.models.attention``).
        gsd_reference: if set, positions follow Scale-MAE: scaled by ``gsd / gsd_reference``
            (metres) whenever a batch carries its GSD.
        temporal: if set, positions follow SatMAE: [2-D sincos || year, month, hour code]
            whenever a batch carries acquisition times.
        grad_checkpointing: recompute block activations in backward to save memory.
    """

    def __init__(
        self,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        tokenizer: str = "spectral",
        tokenizer_kwargs: dict | None = None,
        attn_backend: str = "sdpa",
        gsd_reference: float | None = None,
        temporal: bool = False,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.grad_checkpointing = grad_checkpointing
        self.gsd_reference = gsd_reference
        self.temporal = temporal
        self.cls_token = LearnedToken(embed_dim)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, backend=attn_backend)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.apply(init_weights)
        # Built after the trunk's init so each tokenizer keeps its own initialisation.
        self.patch_embed = build_tokenizer(
            tokenizer, patch_size, embed_dim, **(tokenizer_kwargs or {})
        )

    @staticmethod
    def check_options(kwargs: dict, key: str) -> None:
        """The tokenizer's name and options in ``kwargs`` are known (``check_model`` calls this
        before anything is built).

        Raises:
            ValueError: naming ``key.tokenizer`` or ``key.tokenizer_kwargs.<option>``.
        """
        name = kwargs.get("tokenizer", "spectral")
        if name not in TOKENIZERS:
            raise unknown_choice(f"{key}.tokenizer", name, TOKENIZERS, "tokenizer")
        options = kwargs.get("tokenizer_kwargs") or {}
        fixed = ("patch_size", "embed_dim")  # the ViT passes its own
        check_options(TOKENIZERS[name], options, f"{key}.tokenizer_kwargs", fixed)

    def grid(self, images: torch.Tensor) -> tuple[int, int]:
        """Patch grid (rows, cols) of an image batch; sides must be multiples of the patch."""
        return patch_grid(images, self.patch_size)

    def tokenize(
        self,
        images: torch.Tensor,
        band_ids: Sequence[str],
        wavelengths: torch.Tensor,
        gsd: torch.Tensor | None = None,
        time: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """images [B, C, H, W] (+ gsd [B] m, time [B] unix s) -> tokens with positions [B, L, D]."""
        tokens = self.patch_embed(images, band_ids, wavelengths)  # [B, L, D]
        grid = self.grid(images)
        if self.temporal and time is not None:
            return tokens + sincos_2d_temporal(*grid, self.embed_dim, time, tokens)
        if self.gsd_reference is not None and gsd is not None:
            if self.patch_embed.tokens_per_patch != 1:
                raise ValueError("GSD-scaled positions need one token per patch")
            return tokens + sincos_2d_gsd(*grid, self.embed_dim, gsd, self.gsd_reference, tokens)
        return tokens + self.patch_embed.positions(*grid, tokens)

    def encode(self, tokens: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, N, D], keep [B, K] indices or None -> features [B, 1 + K, D]."""
        if keep is not None:
            tokens = torch.gather(tokens, 1, keep[..., None].expand(-1, -1, tokens.shape[-1]))
        x = torch.cat([self.cls_token(tokens), tokens], dim=1)
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x)

    def forward_features(
        self,
        images: torch.Tensor,
        band_ids: Sequence[str],
        wavelengths: torch.Tensor,
        gsd: torch.Tensor | None = None,
        time: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """images [B, C, H, W] -> features [B, 1 + L, D] (cls first)."""
        return self.encode(self.tokenize(images, band_ids, wavelengths, gsd, time))

    def forward(self, images, band_ids, wavelengths, gsd=None, time=None):
        return self.forward_features(images, band_ids, wavelengths, gsd, time)


class LearnedToken(nn.Module):
    """A learned [1, 1, D] token (cls, mask) as its own module.

    Under ZeRO-3 a parameter is gathered only inside its owner's forward; objectives call the
    encoder's methods rather than its forward, so the token owns its forward.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.token, std=0.02)

    def forward(self, like: torch.Tensor, length: int = 1) -> torch.Tensor:
        """[B, length, D] copies of the token in ``like``'s dtype."""
        return self.token.to(like.dtype).expand(like.shape[0], length, -1)


def init_weights(module: nn.Module) -> None:
    """Transformer init (``module.apply``): Xavier-uniform linear weights, zero biases, unit norms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _vit(defaults: dict, kwargs: dict) -> SpectralViT:
    return SpectralViT(**{**defaults, **kwargs})


@register_model
def vit_test_patch8(**kwargs) -> SpectralViT:
    """A tiny ViT for tests and the CPU demo (D=64, 2 blocks)."""
    return _vit(dict(patch_size=8, embed_dim=64, depth=2, num_heads=4), kwargs)


@register_model
def vit_tiny_patch16(**kwargs) -> SpectralViT:
    return _vit(dict(patch_size=16, embed_dim=192, depth=12, num_heads=3), kwargs)


@register_model
def vit_small_patch16(**kwargs) -> SpectralViT:
    return _vit(dict(patch_size=16, embed_dim=384, depth=12, num_heads=6), kwargs)


@register_model
def vit_base_patch16(**kwargs) -> SpectralViT:
    return _vit(dict(patch_size=16, embed_dim=768, depth=12, num_heads=12), kwargs)


@register_model
def vit_large_patch16(**kwargs) -> SpectralViT:
    return _vit(dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16), kwargs)


@register_model
def vit_huge_patch14(**kwargs) -> SpectralViT:
    return _vit(dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16), kwargs)
