"""Multi-head self-attention with selectable kernels, and the pre-norm transformer block.

Backends:
  ``"sdpa"`` (default) — ``torch.nn.functional.scaled_dot_product_attention``; PyTorch picks its
      flash, memory-efficient or math kernel. An ``attn_mask`` (e.g. block-diagonal for packed
      sequences) goes to SDPA as is.
  ``"flash_attn"`` — the ``flash-attn`` package (``pip install eoforge[gpu]``) on CUDA in
      bf16/fp16, through ``flash_attn_func`` on unmasked batches; elsewhere, or with a mask,
      the call falls back to SDPA (flash-attn takes no arbitrary masks, and eoforge has no
      varlen path for packed sequences). UNTESTED: the package cannot be built on the machines
      eoforge is developed and tested on (no CUDA toolkit), so this backend has never run; SDPA,
      whose flash kernel the GPU tests check, is the default and the recommended choice.
Parameter names (``qkv``, ``proj``, ``norm1``, ``mlp.fc1`` ...) follow timm's ViT blocks, so
state dicts map one to one onto ``timm``'s ``vit_*`` models.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

BACKENDS = ("sdpa", "flash_attn")


def flash_attn_available() -> bool:
    """True where the flash-attn package is importable (it needs CUDA to build)."""
    return importlib.util.find_spec("flash_attn") is not None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    backend: str = "sdpa",
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention; q, k, v [B, H, L, d] -> [B, H, L, d]."""
    if (
        backend == "flash_attn"
        and attn_mask is None
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
    ):
        from flash_attn import flash_attn_func

        # flash-attn wants [B, L, H, d].
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


class Attention(nn.Module):
    """Multi-head self-attention (timm parameter layout: ``qkv``, ``proj``)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, backend: str = "sdpa"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        if backend not in BACKENDS:
            raise ValueError(f"attention backend {backend!r}: use one of {BACKENDS}")
        self.num_heads = num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, dim = x.shape
        qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, L, d]
        out = attention(q, k, v, self.backend, attn_mask)  # [B, H, L, d]
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        backend: str = "sdpa",
        eps: float = 1e-6,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias, backend)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), attn_mask)
        return x + self.mlp(self.norm2(x))
