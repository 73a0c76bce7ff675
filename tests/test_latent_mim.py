"""Latent MIM Lite: modality-aware masking (whole groups as input or target, per-token masking
for one group, absent sensors never assigned), the frozen random projection (outside the
optimiser, unchanged by training, saved and restored), every tokenizer and a two-sensor sample,
and a loss that falls on real Sentinel-2 tiles."""

from __future__ import annotations

import math

import pytest
import torch
from real_batches import enmap_batch, paired_s1s2_batch, s2_batch

from eoforge.models import create_model
from eoforge.pretrain.latent_mim import LatentMIM, assign_roles, patch_discrimination
from eoforge.pretrain.objectives import objective_class

OUTPUTS = {"loss", "loss/patch", "loss/instance", "collapse/std", "collapse/mean_cosine"}


def _latent_mim(tokenizer: str = "spectral", seed: int = 0, **kwargs) -> LatentMIM:
    torch.manual_seed(seed)
    options = dict(decoder_dim=32, decoder_depth=1, decoder_heads=4, proj_dim=16) | kwargs
    return LatentMIM(create_model("vit_test_patch8", tokenizer=tokenizer), **options)


@pytest.fixture(scope="module")
def s2(sample_data, tmp_path_factory):
    """Four real BigEarthNet Sentinel-2 L2A tiles, 12 bands, 32 x 32."""
    return s2_batch(sample_data, tmp_path_factory.mktemp("s2"), size=32, batch_size=4)


def test_registered():
    assert objective_class("latent_mim") is LatentMIM


def test_groups_are_assigned_whole():
    """Three groups of 16 tokens (band groups or sensors), a third each for input and target:
    every sample's input is one whole group and its targets another, drawn per sample."""
    torch.manual_seed(0)
    group = torch.arange(3).repeat_interleave(16)  # [48]
    inputs, targets = assign_roles(group, torch.ones(64, 48, dtype=torch.bool), 1 / 3, 1 / 3)
    assert inputs.shape == targets.shape == (64, 16)
    pairs = set()
    for row_in, row_target in zip(inputs, targets, strict=True):
        [g_in], [g_target] = group[row_in].unique().tolist(), group[row_target].unique().tolist()
        assert g_in != g_target
        pairs.add((g_in, g_target))
    assert len(pairs) == 6  # every ordered pair of groups occurs


def test_one_group_falls_back_to_random_tokens_and_absent_tokens_are_never_assigned():
    torch.manual_seed(0)
    group = torch.zeros(16, dtype=torch.long)
    inputs, targets = assign_roles(group, torch.ones(8, 16, dtype=torch.bool), 0.25, 0.5)
    assert inputs.shape == (8, 4) and targets.shape == (8, 8)
    for row_in, row_target in zip(inputs, targets, strict=True):
        assert not set(row_in.tolist()) & set(row_target.tolist())
    assert len({tuple(row.tolist()) for row in inputs}) == 8  # random per sample

    # Sample 0 lacks the second sensor (tokens 16-31): the budgets follow its 16 tokens.
    group = torch.arange(2).repeat_interleave(16)
    present = torch.ones(8, 32, dtype=torch.bool)
    present[0, 16:] = False
    inputs, targets = assign_roles(group, present, 0.25, 0.5)
    assert inputs.shape == (8, 4) and targets.shape == (8, 8)
    assert (inputs[0] < 16).all() and (targets[0] < 16).all()


def test_patch_discrimination_contrasts_within_a_group():
    """A prediction equal to its own target and orthogonal to the others of its group scores
    near 0, whatever the targets of other groups look like."""
    target = torch.eye(4)[None]  # [1, 4, 4]: one-hot targets
    group = torch.tensor([[0, 0, 1, 1]])
    present = torch.ones(1, 4, dtype=torch.bool)
    loss = patch_discrimination(target * 10, target, group, present, temperature=0.01)
    assert loss < 1e-6
    # Tokens 0 and 2 swap predictions, across groups: their rows see only their own group's
    # targets, both orthogonal to them, so each is at chance (log 2) instead of far above it.
    swapped = target[:, [2, 1, 0, 3]]
    loss = patch_discrimination(swapped, target, group, present, temperature=0.01)
    assert loss.item() == pytest.approx(math.log(2) / 2, abs=1e-5)


@pytest.mark.parametrize("tokenizer", ["spectral", "dofa", "channel_groups"])
def test_every_tokenizer_trains_every_parameter(s2, tokenizer):
    objective = _latent_mim(tokenizer)
    out = objective(s2)
    assert set(out) == OUTPUTS and torch.isfinite(out["loss"]) and out["collapse/std"] > 0
    out["loss"].backward()
    assert not [n for n, p in objective.named_parameters() if p.grad is None]
    assert objective(s2, preview=True) == {}


def test_hyperspectral_with_the_spectral_adapter(sample_data, tmp_path):
    batch = enmap_batch(sample_data, tmp_path, size=16, batch_size=2)
    objective = _latent_mim("spectral_adapter")
    out = objective(batch)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert not [n for n, p in objective.named_parameters() if p.grad is None]


def test_two_sensors_form_one_sequence_of_two_groups(sample_data, tmp_path, monkeypatch):
    """S2 + S1 pairs: one sequence per sample, the sensors as its two groups, so with half the
    tokens as targets one whole sensor is the target of each sample."""
    batch = paired_s1s2_batch(sample_data, tmp_path, size=32, batch_size=2)
    objective = _latent_mim(target_ratio=0.5)
    _, _, _, group, present = objective.tokens(batch)
    assert group.tolist() == [0] * 16 + [1] * 16 and present.all()
    seen = []
    original = assign_roles

    def spy(*args):
        inputs, targets = original(*args)
        seen.append(targets)
        return inputs, targets

    monkeypatch.setattr("eoforge.pretrain.latent_mim.assign_roles", spy)
    out = objective(batch)
    assert torch.isfinite(out["loss"])
    for targets in seen:  # two views
        for row in targets:
            assert len(group[row].unique()) == 1
    out["loss"].backward()
    assert not [n for n, p in objective.named_parameters() if p.grad is None]


def test_frozen_projection_is_never_updated_and_is_saved(s2):
    objective = _latent_mim()
    projection = objective.target_projection
    trainable = {id(p) for p in objective.parameters()}
    assert all(id(p) not in trainable and not p.requires_grad for p in projection.parameters())
    before = {k: v.clone() for k, v in projection.state_dict().items()}
    opt = torch.optim.AdamW(objective.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        objective(s2)["loss"].backward()
        opt.step()
    after = projection.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(  # while the learned tokenizer it was copied from moved
        objective.encoder.patch_embed.weight, projection.weight
    )
    restored = _latent_mim(seed=1)
    restored.load_state_dict(objective.state_dict())
    loaded = restored.target_projection.state_dict()
    assert all(torch.equal(before[k], loaded[k]) for k in before)


def test_loss_falls_on_real_tiles(s2):
    """16 steps on the same four tiles, new masks each step. The patch term starts above
    chance (log T, T = 8 targets of 16 tokens) and falls to it here; below chance takes longer
    (on 64 x 64 tiles, T = 32: 4.01 at step 0, 3.22 at step 60 against log 32 = 3.47)."""
    objective = _latent_mim()
    opt = torch.optim.AdamW(objective.parameters(), lr=1e-3)
    losses = []
    for step in range(16):
        torch.manual_seed(step)
        loss = objective(s2)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(round(loss.item(), 4))
    assert sum(losses[-4:]) < 0.95 * sum(losses[:4]), losses
