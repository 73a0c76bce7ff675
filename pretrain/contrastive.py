"""Pieces shared by the contrastive and latent objectives (CROMA, SeCo, instance contrast,
latent MIM, JEPA): pooling, projection heads, a learnable logit scale, the cross-rank symmetric
InfoNCE, the MoCo InfoNCE and its key queue, copies of modules held outside the optimiser, and
the collapse statistics every one of them reports."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from eoforge.launch.distributed import gather_with_grad

# Logits of excluded pairs: finite (unlike -inf) so a row with no valid column stays NaN-free, and
# far below any real logit (|s * cos| <= 100), so exp() of it is exactly 0 in float32.
EXCLUDED_LOGIT = -1e4


# Below this ``collapse/std`` (module ``embedding_health``) the loop warns that the embeddings
# are collapsing: a healthy spread of unit vectors reads about 1, a collapsed one 0.
COLLAPSE_STD = 0.1


@torch.no_grad()
def embedding_health(z: torch.Tensor) -> dict[str, torch.Tensor]:
    """Collapse statistics of unit embeddings z [B, E] (SimSiam, Chen & He 2021, section 4.1):

    - ``collapse/std``: the per-dimension standard deviation over the batch, averaged over
      dimensions and multiplied by sqrt(E), so unit vectors spread evenly over the sphere read
      about 1 and embeddings collapsed onto one vector read 0;
    - ``collapse/mean_cosine``: the mean cosine similarity between different samples (1 when
      collapsed, about 0 when spread).
    """
    z = z.detach().float()
    b, e = z.shape
    std = z.std(dim=0).mean() * e**0.5 if b > 1 else z.new_zeros(())
    gram = z @ z.T  # [B, B]
    off_diagonal = (gram.sum() - gram.diagonal().sum()) / max(b * (b - 1), 1)
    return {"collapse/std": std, "collapse/mean_cosine": off_diagonal}


def collapse_warnings(values: dict[str, float], step: int) -> list[str]:
    """One message per logged ``collapse/std`` statistic (any objective, any term prefix or
    modality suffix) below ``COLLAPSE_STD``."""
    return [
        f"{key} = {value:.3f} at step {step}, below {COLLAPSE_STD}: the embeddings are "
        "collapsing onto one vector; lower optim.lr, raise the objective's temperature, or "
        "check that the samples differ"
        for key, value in values.items()
        if "collapse/std" in key and value < COLLAPSE_STD
    ]


def pool(features: torch.Tensor) -> torch.Tensor:
    """Global average of the patch tokens: encoder output [B, 1 + K, D] (cls first) -> [B, D]."""
    return features[:, 1:].mean(dim=1)


class ProjectionHead(nn.Module):
    """``z = normalize(Linear(LN-MLP(x)))``: CROMA's head on pooled features.

    Args:
        dim: input (encoder) width.
        out_dim: width of the embedding that enters the contrastive loss.
        mlp_ratio: hidden width of the MLP as a multiple of ``dim``.
    """

    def __init__(self, dim: int, out_dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
        )
        self.proj = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, D] -> unit vectors [B, out_dim]."""
        return F.normalize(self.proj(self.mlp(x)), dim=-1)


class LogitScale(nn.Module):
    """Learnable inverse temperature ``s = exp(log_s)``, capped at ``max_scale`` (CLIP).

    The parameter stores ``log s``; the cap is a clamp in forward (zero gradient beyond it), so
    no optimiser hook is needed. Its own module so ZeRO-3 gathers it in its own forward. The
    parameter has shape [1], not [], because DeepSpeed broadcasts parameters as bytes and cannot
    view a 0-dim tensor that way.
    """

    def __init__(self, init: float = 1 / 0.07, max_scale: float = 100.0):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor([math.log(init)]))
        self.max_log = math.log(max_scale)

    def forward(self) -> torch.Tensor:
        return self.log_scale.float().clamp(max=self.max_log).exp()[0]


def symmetric_info_nce(
    z_a: torch.Tensor, z_b: torch.Tensor, scale: torch.Tensor, paired: torch.Tensor
) -> torch.Tensor:
    """CLIP loss ``(CE(s z_a z_b^T) + CE(s z_b z_a^T)) / 2`` with negatives from every rank.

    Both sides are gathered across ranks with gradient (``gather_with_grad``); each rank scores
    its own rows against every rank's columns. The positive of row i is its own pair: the loss
    is ``logsumexp(row) - s * <z_a_i, z_b_i>``, the cross-entropy whose label is the row's
    global index (rank * local batch + i) without needing the rank.

    Rows and columns of samples that are not ``paired`` are excluded (their logits set to a
    value whose softmax weight is 0). Each rank sums its rows' losses and divides by the mean
    number of pairs per rank, so the mean of the ranks' losses (and gradients) equals the
    single-process loss on the whole batch, even where ranks hold different numbers of pairs.
    Without any pair the loss is 0, still connected to the inputs' graph.

    Args:
        z_a, z_b: unit embeddings [B, E] of the two views of the same B samples.
        scale: the logit scale s (scalar tensor).
        paired: bool [B], True where the sample has both views.

    Returns:
        the scalar loss of this rank.
    """
    z_a, z_b = z_a.float(), z_b.float()
    all_a, all_b = gather_with_grad(z_a), gather_with_grad(z_b)  # [world * B, E]
    all_paired = gather_with_grad(paired.float()) > 0  # [world * B]
    world = all_a.shape[0] // z_a.shape[0]
    positive = scale * (z_a * z_b).sum(dim=-1)  # [B]
    losses = []
    for rows, columns in ((z_a, all_b), (z_b, all_a)):
        logits = scale * rows @ columns.T  # [B, world * B]
        logits = logits.masked_fill(~all_paired[None, :], EXCLUDED_LOGIT)
        losses.append(torch.logsumexp(logits, dim=-1) - positive)  # [B]
    per_row = (losses[0] + losses[1]) / 2 * paired.float()  # [B]
    pairs_per_rank = all_paired.sum().float().clamp_min(1.0) / world
    return per_row.sum() / pairs_per_rank


