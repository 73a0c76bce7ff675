"""Attention backends: SDPA by default, masked SDPA for packed sequences, flash-attn when present."""

from __future__ import annotations

import pytest
import torch

from eoforge.models import create_model
from eoforge.models.attention import attention, flash_attn_available

CUDA = torch.cuda.is_available()


def _qkv(b=2, h=4, length=10, d=16, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(b, h, length, d, generator=g).to(device, dtype) for _ in range(3)]


def test_sdpa_equals_explicit_softmax_attention():
    q, k, v = _qkv()
    explicit = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v
    torch.testing.assert_close(attention(q, k, v), explicit, rtol=1e-5, atol=1e-5)


def test_block_diagonal_mask_equals_separate_sequences():
    """Two sequences packed into one row attend only within themselves."""
    q, k, v = _qkv(b=1, length=10)
    lengths = (4, 6)
    seq = torch.repeat_interleave(torch.arange(2), torch.tensor(lengths))
    mask = seq[:, None] == seq[None, :]  # [L, L] True where attention is allowed
    packed = attention(q, k, v, attn_mask=mask)
    start = 0
    for n in lengths:
        part = slice(start, start + n)
        alone = attention(q[:, :, part], k[:, :, part], v[:, :, part])
        torch.testing.assert_close(packed[:, :, part], alone, rtol=1e-5, atol=1e-5)
        start += n


def test_flash_attn_backend_falls_back_to_sdpa_off_gpu():
    torch.manual_seed(0)
    sdpa = create_model("vit_test_patch8").eval()
    flash = create_model("vit_test_patch8", attn_backend="flash_attn").eval()
    flash.load_state_dict(sdpa.state_dict())
    tokens = torch.randn(2, 9, 64)
    torch.testing.assert_close(flash.encode(tokens), sdpa.encode(tokens))
    with pytest.raises(ValueError, match="backend"):
        create_model("vit_test_patch8", attn_backend="xformers")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.skipif(
    not flash_attn_available(), reason="flash-attn is not installed (it builds only with CUDA)"
)
def test_flash_attn_agrees_with_sdpa_in_bf16():
    q, k, v = _qkv(b=4, h=12, length=197, d=64, device="cuda", dtype=torch.bfloat16)
    ref = attention(q, k, v, "sdpa").float()
    torch.testing.assert_close(attention(q, k, v, "flash_attn").float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_sdpa_kernels_agree_on_gpu():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = _qkv(b=4, h=12, length=197, d=64, device="cuda", dtype=torch.bfloat16)
    outs = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
        with sdpa_kernel(backend):
            outs[backend] = attention(q, k, v).float()
    for out in outs.values():
        torch.testing.assert_close(out, outs[SDPBackend.MATH], rtol=2e-2, atol=2e-2)
