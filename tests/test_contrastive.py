"""Contrastive objectives: CROMA (SPECS O5) and seasonal contrast (SPECS O6), their shared pieces,
and gather_with_grad in a single process. Learning is checked on real BigEarthNet S1/S2 pairs and
a real two-season SSL4EO-S12 time series."""

from __future__ import annotations

import math

import pytest
import torch
from real_batches import first_batch, paired_s1s2_batch, seasonal_batch

from eoforge.launch.distributed import gather_with_grad
from eoforge.models import create_model
from eoforge.pretrain import croma as croma_module
from eoforge.pretrain.contrastive import KeyQueue, symmetric_info_nce
from eoforge.pretrain.croma import CROMA
from eoforge.pretrain.mae import random_masking
from eoforge.pretrain.objectives import objective_class
from eoforge.pretrain.seasonal_contrast import HEADS, SeasonalContrast, draw_seasons

CROP = 32


@pytest.fixture(scope="module")
def paired(sample_data, tmp_path_factory):
    """Real co-registered BigEarthNet S2 L2A / S1 GRD tiles: B = 6, 32 x 32 pixels."""
    return paired_s1s2_batch(sample_data, tmp_path_factory.mktemp("pairs"), size=CROP, batch_size=6)


@pytest.fixture(scope="module")
def seasonal(sample_data, tmp_path_factory):
    """Real SSL4EO-S12 two-season S2 L2A series: image [4, 2, 12, 32, 32], time [4, 2]."""
    out = tmp_path_factory.mktemp("series")
    seasonal_batch(sample_data, out, size=CROP)
    # seasonal_batch returns one tile; its shards hold 64, so read four of them.
    return first_batch(out / "s2_series", 4)


def _croma(**kwargs) -> CROMA:
    torch.manual_seed(0)
    tiny = dict(decoder_dim=32, decoder_depth=1, decoder_heads=4, cross_depth=1, proj_dim=32)
    return CROMA(create_model("vit_test_patch8"), **(tiny | kwargs))


def _seco(**kwargs) -> SeasonalContrast:
    torch.manual_seed(0)
    return SeasonalContrast(create_model("vit_test_patch8"), **({"queue_size": 16} | kwargs))