def info_nce(
    query: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    temperature: float,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """MoCo's InfoNCE: each query against its positive key and a shared set of negatives.

    Args:
        query: unit embeddings [B, E] (with gradient).
        positive: unit embeddings [B, E] of the positive keys.
        negatives: unit embeddings [K, E] shared by every query.
        temperature: tau; logits are cosines / tau.
        weight: [B] row weights (0 excludes a row); the loss is their weighted mean.

    Returns:
        the scalar loss (0 with graph where every weight is 0).
    """
    query = query.float()
    pos = (query * positive.float()).sum(dim=-1, keepdim=True)  # [B, 1]
    neg = query @ negatives.float().T  # [B, K]
    logits = torch.cat([pos, neg], dim=1) / temperature  # [B, 1 + K]
    per_row = torch.logsumexp(logits, dim=-1) - logits[:, 0]  # CE with label 0, [B]
    if weight is None:
        return per_row.mean()
    weight = weight.float()
    return (per_row * weight).sum() / weight.sum().clamp_min(1.0)


class KeyQueue(nn.Module):
    """MoCo's dictionary: a ring buffer of the most recent keys, held in buffers.

    Buffers are saved with the module's state and never reach the optimiser. Starts as random
    unit vectors (as MoCo does), so the queue provides negatives from the first step.

    Args:
        size: number of keys kept.
        dim: key width.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))  # [size, E]
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Overwrite the oldest entries with ``keys`` [n, E] (the newest ``size`` if n > size)."""
        size = self.keys.shape[0]
        keys = keys[-size:]
        # The pointer stays on the device: no host synchronisation per step.
        index = (self.ptr + torch.arange(keys.shape[0], device=self.keys.device)) % size
        self.keys.index_copy_(0, index, keys.to(self.keys.dtype))
        self.ptr.copy_((self.ptr + keys.shape[0]) % size)


class MomentumCopy:
    """MoCo's momentum (EMA) copy of some of an objective's modules, held OUTSIDE the objective's
    module tree: not in its ``parameters()``, ``state_dict()``, ``.to()`` or dtype casts. So the
    optimiser never sees it, ZeRO never partitions or casts it (the EMA stays in float32 under
    bf16, where a 0.1% update would round away), and it moves to the query's device lazily. The
    owner saves it through its extra state (``state_dict``/``load_state_dict`` here). JEPA's
    target encoder is one; Latent MIM Lite's frozen projection is one that is never updated.

    Args:
        modules: name -> module to copy (e.g. {"encoder": ..., "head": ...}).
    """

    def __init__(self, modules: dict[str, nn.Module]):
        copies = nn.ModuleDict({name: copy.deepcopy(m) for name, m in modules.items()})
        self.module = copies.requires_grad_(False).float().eval()

    def on(self, device) -> nn.ModuleDict:
        """The copy, moved to ``device`` the first time it is needed there."""
        if next(self.module.parameters()).device != torch.device(device):
            self.module.to(device)
        return self.module

    @torch.no_grad()
    def update(
        self,
        query: list[torch.Tensor],
        momentum: float,
        full_parameters: Callable[[list], AbstractContextManager] = nullcontext,
    ) -> None:
        """k <- m k + (1 - m) q, parameter by parameter in the copy's float32.

        Args:
            query: the live parameters, in the copy's order.
            momentum: m.
            full_parameters: a context in which ``query`` reads whole (the engine's
                ``full_parameters``, which gathers ZeRO-3's partitions; outside an engine the
                parameters are whole).
        """
        with full_parameters(query):
            key = self.on(query[0].device)
            for k, q in zip(key.parameters(), query, strict=True):
                k.lerp_(q.detach().to(k.dtype), 1 - momentum)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)


class HoldsMomentumCopy:
    """Mixin of an ``nn.Module`` whose ``_key`` is a ``MomentumCopy`` of its submodules of the
    same names: exposes it as ``key_model``, updates it once per optimizer step with momentum
    ``current_momentum`` (``after_optimizer_step``, the training loop's hook) and saves it
    through the module's extra state (the ``..._extra_state`` entry of ``state_dict()``, which
    DeepSpeed checkpoints store)."""

    _key: MomentumCopy
    momentum: float

    @property
    def current_momentum(self) -> float:
        """m of the next update (constant unless the objective schedules it)."""
        return self.momentum

    def after_optimizer_step(
        self, full_parameters: Callable[[list], AbstractContextManager] = nullcontext
    ) -> None:
        """k <- m k + (1 - m) q over every copied module, after the optimizer has stepped."""
        live = [p for name in self._key.module for p in getattr(self, name).parameters()]
        self._key.update(live, self.current_momentum, full_parameters)

    @property
    def key_model(self) -> nn.ModuleDict:
        """The momentum copy (not a submodule)."""
        return self._key.module

    def get_extra_state(self) -> dict:
        return {"key_model": self._key.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        self._key.load_state_dict(state["key_model"])


@torch.no_grad()
def enqueue_everywhere(queue: KeyQueue, keys: torch.Tensor, present: torch.Tensor) -> None:
    """Every rank's keys [B, E] of present samples enter ``queue`` (the same on every rank)."""
    everywhere = gather_with_grad(present.float()) > 0  # [world * B]
    queue.enqueue(gather_with_grad(keys)[everywhere])
