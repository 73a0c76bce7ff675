"""LESS ViT: low-rank spatial-spectral attention over one token per band and patch (SPECS T4).

Every band of every patch is a token, so a hyperspectral cube of C bands and N patches gives
[B, C, N, D]. Full attention over those C*N tokens costs O((CN)^2 D); LESS factorises it into a
spectral attention over C+1 channel summaries and a spatial attention over N+1 position summaries,
recombined per head by a Kronecker product, for O(r(C^2 d_c + N^2 d_s)).

Token layout inside the encoder, [B, C+1, N+1, D]:
  * ``x[:, 1:, 1:]`` the patch tokens, one per (band c, patch n);
  * ``x[:, 0, 1:]`` the cls channel (row 0): entry n summarises all bands at patch n;
  * ``x[:, 1:, 0]`` the cls position (column 0): entry c summarises band c over all patches;
  * ``x[:, 0, 0]`` the global cls, which reaches every token through both branches.

Band identity comes only from the centre wavelength, through the continuous positional-channel
embedding ``E(c, n) = (PE_2D(pos_n) + PE_1D(lambda_c)) / 2``: any subset and order of bands works,
and permuting bands permutes the per-band outputs the same way.

Invalid pixels (nodata): the tokenizer zeroes them before projecting, and a (band, patch) token
whose patch holds no valid pixel is invisible to every other token: it is left out of both
attention poolings; a band with no valid patch (e.g. EnMAP's water-vapour bands) is left out of
the spectral attention's keys and of the pooling over bands, and a patch with no valid band out
of the spatial attention's keys and the pooling over patches. The outputs of all other tokens are
then those of the same cube without the empty bands (up to float rounding). Masked tokens still get an output
(a mix of what the valid tokens say), which objectives should ignore.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import LayerScale, Mlp
from torch import nn
from torch.utils.checkpoint import checkpoint

from eoforge.models.pos_embed import patch_grid, sincos_1d
from eoforge.models.registry import register_model
from eoforge.models.vit import LearnedToken, init_weights

PERCEPTION_RADIUS_M = 640.0


@dataclass
class LessTokens:
    """Tokens of a hyperspectral batch plus what the encoder needs to mask and attend them.

    The encoder's spatial mask needs each patch's ground position and which tokens hold data,
    so these travel with the tokens and are gathered together by ``select``.

    Attributes:
        tokens: [B, C, N, D] patch tokens with E(c, n) added.
        wavelengths: [B, C] centre wavelengths in nm.
        positions: [B, N, 2] patch offsets (row, col) on the ground in metres.
        valid: [B, C, N] True where the band's patch holds at least one valid pixel, or None.
        grid: (grid_h, grid_w) while the patches are the whole grid in row-major order; None
            once patches were selected.
        spacing_m: [B] ground distance between neighbouring patches, with ``grid``.
        min_spacing_m: the smallest of ``spacing_m`` as a Python float (sizes the window without
            reading the device), with ``grid``.
    """

    tokens: torch.Tensor
    wavelengths: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor | None = None
    grid: tuple[int, int] | None = None
    spacing_m: torch.Tensor | None = None
    min_spacing_m: float | None = None

    def select(
        self,
        keep_channels: torch.Tensor | None = None,
        keep_positions: torch.Tensor | None = None,
    ) -> LessTokens:
        """Keep bands keep_channels [B, Kc] and patches keep_positions [B, Kn] (indices)."""
        tokens, wavelengths, positions, valid = (
            self.tokens,
            self.wavelengths,
            self.positions,
            self.valid,
        )
        if keep_channels is not None:
            tokens = _gather(tokens, 1, keep_channels)
            wavelengths = torch.gather(wavelengths, 1, keep_channels)
            valid = None if valid is None else _gather(valid, 1, keep_channels)
        if keep_positions is None:
            grid = (self.grid, self.spacing_m, self.min_spacing_m)
            return LessTokens(tokens, wavelengths, positions, valid, *grid)
        tokens = _gather(tokens, 2, keep_positions)
        positions = _gather(positions, 1, keep_positions)
        valid = None if valid is None else _gather(valid, 2, keep_positions)
        return LessTokens(tokens, wavelengths, positions, valid)


def _gather(x: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """Gather along ``dim`` with a per-sample index [B, K], broadcast over the other dims."""
    shape = [1] * x.ndim
    shape[0], shape[dim] = index.shape
    index = index.reshape(shape).expand(*x.shape[:dim], index.shape[1], *x.shape[dim + 1 :])
    return torch.gather(x, dim, index)


def patch_positions(grid_h: int, grid_w: int, spacing_m: torch.Tensor, device=None) -> torch.Tensor:
    """Ground offsets (row, col) in metres of a grid_h x grid_w patch grid -> [B, N, 2].

    Args:
        spacing_m: [B] ground distance between neighbouring patches (patch size * GSD).
    """
    rows = torch.arange(grid_h, device=device).repeat_interleave(grid_w)  # [N]
    cols = torch.arange(grid_w, device=device).repeat(grid_h)  # [N]
    grid = torch.stack([rows, cols], dim=-1).to(spacing_m.dtype)  # [N, 2]
    return grid[None] * spacing_m[:, None, None]  # [B, N, 2]


def position_embedding(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """PE_2D of ground positions [B, N, 2] in metres -> [B, N, D]: half rows, half columns."""
    if dim % 4:
        raise ValueError(f"embedding dim {dim} must be divisible by 4 for 2-D sincos")
    b, n, _ = positions.shape
    rows = sincos_1d(positions[..., 0].reshape(-1), dim // 2)  # [B*N, D/2]
    cols = sincos_1d(positions[..., 1].reshape(-1), dim // 2)  # [B*N, D/2]
    return torch.cat([rows, cols], dim=1).reshape(b, n, dim)


def channel_embedding(wavelengths: torch.Tensor, dim: int) -> torch.Tensor:
    """PE_1D of centre wavelengths [B, C] in nm -> [B, C, D]."""
    b, c = wavelengths.shape
    return sincos_1d(wavelengths.reshape(-1), dim).reshape(b, c, dim)


def perception_field(positions: torch.Tensor, radius_m: float) -> torch.Tensor:
    """Spatial attention mask [B, N+1, N+1]: True where patches lie within radius_m.

    Index 0 is the cls position, which attends to and is attended by every patch, so each row
    keeps at least one key and the global summary still sees the whole image.
    """
    offsets = positions[:, :, None] - positions[:, None, :]  # [B, N, N, 2]
    near = offsets.square().sum(-1) <= radius_m**2  # [B, N, N]
    return nn.functional.pad(near, (1, 0, 1, 0), value=True)  # [B, N+1, N+1]


@dataclass
class GridField:
    """The perception field of a whole patch grid as window offsets, not an [N+1, N+1] mask.

    Patch n attends the cls position and the patches n + (dy, dx) for the ``offsets`` its sample
    ``allows`` (within the radius at that sample's patch spacing); the cls position attends every
    key. This is ``perception_field`` on the same grid (tests check it), in O(N K) time and memory
    for K offsets instead of O(N^2): spatial attention then grows linearly with the image.

    Attributes:
        grid: (grid_h, grid_w).
        offsets: K (dy, dx) patch offsets, (0, 0) included.
        allowed: [B, K] True where the offset lies within the radius for that sample.
        keys: [B, N+1] key validity (patches holding data), or None for all.
    """

    grid: tuple[int, int]
    offsets: list[tuple[int, int]]
    allowed: torch.Tensor
    keys: torch.Tensor | None = None

    @property
    def reach(self) -> int:
        return max(max(abs(dy), abs(dx)) for dy, dx in self.offsets)


def grid_field(
    grid: tuple[int, int],
    spacing_m: torch.Tensor,
    radius_m: float,
    min_spacing_m: float | None = None,
) -> GridField:
    """The ``GridField`` of a grid_h x grid_w patch grid at patch spacing spacing_m [B] metres.

    ``min_spacing_m`` (the smallest spacing, read from ``spacing_m`` if not given) bounds the
    window; each sample's own spacing decides which offsets it allows.
    """
    grid_h, grid_w = grid
    min_spacing_m = float(spacing_m.min()) if min_spacing_m is None else min_spacing_m
    reach = int(radius_m // min_spacing_m)
    reach_h, reach_w = min(reach, grid_h - 1), min(reach, grid_w - 1)
    offsets = [
        (dy, dx)
        for dy in range(-reach_h, reach_h + 1)
        for dx in range(-reach_w, reach_w + 1)
        if (dy * dy + dx * dx) * min_spacing_m**2 <= radius_m**2
    ]
    steps = torch.tensor(offsets, dtype=spacing_m.dtype, device=spacing_m.device)  # [K, 2]
    # The same arithmetic as perception_field: squared ground distance against radius^2.
    ground = steps[None] * spacing_m[:, None, None]  # [B, K, 2]
    allowed = ground.square().sum(-1) <= radius_m**2  # [B, K]
    return GridField(grid, offsets, allowed)


def grid_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, field: GridField
) -> torch.Tensor:
    """Attention within a ``GridField``, one window offset at a time.

    Args:
        q, k: [B, H, r, N+1, d] (index 0 the cls position, then the patches row-major).
        v: [B, H, 1, N+1, d], shared by the r maps of a head.

    Returns:
        [B, H, r, N+1, d].
    """
    b, heads, rank, _, d = q.shape
    grid_h, grid_w = field.grid
    reach, scale = field.reach, d**-0.5
    keys = field.keys  # [B, N+1] or None
    # The cls query attends every key.
    cls_scores = (q[..., :1, :] @ k.transpose(-1, -2)) * scale  # [B, H, r, 1, N+1]
    if keys is not None:
        cls_scores = cls_scores.masked_fill(~keys[:, None, None, None], float("-inf"))
    cls_out = cls_scores.softmax(-1) @ v  # [B, H, r, 1, d]

    pad = (0, 0, reach, reach, reach, reach)
    qp = q[..., 1:, :].reshape(b, heads, rank, grid_h, grid_w, d)
    kp = F.pad(k[..., 1:, :].reshape(b, heads, rank, grid_h, grid_w, d), pad)
    vp = F.pad(v[..., 1:, :].reshape(b, heads, 1, grid_h, grid_w, d), pad)
    inside = torch.ones(b, grid_h, grid_w, dtype=torch.bool, device=q.device)
    if keys is not None:
        inside = keys[:, 1:].reshape(b, grid_h, grid_w)
    inside = F.pad(inside, (reach, reach, reach, reach), value=False)  # [B, gh+2R, gw+2R]
    windows = [
        (slice(reach + dy, reach + dy + grid_h), slice(reach + dx, reach + dx + grid_w))
        for dy, dx in field.offsets
    ]
    scores = [(qp * k[..., :1, None, :]).sum(-1)]  # the cls key: [B, H, r, gh, gw]
    for i, (rows, cols) in enumerate(windows):
        score = (qp * kp[..., rows, cols, :]).sum(-1)  # [B, H, r, gh, gw]
        near = inside[:, rows, cols] & field.allowed[:, i, None, None]  # [B, gh, gw]
        scores.append(score.masked_fill(~near[:, None, None], float("-inf")))
    weights = (torch.stack(scores, -1) * scale).softmax(-1)  # [B, H, r, gh, gw, K+1]
    out = weights[..., :1] * v[..., :1, None, :]  # [B, H, r, gh, gw, d]
    for i, (rows, cols) in enumerate(windows):
        out = out + weights[..., i + 1, None] * vp[..., rows, cols, :]
    return torch.cat([cls_out, out.reshape(b, heads, rank, grid_h * grid_w, d)], dim=3)


def spatial_field(tokens: LessTokens, radius_m: float | None) -> torch.Tensor | GridField | None:
    """The spatial branch's perception field for ``tokens``: a ``GridField`` on a whole grid
    (O(N K)), the dense [B, N+1, N+1] mask once patches were selected, None without a radius."""
    if radius_m is None:
        return None
    if tokens.grid is not None:
        return grid_field(tokens.grid, tokens.spacing_m, radius_m, tokens.min_spacing_m)
    return perception_field(tokens.positions, radius_m)  # [B, N+1, N+1]


class LessPatchEmbed(nn.Module):
    """Per-band patch embedding: Conv3d(1->2D, (1,p,p), stride (1,p,p)) -> ReLU -> Conv3d(2D->D, 1).

    The same weights embed every band, so band identity must come from the wavelength embedding.
    """

    def __init__(self, patch_size: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        kernel = (1, patch_size, patch_size)
        self.proj = nn.Sequential(
            nn.Conv3d(1, 2 * embed_dim, kernel, stride=kernel),
            nn.ReLU(),
            nn.Conv3d(2 * embed_dim, embed_dim, 1),
        )

    def forward(self, images: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """images [B, C, H, W], valid [B, C, H, W] or None -> tokens [B, C, N, D]."""
        if valid is not None:
            # Nodata values (e.g. -32768 scaled) would dominate a patch; zero is the mean after
            # normalisation, so a partly valid patch is embedded as if its gaps were average.
            images = images.masked_fill(~valid, 0.0)
        x = self.proj(images[:, None])  # [B, D, C, h, w]
        return x.flatten(3).permute(0, 2, 3, 1)  # [B, C, N, D]


class AttentionPool(nn.Module):
    """Reduce ``x_r = Linear(D->d)(x)`` and pool it along one axis, queried by the cls entry.

    Over each row (``dim=2``, giving X_C [B, C+1, d]) or column (``dim=1``, X_S [B, N+1, d]):
    ``X = sum softmax((W_q x_r,cls) . x_r / sqrt(d)) x_r``, the cls itself always among the keys
    so a row with no valid token pools to its cls. W_q stands for the product of a query and a key
    projection; without it the cls would score q . q against itself and pool little else.

    The pooling weights sum to 1, so pooling commutes with the affine reduction: the module
    pools x at width D and reduces the pooled vectors, with scores ``(W_r^T W_q x_r,cls) . x``
    (the bias term is constant along the softmax and cancels). The result is the same, but
    x_r [B, C+1, N+1, d] is never built or kept for backward.

    Args:
        embed_dim: D, the token width.
        width: d, the reduced width (d_c or d_s).
        dim: 2 pools over patches, 1 over bands.
    """

    def __init__(self, embed_dim: int, width: int, dim: int):
        super().__init__()
        if dim not in (1, 2):
            raise ValueError(f"pool over dim 1 (bands) or 2 (patches), not {dim}")
        self.dim = dim
        self.reduce = nn.Linear(embed_dim, width)
        self.query = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C+1, N+1, D], valid [B, C+1, N+1] or None -> [B, C+1, d] or [B, N+1, d]."""
        if self.dim == 2:
            score, pool = "bcnd,bcd->bcn", "bcn,bcnd->bcd"
        else:
            score, pool = "bcnd,bnd->bcn", "bcn,bcnd->bnd"
        query = self.query(self.reduce(x.select(self.dim, 0)))  # [B, C+1 or N+1, d]
        query = query @ self.reduce.weight  # [B, C+1 or N+1, D]: W_r^T W_q x_r,cls
        scores = torch.einsum(score, x, query) / math.sqrt(self.query.in_features)  # [B, C+1, N+1]
        if valid is not None:
            own_cls = torch.zeros(1, dtype=torch.long, device=valid.device)
            keys = valid.index_fill(self.dim, own_cls, True)  # [B, C+1, N+1]
            scores = scores.masked_fill(~keys, float("-inf"))
        return self.reduce(torch.einsum(pool, scores.softmax(self.dim), x))


class LowRankAttention(nn.Module):
    """Multi-head attention of rank r: r query/key projections per head share one value.

    Runs through ``scaled_dot_product_attention`` with the H*r maps as the head axis of a 4-D
    call, which lets PyTorch pick a fused kernel that never holds the L x L maps (a 5-D call
    falls back to the math kernel on CPU: 3-4x slower and 30x the memory at N=1024, H=4, r=8).

    Args:
        dim: width of the pooled sequence (d_c or d_s).
        num_heads: heads H; dim must divide by H.
        rank: r, the number of attention maps per head.
    """

    def __init__(self, dim: int, num_heads: int, rank: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"branch width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.rank = rank
        self.qk = nn.Linear(dim, 2 * rank * dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | GridField | None = None
    ) -> torch.Tensor:
        """x [B, L, d], mask [B, L or 1, L] (True = attend), a GridField, or None
        -> [B, H, r, L, d/H]."""
        b, length, dim = x.shape
        heads, rank, head_dim = self.num_heads, self.rank, dim // self.num_heads
        qk = self.qk(x).reshape(b, length, 2, rank, heads, head_dim)
        if isinstance(mask, GridField):
            q, k = qk.permute(2, 0, 4, 3, 1, 5).unbind(0)  # each [B, H, r, L, d/H]
            v = self.v(x).reshape(b, length, heads, head_dim).transpose(1, 2)[:, :, None]
            return grid_attention(q, k, v, mask)
        qk = qk.permute(2, 0, 4, 3, 1, 5).reshape(2, b, heads * rank, length, head_dim)
        q, k = qk.unbind(0)  # each [B, H*r, L, d/H]
        v = self.v(x).reshape(b, length, heads, head_dim).transpose(1, 2)  # [B, H, L, d/H]
        v = v[:, :, None].expand(-1, -1, rank, -1, -1).reshape(b, heads * rank, length, head_dim)
        mask = None if mask is None else mask[:, None]  # [B, 1, L or 1, L]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H*r, L, d/H]
        return out.reshape(b, heads, rank, length, head_dim)


class LessAttention(nn.Module):
    """LESS attention over [B, C+1, N+1, D] tokens (SPECS "LESS ViT").

    ``x_c = Linear(D->d_c)(x)`` is pooled over patches into X_C [B, C+1, d_c] and
    ``x_s = Linear(D->d_s)(x)`` over bands into X_S [B, N+1, d_s]; each goes through rank-r
    multi-head attention, and head h recombines them as
    ``Y[c, n] = (1/r) sum_r vec((A_C^r V_C)[c] (x) (A_S^r V_S)[n])``, i.e.
    ``((1/r) sum_r A_C^r (x) A_S^r)(V_C (x) V_S)``. The 1/r (the spec writes a plain sum) keeps that
    combined attention row-stochastic, so the output scale does not grow with r.
    Head width is (d_c/H)(d_s/H), so the H heads concatenate back to D.

    Neither x_c, x_s nor Y is ever materialised: the reductions happen after pooling
    (``AttentionPool``) and the out-projection is contracted with one branch before the
    recombination (``forward``), which keeps the activations saved for backward small; the
    result equals the formula above (tests check it against ``torch.kron``).

    Args:
        dim: token width D.
        num_heads: H, shared by both branches.
        k: spectral width per head; d_c = H*k and d_s = (D/d_c)*H.
        rank: r.
    """

    def __init__(self, dim: int, num_heads: int, k: int = 2, rank: int = 8, qkv_bias: bool = True):
        super().__init__()
        spectral_dim = num_heads * k
        if dim % spectral_dim:
            raise ValueError(f"width {dim} must divide by num_heads * k = {spectral_dim}")
        spatial_dim = dim // spectral_dim * num_heads
        self.num_heads = num_heads
        self.rank = rank
        self.pool_c = AttentionPool(dim, spectral_dim, dim=2)
        self.pool_s = AttentionPool(dim, spatial_dim, dim=1)
        self.spectral = LowRankAttention(spectral_dim, num_heads, rank, qkv_bias)
        self.spatial = LowRankAttention(spatial_dim, num_heads, rank, qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def branches(
        self,
        x: torch.Tensor,
        valid: torch.Tensor | None = None,
        field: torch.Tensor | GridField | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-rank branch outputs A_C^r V_C [B, H, r, C+1, k] and A_S^r V_S [B, H, r, N+1, d_s/H].

        Args:
            x: [B, C+1, N+1, D] normalised tokens.
            valid: [B, C+1, N+1] True for tokens holding data, or None: the cls-position column
                says which bands hold any data, the cls-channel row which patches do.
            field: [B, N+1, N+1] spatial mask (the perception field), its ``GridField``, or None.
        """
        spectral = self.pool_c(x, valid)  # X_C [B, C+1, d_c]
        spatial = self.pool_s(x, valid)  # X_S [B, N+1, d_s]
        channel_keys = position_keys = None
        if valid is not None:
            channel_keys = valid[:, None, :, 0]  # [B, 1, C+1]
            position_keys = valid[:, None, 0, :]  # [B, 1, N+1]
            if isinstance(field, GridField):
                field = dataclasses.replace(field, keys=position_keys[:, 0])  # [B, N+1]
            else:
                field = position_keys if field is None else field & position_keys  # [B, N+1|1, N+1]
        return self.spectral(spectral, channel_keys), self.spatial(spatial, field)

    def forward(
        self,
        x: torch.Tensor,
        valid: torch.Tensor | None = None,
        field: torch.Tensor | GridField | None = None,
    ) -> torch.Tensor:
        """x [B, C+1, N+1, D] -> [B, C+1, N+1, D]; masks as in ``branches``."""
        dim = x.shape[-1]
        spectral, spatial = self.branches(x, valid, field)  # [B, H, r, C+1, k], [B, H, r, N+1, j]
        heads, k, j = spatial.shape[1], spectral.shape[-1], spatial.shape[-1]
        weight = (
            self.proj.weight.reshape(dim, heads, k, j) / self.rank
        )  # out-proj over vec(h, i, j)
        return Recombine.apply(spectral, spatial, weight) + self.proj.bias  # [B, C+1, N+1, D]


class Recombine(torch.autograd.Function):
    """``out[b,c,n,o] = sum_{h,r,i,j} S[b,h,r,c,i] P[b,h,r,n,j] W[o,h,i,j]``: the out-projection of
    the per-head Kronecker recombination, as one trilinear contraction.

    Y (the recombined [B, C+1, N+1, D] tokens before the out-projection) is never built. The
    spatial branch is contracted with W first, ``z[b,h,r,i,n,o] = sum_j P W``, because the spectral
    width k is the smallest index (k = 2 against j = D/(H k)): the big contraction over (h, r, i)
    then costs C N D H r k, j/k times less than contracting the spectral branch first. z is
    H r k / (C+1) times the size of the output, so it is built a slice of patches at a time (no
    slice larger than the output's share) and never kept for backward, which rebuilds it from the
    small S, P and W.
    """

    @staticmethod
    def forward(ctx, spectral, spatial, weight):
        """spectral S [B, H, r, C+1, k], spatial P [B, H, r, N+1, j], weight W [D, H, k, j]."""
        device = spectral.device.type
        if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
            # The branches arrive in autocast's dtype and W (a parameter) in fp32; backward runs
            # outside autocast, so all three are cast to its dtype here and saved that way.
            dtype = torch.get_autocast_dtype(device)
            spectral, spatial, weight = spectral.to(dtype), spatial.to(dtype), weight.to(dtype)
        ctx.save_for_backward(spectral, spatial, weight)
        b, _, _, c, _ = spectral.shape
        n, dim = spatial.shape[3], weight.shape[0]
        s = _flat_spectral(spectral)  # [B, C+1, H*r*k]
        out = spectral.new_empty(b, c, n, dim)
        for lo, hi in _patch_slices(s.shape[2], c, n):
            z = _spatial_with_weight(spatial[:, :, :, lo:hi], weight)  # [B, H*r*k, n_s*D]
            out[:, :, lo:hi] = (s @ z).reshape(b, c, hi - lo, dim)
        return out  # [B, C+1, N+1, D]

    @staticmethod
    def backward(ctx, grad):
        spectral, spatial, weight = ctx.saved_tensors
        b, heads, rank, c, k = spectral.shape
        s = _flat_spectral(spectral)  # [B, C+1, H*r*k]
        grad_s = torch.zeros_like(s)
        with torch.enable_grad():
            spatial_ = spatial.detach().requires_grad_()
            weight_ = weight.detach().requires_grad_()
            for lo, hi in _patch_slices(s.shape[2], c, spatial.shape[3]):
                z = _spatial_with_weight(spatial_[:, :, :, lo:hi], weight_)  # [B, H*r*k, n_s*D]
                g = grad[:, :, lo:hi].reshape(b, c, -1)  # [B, C+1, n_s*D]
                grad_s += g @ z.detach().transpose(1, 2)
                torch.autograd.backward(z, s.transpose(1, 2) @ g)  # into spatial_, weight_
        grad_spectral = grad_s.reshape(b, c, heads, rank, k).permute(0, 2, 3, 1, 4)
        return grad_spectral, spatial_.grad, weight_.grad


def _flat_spectral(spectral: torch.Tensor) -> torch.Tensor:
    """S [B, H, r, C+1, k] -> [B, C+1, H*r*k]."""
    b, heads, rank, c, k = spectral.shape
    return spectral.permute(0, 3, 1, 2, 4).reshape(b, c, heads * rank * k)


def _patch_slices(z_rows: int, c: int, n: int) -> list[tuple[int, int]]:
    """Patch ranges such that z's slice [z_rows, n_s * D] is no larger than out's [C+1, N+1, D]."""
    step = max(1, n * c // z_rows) if z_rows > c else n
    return [(lo, min(lo + step, n)) for lo in range(0, n, step)]


def _spatial_with_weight(spatial: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """P [B, H, r, N+1, j], W [D, H, k, j] -> z [B, H*r*k, (N+1)*D], z[h,r,i,n,o] = sum_j P W."""
    b, heads, rank, n, _ = spatial.shape
    z = torch.einsum("bhrnj,ohij->bhrino", spatial, weight)  # [B, H, r, k, N+1, D]
    return z.reshape(b, heads * rank * weight.shape[2], n * weight.shape[0])


class LessBlock(nn.Module):
    """Pre-norm block: x + ls1(LESS attention(norm1(x))), then x + ls2(MLP(norm2(x))) per token."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        k: int = 2,
        rank: int = 8,
        mlp_ratio: float = 4.0,
        layer_scale_init: float = 0.1,
    ):
        super().__init__()
        self.norm1 = _layer_norm(dim)
        self.attn = LessAttention(dim, num_heads, k, rank)
        self.ls1 = LayerScale(dim, layer_scale_init)
        self.norm2 = _layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.ls2 = LayerScale(dim, layer_scale_init)

    def forward(
        self,
        x: torch.Tensor,
        valid: torch.Tensor | None = None,
        field: torch.Tensor | GridField | None = None,
    ) -> torch.Tensor:
        """x [B, C+1, N+1, D] -> [B, C+1, N+1, D]; masks as in ``LessAttention.branches``."""
        x = x + self.ls1(self.attn(self.norm1(x), valid, field))
        return x + self.ls2(self.mlp(self.norm2(x)))


class LessViT(nn.Module):
    """LESS ViT encoder for hyperspectral cubes of any band set (SPECS T4 and "LESS ViT").

    Encoder protocol (as ``SpectralViT``, with bands as an axis of their own):
      ``tokenize(images, band_ids, wavelengths, gsd, valid) -> LessTokens`` ([B, C, N, D] tokens),
      ``encode(tokens, keep_channels, keep_positions) -> [B, Kc+1, Kn+1, D]``,
      ``forward_features(...) -> dict`` of global, per-band, per-patch and patch-token features.
    Objectives (Hyper-MAE) mask bands and patches between the two by index.

    Positional-channel embedding scaling: patch positions enter PE_2D in metres on the ground
    (grid index * patch size * GSD) and wavelengths enter PE_1D in nm. Both then span roughly
    10..10^4 units (EnMAP: 240 m between patches of 8 px, 6-10 nm between bands, images of a few
    km, spectra of 400-2500 nm), which is the range the sincos frequencies 1/10000^(2i/D)
    resolve, so neither part is a constant nor aliased noise next to the other.

    Args:
        patch_size: side of a square patch in pixels.
        embed_dim, depth, num_heads, mlp_ratio: transformer size; embed_dim divisible by 4.
        k: spectral width per head (d_c = num_heads * k); embed_dim must divide by d_c.
        rank: r, attention maps per head in each branch.
        perception_radius_m: spatial attention reaches patches at most this far (metres);
            None attends everywhere.
        default_gsd: GSD in metres assumed when ``tokenize`` gets none (EnMAP's 30 m).
        layer_scale_init: initial layer-scale value.
        grad_checkpointing: recompute block activations in backward to save memory.
    """

    def __init__(
        self,
        patch_size: int = 8,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        k: int = 2,
        rank: int = 8,
        perception_radius_m: float | None = PERCEPTION_RADIUS_M,
        default_gsd: float = 30.0,
        layer_scale_init: float = 0.1,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        if embed_dim % 4:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by 4 for 2-D sincos")
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.perception_radius_m = perception_radius_m
        self.default_gsd = default_gsd
        self.grad_checkpointing = grad_checkpointing
        self.patch_embed = LessPatchEmbed(patch_size, embed_dim)
        self.global_cls = LearnedToken(embed_dim)
        self.channel_cls = LearnedToken(embed_dim)  # the cls channel (row 0)
        self.position_cls = LearnedToken(embed_dim)  # the cls position (column 0)
        self.blocks = nn.ModuleList(
            LessBlock(embed_dim, num_heads, k, rank, mlp_ratio, layer_scale_init)
            for _ in range(depth)
        )
        self.norm = _layer_norm(embed_dim)
        self.apply(init_weights)

    def grid(self, images: torch.Tensor) -> tuple[int, int]:
        """Patch grid (rows, cols) of an image batch; sides must be multiples of the patch."""
        return patch_grid(images, self.patch_size)

    def tokenize(
        self,
        images: torch.Tensor,
        band_ids: Sequence[str],
        wavelengths: torch.Tensor,
        gsd: float | torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
    ) -> LessTokens:
        """Embed every band of every patch and add E(c, n).

        Args:
            images: [B, C, H, W] normalised.
            band_ids: C registry keys; only checked against C, as band identity comes from
                the wavelengths.
            wavelengths: [C] or [B, C] centre wavelengths in nm.
            gsd: metres per pixel, a float or [B]; None means ``default_gsd``.
            valid: [B, C, H, W] bool, False at nodata pixels, or None (all valid).

        Returns:
            LessTokens with tokens [B, C, N, D].
        """
        b, c = images.shape[:2]
        if len(band_ids) != c or wavelengths.shape[-1] != c:
            raise ValueError(
                f"images have {c} bands but {len(band_ids)} band_ids and "
                f"{wavelengths.shape[-1]} wavelengths were given"
            )
        tokens = self.patch_embed(images, valid)  # [B, C, N, D]
        gsd = gsd_host = self.default_gsd if gsd is None else gsd
        gsd = torch.as_tensor(gsd, dtype=torch.float64, device=images.device).expand(b)
        spacing = gsd * self.patch_size  # [B]
        positions = patch_positions(*self.grid(images), spacing, images.device)  # [B, N, 2]
        wavelengths = wavelengths.to(images.device, torch.float64).expand(b, c)  # [B, C]
        dtype = tokens.dtype
        embed = (
            position_embedding(positions, self.embed_dim).to(dtype)[:, None]  # [B, 1, N, D]
            + channel_embedding(wavelengths, self.embed_dim).to(dtype)[:, :, None]  # [B, C, 1, D]
        ) / 2
        if valid is not None:
            p = self.patch_size
            valid = nn.functional.max_pool2d(valid.to(images.dtype), p).flatten(2) > 0  # [B, C, N]
        min_spacing = _host_min(gsd_host) * self.patch_size
        if math.isnan(min_spacing):  # a meta tensor holds no values: use the dense mask
            return LessTokens(tokens + embed, wavelengths, positions, valid)
        grid = (self.grid(images), spacing, min_spacing)
        return LessTokens(tokens + embed, wavelengths, positions, valid, *grid)

    def encode(
        self,
        tokens: LessTokens,
        keep_channels: torch.Tensor | None = None,
        keep_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Add the cls row/column/corner and run the blocks.

        Args:
            tokens: from ``tokenize``.
            keep_channels: [B, Kc] indices of the bands to keep, or None (all).
            keep_positions: [B, Kn] indices of the patches to keep, or None (all).

        Returns:
            [B, Kc+1, Kn+1, D] normalised features in the layout of the module docstring.
        """
        t = tokens.select(keep_channels, keep_positions)
        x = t.tokens  # [B, C, N, D]
        b, c, n, _ = x.shape
        # The cls channel carries the position half of E and the cls position the band half,
        # so each summary knows which patch / band it stands for.
        row = (
            self.channel_cls(x, n) + position_embedding(t.positions, self.embed_dim).to(x.dtype) / 2
        )
        column = (
            self.position_cls(x, c)
            + channel_embedding(t.wavelengths, self.embed_dim).to(x.dtype) / 2
        )
        top = torch.cat([self.global_cls(x), row], dim=1)  # [B, N+1, D]
        x = torch.cat([column[:, :, None], x], dim=2)  # [B, C, N+1, D]
        x = torch.cat([top[:, None], x], dim=1)  # [B, C+1, N+1, D]
        valid = None if t.valid is None else _with_summaries(t.valid)  # [B, C+1, N+1]
        field = spatial_field(t, self.perception_radius_m)
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, valid, field, use_reentrant=False)
            else:
                x = block(x, valid, field)
        return self.norm(x)

    def forward_features(
        self,
        images: torch.Tensor,
        band_ids: Sequence[str],
        wavelengths: torch.Tensor,
        gsd: float | torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Encode a batch with nothing masked; arguments as in ``tokenize``.

        Returns:
            ``"cls"`` [B, D] the global cls; ``"channels"`` [B, C, D] one summary per band (the
            cls-position column); ``"positions"`` [B, N, D] one summary per patch (the
            cls-channel row); ``"patches"`` [B, C, N, D] the patch tokens.
        """
        x = self.encode(self.tokenize(images, band_ids, wavelengths, gsd, valid))
        return {
            "cls": x[:, 0, 0],
            "channels": x[:, 1:, 0],
            "positions": x[:, 0, 1:],
            "patches": x[:, 1:, 1:],
        }

    def forward(self, images, band_ids, wavelengths, gsd=None, valid=None):
        return self.forward_features(images, band_ids, wavelengths, gsd, valid)


class LessDecoder(nn.Module):
    """A light LESS transformer that predicts the pixels of every (band, patch) of a full grid.

    The encoder saw only some bands and patches (``LessViT.encode`` with kept indices). The
    decoder scatters its output back into the full [B, C+1, N+1, Dd] layout, puts a mask token
    in every slot the encoder did not see, adds ``E(c, n)`` at decoder width to every slot (the
    cls row and column get their half, as in the encoder), runs LESS blocks over the whole grid
    (the spatial branch within the encoder's perception field) and maps each token to the p*p
    pixels of its band and patch. The head is shared by all bands, as the patch embedding is:
    band identity comes from the wavelength half of ``E``.

    Args:
        embed_dim: the encoder width D.
        patch_size: p.
        decoder_dim: Dd; divisible by 4 and by num_heads * k.
        depth, num_heads, k, rank, mlp_ratio: LESS block sizes at width Dd.
        perception_radius_m: the spatial reach (metres), as the encoder's; None attends everywhere.
    """

    def __init__(
        self,
        embed_dim: int,
        patch_size: int,
        decoder_dim: int = 128,
        depth: int = 2,
        num_heads: int = 4,
        k: int = 2,
        rank: int = 4,
        mlp_ratio: float = 4.0,
        perception_radius_m: float | None = PERCEPTION_RADIUS_M,
    ):
        super().__init__()
        if decoder_dim % 4:
            raise ValueError(f"decoder_dim {decoder_dim} must be divisible by 4 for 2-D sincos")
        self.decoder_dim = decoder_dim
        self.perception_radius_m = perception_radius_m
        self.embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = LearnedToken(decoder_dim)
        self.blocks = nn.ModuleList(
            LessBlock(decoder_dim, num_heads, k, rank, mlp_ratio) for _ in range(depth)
        )
        self.norm = _layer_norm(decoder_dim)
        self.head = nn.Linear(decoder_dim, patch_size * patch_size)
        self.apply(init_weights)

    def forward(
        self,
        latent: torch.Tensor,
        tokens: LessTokens,
        keep_channels: torch.Tensor,
        keep_positions: torch.Tensor,
        seen: torch.Tensor,
    ) -> torch.Tensor:
        """Predict every band of every patch.

        Args:
            latent: [B, Kc+1, Kn+1, D] from ``LessViT.encode(tokens, keep_channels,
                keep_positions)``.
            tokens: the full-grid tokens the encoder's input was selected from (wavelengths,
                positions and the grid come from here).
            keep_channels: [B, Kc] and keep_positions: [B, Kn], the indices given to ``encode``.
            seen: [B, C, N] True where the decoder takes the encoder's output; every other slot
                is a mask token. Must lie within the kept bands x kept patches; it can leave out
                kept slots whose tokens held nothing (e.g. a band of a missing sensor).

        Returns:
            [B, C, N, p*p] predicted pixels, patches row-major.
        """
        b, c, n = seen.shape
        x = self.embed(latent)  # [B, Kc+1, Kn+1, Dd]
        dim = x.shape[-1]
        rows = F.pad(keep_channels + 1, (1, 0))  # [B, Kc+1], 0 = the cls channel
        cols = F.pad(keep_positions + 1, (1, 0))  # [B, Kn+1], 0 = the cls position
        x = x.new_zeros(b, x.shape[1], n + 1, dim).scatter(
            2, cols[:, None, :, None].expand_as(x), x
        )  # [B, Kc+1, N+1, Dd]
        x = x.new_zeros(b, c + 1, n + 1, dim).scatter(
            1, rows[:, :, None, None].expand_as(x), x
        )  # [B, C+1, N+1, Dd]
        # A cls entry is the encoder's where any token it summarises was seen.
        taken = torch.cat([seen.any(1, keepdim=True), seen], dim=1)  # [B, C+1, N]
        taken = torch.cat([taken.any(2, keepdim=True), taken], dim=2)  # [B, C+1, N+1]
        taken[:, 0, 0] = True  # the global cls
        x = torch.where(taken[..., None], x, self.mask_token(x)[:, :, None])
        position = position_embedding(tokens.positions, dim).to(x.dtype) / 2  # [B, N, Dd]
        channel = channel_embedding(tokens.wavelengths, dim).to(x.dtype) / 2  # [B, C, Dd]
        x = x + F.pad(position, (0, 0, 1, 0))[:, None] + F.pad(channel, (0, 0, 1, 0))[:, :, None]
        field = spatial_field(tokens, self.perception_radius_m)
        for block in self.blocks:
            x = block(x, None, field)
        return self.head(self.norm(x[:, 1:, 1:]))  # [B, C, N, p*p]


def _host_min(gsd: float | torch.Tensor) -> float:
    """The smallest GSD as a Python float; NaN for a meta tensor. Batches carry gsd on the host
    (the data layer makes it); one already on an accelerator costs one synchronisation here."""
    if not torch.is_tensor(gsd):
        return float(gsd)
    return float("nan") if gsd.is_meta else float(gsd.min())


def _with_summaries(valid: torch.Tensor) -> torch.Tensor:
    """Patch validity [B, C, N] -> [B, C+1, N+1]: a band's or patch's cls entry holds data if
    any of its tokens does; the global cls always does."""
    per_patch = nn.functional.pad(valid.any(1, keepdim=True), (1, 0), value=True)  # [B, 1, N+1]
    per_band = torch.cat([valid.any(2, keepdim=True), valid], dim=2)  # [B, C, N+1]
    return torch.cat([per_patch, per_band], dim=1)


def _layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6)


def _less(defaults: dict, kwargs: dict) -> LessViT:
    return LessViT(**{**defaults, **kwargs})


@register_model
def less_test_patch8(**kwargs) -> LessViT:
    """A tiny LESS ViT for tests (D=48, H=4, k=2 -> d_c=8, d_s=24, r=2, 2 blocks)."""
    return _less(dict(embed_dim=48, depth=2, num_heads=4, k=2, rank=2), kwargs)


@register_model
def less_tiny_patch8(**kwargs) -> LessViT:
    """D=192, H=3, k=2 -> d_c=6, d_s=96; r=8, 12 blocks."""
    return _less(dict(embed_dim=192, depth=12, num_heads=3), kwargs)


@register_model
def less_small_patch8(**kwargs) -> LessViT:
    """D=384, H=6, k=2 -> d_c=12, d_s=192; r=8, 12 blocks."""
    return _less(dict(embed_dim=384, depth=12, num_heads=6), kwargs)


@register_model
def less_base_patch8(**kwargs) -> LessViT:
    """The published default: D=768, H=12, k=2 -> d_c=24, d_s=384; r=8, 12 blocks."""
    return _less(dict(embed_dim=768, depth=12, num_heads=12), kwargs)


@register_model
def less_large_patch8(**kwargs) -> LessViT:
    """D=1024, H=16, k=2 -> d_c=32, d_s=512; r=8, 24 blocks, layer scale from 1e-5 (CaiT, deep)."""
    return _less(dict(embed_dim=1024, depth=24, num_heads=16, layer_scale_init=1e-5), kwargs)