def _train(objective, batch, steps=50, lr=1e-3) -> list[float]:
    opt = torch.optim.AdamW(objective.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        torch.manual_seed(step)
        loss = objective(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# ---------------------------------------------------------------- shared pieces


def test_gather_with_grad_is_identity_in_one_process():
    x = torch.randn(3, 4, requires_grad=True)
    assert gather_with_grad(x) is x


def test_queue_overwrites_oldest_keys_and_wraps():
    queue = KeyQueue(5, 2)
    assert torch.allclose(queue.keys.norm(dim=1), torch.ones(5))  # random unit keys at start
    first = torch.arange(6.0).reshape(3, 2)
    queue.enqueue(first)
    assert torch.equal(queue.keys[:3], first) and queue.ptr.item() == 3
    second = 10 + torch.arange(6.0).reshape(3, 2)
    queue.enqueue(second)  # slots 3, 4, then wraps to 0
    assert torch.equal(queue.keys[3:], second[:2]) and torch.equal(queue.keys[0], second[2])
    assert torch.equal(queue.keys[1:3], first[1:]) and queue.ptr.item() == 1
    many = 100 + torch.arange(14.0).reshape(7, 2)
    queue.enqueue(many)  # more keys than slots: the newest 5 are kept
    assert sorted(queue.keys[:, 0].tolist()) == many[2:, 0].tolist()
    assert set(queue.state_dict()) == {"keys", "ptr"}  # checkpointed, never optimised
    assert list(queue.parameters()) == []


def test_symmetric_info_nce_matches_cross_entropy_and_masks_unpaired():
    torch.manual_seed(0)
    z_a = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    z_b = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    s = torch.tensor(3.0)
    ce = torch.nn.functional.cross_entropy
    labels = torch.arange(5)
    expected = (ce(s * z_a @ z_b.T, labels) + ce(s * z_b @ z_a.T, labels)) / 2
    paired = torch.ones(5, dtype=torch.bool)
    assert torch.allclose(symmetric_info_nce(z_a, z_b, s, paired), expected, atol=1e-6)
    paired[[1, 3]] = False
    keep = torch.tensor([0, 2, 4])
    a, b = z_a[keep], z_b[keep]
    subset = (ce(s * a @ b.T, torch.arange(3)) + ce(s * b @ a.T, torch.arange(3))) / 2
    assert torch.allclose(symmetric_info_nce(z_a, z_b, s, paired), subset, atol=1e-6)


# ---------------------------------------------------------------- CROMA


def test_registry_and_option_checks():
    assert objective_class("croma") is CROMA
    assert objective_class("seasonal_contrast") is SeasonalContrast
    with pytest.raises(ValueError, match="cross_depth"):
        _croma(cross_depth=0)
    with pytest.raises(ValueError, match="mask_ratio"):
        _croma(mask_ratio=1.0)
    with pytest.raises(ValueError, match="queue_size"):
        _seco(queue_size=0)
    with pytest.raises(ValueError, match="momentum"):
        _seco(momentum=1.0)


def test_croma_needs_one_optical_and_one_radar_view(paired):
    with pytest.raises(ValueError, match=r"optical \['S2L2A'\] and radar \[\]"):
        _croma()({"S2L2A": paired["S2L2A"], "meta": {}})


def _fixed_masking(masks):
    """A stand-in for random_masking returning the rows of precomputed per-sample masks."""

    def masking(batch, length, ratio, device):
        keep, mask = masks
        assert keep.shape[0] == batch
        return keep, mask

    return masking


def _select(batch, rows):
    return {
        s: (
            {k: (v[rows] if torch.is_tensor(v) else v) for k, v in view.items()}
            if s != "meta"
            else view
        )
        for s, view in batch.items()
    }


def _absent(view, rows):
    view = dict(view)
    present = torch.ones(view["image"].shape[0], dtype=torch.bool)
    present[rows] = False
    view["present"] = present
    view["image"] = view["image"].clone()
    view["image"][rows] = 0.0
    view["valid"] = view["valid"].clone()
    view["valid"][rows] = False
    return view


def test_croma_missing_modality_is_excluded_not_paired_with_zeros(paired, monkeypatch):
    croma = _croma()
    torch.manual_seed(1)
    keep, mask = random_masking(6, (CROP // 8) ** 2, 0.75, "cpu")
    # Sample 1 lacks radar, sample 3 lacks optics.
    batch = dict(paired, S1GRD=_absent(paired["S1GRD"], [1]), S2L2A=_absent(paired["S2L2A"], [3]))

    def run(rows):
        monkeypatch.setattr(
            croma_module, "random_masking", _fixed_masking((keep[rows], mask[rows]))
        )
        return croma(_select(batch, rows))

    full = run(list(range(6)))
    complete = run([0, 2, 4, 5])
    with_radar = run([0, 2, 3, 4, 5])
    with_optics = run([0, 1, 2, 4, 5])
    assert full["loss/contrastive"] == pytest.approx(complete["loss/contrastive"].item(), rel=1e-5)
    assert full["loss/radar"] == pytest.approx(with_radar["loss/radar"].item(), rel=1e-5)
    assert full["loss/optical"] == pytest.approx(with_optics["loss/optical"].item(), rel=1e-5)
    # What the absent views hold does not matter: only `present` decides.
    noisy = dict(batch)
    for sensor, row in (("S1GRD", 1), ("S2L2A", 3)):
        noisy[sensor] = dict(batch[sensor], image=batch[sensor]["image"].clone())
        noisy[sensor]["image"][row] = torch.randn_like(noisy[sensor]["image"][row]) * 5
    monkeypatch.setattr(croma_module, "random_masking", _fixed_masking((keep, mask)))
    again = croma(noisy)
    for key in ("loss/contrastive", "loss/optical", "loss/radar"):
        assert again[key] == pytest.approx(full[key].item(), rel=1e-6), key


def test_croma_without_complete_pairs_has_zero_contrastive_term_with_graph(paired):
    croma = _croma()
    batch = dict(paired, S1GRD=_absent(paired["S1GRD"], list(range(6))))
    torch.manual_seed(0)
    out = croma(batch)
    assert out["loss/contrastive"].item() == 0.0
    assert out["loss/radar"].item() == 0.0  # no radar pixel counts
    out["loss"].backward()
    head = croma.optical_head.proj.weight
    assert head.grad is not None and torch.count_nonzero(head.grad) == 0  # connected, no signal


def test_croma_logit_scale_is_learnable_and_capped(paired):
    croma = _croma()
    assert croma.logit_scale.log_scale in set(croma.parameters())
    torch.manual_seed(0)
    out = croma(paired)
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    out["loss"].backward()
    assert croma.logit_scale.log_scale.grad.abs().item() > 0
    before = croma.logit_scale.log_scale.item()
    torch.optim.SGD(croma.parameters(), lr=0.1).step()
    assert croma.logit_scale.log_scale.item() != before
    with torch.no_grad():
        croma.logit_scale.log_scale.fill_(math.log(500.0))
    torch.manual_seed(0)
    assert croma(paired)["logit_scale"].item() == pytest.approx(100.0, rel=1e-5)


def test_croma_every_parameter_gets_a_gradient_and_preview_has_both_sensors(paired):
    croma = _croma()
    torch.manual_seed(0)
    out = croma(paired)
    health = {
        f"collapse/{k}_{side}" for k in ("std", "mean_cosine") for side in ("optical", "radar")
    }
    assert (
        set(out)
        == {"loss", "loss/contrastive", "loss/optical", "loss/radar", "logit_scale"} | health
    )
    out["loss"].backward()
    missing = [n for n, p in croma.named_parameters() if p.grad is None]
    assert not missing, missing
    images = croma(paired, preview=True)
    assert set(images) == {"S2L2A", "S1GRD"}
    assert images["S1GRD"]["reconstruction"].shape == (4, 2, CROP, CROP)


def test_croma_loss_falls_on_real_s1_s2_pairs(paired):
    losses = _train(_croma(), paired)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


# ---------------------------------------------------------------- seasonal contrast


def test_seasons_are_drawn_without_replacement():
    torch.manual_seed(0)
    for steps in (2, 3, 5):
        query, key = draw_seasons(20000, steps)
        assert (query != key).all()
        assert ((query >= 0) & (query < steps) & (key >= 0) & (key < steps)).all()
        pairs = torch.bincount(query * steps + key, minlength=steps * steps).float()
        pairs = pairs.reshape(steps, steps)
        off_diagonal = pairs[~torch.eye(steps, dtype=torch.bool)]
        expected = 20000 / (steps * (steps - 1))  # uniform over ordered distinct pairs
        assert (off_diagonal - expected).abs().max() < 0.1 * expected


def test_seasonal_needs_two_seasons(seasonal):
    view = dict(seasonal["S2L2A"], image=seasonal["S2L2A"]["image"][:, :1])
    with pytest.raises(ValueError, match="'S2L2A' has 1 time step"):
        _seco()({"S2L2A": view, "meta": {}})


def test_momentum_encoder_is_outside_the_optimiser_and_saved(seasonal):
    seco = _seco(momentum=0.9)
    key = seco.key_model
    trainable = {id(p) for p in seco.parameters()}
    assert all(id(p) not in trainable and not p.requires_grad for p in key.parameters())
    assert not any(name.startswith("_key") for name in seco.state_dict() if "extra" not in name)
    q0 = seco.encoder.blocks[0].attn.qkv.weight.detach().clone()
    k0 = key["encoder"].blocks[0].attn.qkv.weight.detach().clone()
    assert torch.equal(q0, k0)  # starts as a copy
    seco(seasonal)["loss"].backward()
    with torch.no_grad():
        seco.encoder.blocks[0].attn.qkv.weight.add_(1.0)
    torch.manual_seed(0)
    seco(seasonal)
    k1 = key["encoder"].blocks[0].attn.qkv.weight
    assert torch.equal(k1, k0)  # a forward pass leaves the copy alone
    seco.after_optimizer_step()  # the training loop's hook, once per optimizer step
    assert torch.allclose(k1, 0.9 * k0 + 0.1 * (q0 + 1.0), atol=1e-6)  # EMA, m = 0.9
    assert seco.queues[0].ptr.item() == 8  # two steps of 4 keys enqueued
    # Saved and restored with the module's state (what engine checkpoints store).
    restored = _seco(momentum=0.9)
    restored.load_state_dict(seco.state_dict())
    for a, b in zip(restored.key_model.parameters(), key.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(restored.queues[2].keys, seco.queues[2].keys)
    # Dtype casts of the objective (bf16 engines) leave the float32 EMA alone.
    restored.to(torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in restored.key_model.parameters())


def test_seasonal_every_parameter_gets_a_gradient(seasonal):
    seco = _seco()
    torch.manual_seed(0)
    out = seco(seasonal)
    health = {"collapse/std", "collapse/mean_cosine"}
    assert set(out) == {"loss"} | {f"loss/invariant_{h}" for h in HEADS} | health
    out["loss"].backward()
    missing = [n for n, p in seco.named_parameters() if p.grad is None]
    assert not missing, missing
    assert seco(seasonal, preview=True) == {}


def test_seasonal_loss_falls_on_a_real_two_season_series(seasonal):
    losses = _train(_seco(), seasonal)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
