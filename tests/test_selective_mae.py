"""SelectiveMAE (SPECS O2): K visible / M target patches, HOG scoring, the PSTS schedule, learning
on real Sentinel-2 tiles, and the throughput benchmark's smoke run."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F
from real_batches import s2_batch

from eoforge.models import create_model
from eoforge.models.spectral import patchify
from eoforge.pretrain.hog import hog_energy, luminance, patch_hog
from eoforge.pretrain.selective_mae import (
    SelectiveMAE,
    expand_selection,
    phase_counts,
)

from conftest import REPO_ROOT

SMALL = dict(decoder_dim=32, decoder_depth=1, decoder_heads=4)


def _objective(**kwargs) -> SelectiveMAE:
    torch.manual_seed(0)
    return SelectiveMAE(create_model("vit_test_patch8"), **{**SMALL, **kwargs})


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared CPU: one thread avoids stalls at OpenMP barriers of busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def batch(sample_data, tmp_path_factory) -> dict:
    """Two real BigEarthNet S2 L2A tiles, 12 bands, 64 x 64 px (64 patches of 8 px)."""
    return s2_batch(sample_data, tmp_path_factory.mktemp("selective"), size=64, batch_size=2)


def test_encoder_sees_k_patches_and_loss_covers_m(batch):
    objective = _objective()
    view = batch["S2L2A"]
    seen = {}
    encode = objective.encoder.encode

    def spy(tokens, keep=None):
        seen["keep"] = keep
        seen["latent"] = encode(tokens, keep)
        return seen["latent"]

    objective.encoder.encode = spy
    torch.manual_seed(1)
    loss, pred, keep, targets = objective.reconstruct(view)
    # 64 patches: K = round(0.15 * 64) = 10 visible, M = round(0.25 * 64) = 16 targets.
    assert seen["keep"] is keep and keep.shape == (2, 10)
    assert seen["latent"].shape == (2, 1 + 10, 64)
    assert targets.shape == (2, 16) and pred.shape == (2, 12, 16, 64)
    for k, t in zip(keep.tolist(), targets.tolist(), strict=True):
        assert len(set(k)) == 10 and len(set(t)) == 16 and not set(k) & set(t)
    # The loss is MAE's per-band norm-pix loss over exactly the M target patches.
    full = torch.zeros(2, 12, 64, 64)
    full.scatter_(2, targets[:, None, :, None].expand(-1, 12, -1, 64), pred.detach())
    mask = torch.zeros(2, 64).scatter_(1, targets, 1.0)
    expected = objective.loss(view["image"], view["valid"], full, mask)
    assert torch.allclose(loss, expected, atol=1e-6)


def test_hog_score_varies_on_a_real_tile_but_upstream_score_is_constant(batch):
    images, valid = batch["S2L2A"]["image"], batch["S2L2A"]["valid"]
    energy = hog_energy(images, 8, valid)  # [2, 64]
    assert energy.shape == (2, 64) and (energy >= 0).all()
    assert (energy.std(dim=1) > 0.2 * energy.mean(dim=1)).all(), energy
    # Upstream: standardise each patch's HOG vector, then average it -> 0 for every patch.
    vectors = patch_hog(luminance(images, valid), 8)  # [2, 64, 9]
    mean, var = vectors.mean(-1, keepdim=True), vectors.var(-1, keepdim=True)
    upstream = ((vectors - mean) / (var + 1e-6).sqrt()).mean(-1)
    assert upstream.abs().max() < 1e-5


def test_hog_energy_follows_edges_and_their_orientation():
    image = torch.zeros(1, 1, 32, 32)
    image[..., :, 20:] = 1.0  # one vertical edge, inside the patch column 16-24
    energy = hog_energy(image, 8).reshape(4, 4)
    assert (energy[:, 2] > 0).all() and (energy[:, [0, 1, 3]] == 0).all()
    # The same gradient mass spread over all orientations (a ring) scores lower than one edge.
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    ring = (((yy - 3.5) ** 2 + (xx - 3.5) ** 2).sqrt() < 2.5).float()[None, None]
    edge = torch.zeros(1, 1, 8, 8)
    edge[..., 4:] = 1.0
    ring_mass = patch_hog(ring, 8).sum()
    edge_mass = patch_hog(edge, 8).sum()
    assert hog_energy(ring, 8) * edge_mass < hog_energy(edge, 8) * ring_mass


def test_hog_energy_is_fp32_under_autocast(batch):
    """The score runs in fp32 under bf16 autocast (the GPU default's compute), as without it."""
    images = batch["S2L2A"]["image"]
    expected = hog_energy(images, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = hog_energy(images, 8)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)


def test_phase_schedule_maps_the_published_epochs():
    # Epochs 280, 300, 580, 600 of 800: similar, blend, dissimilar, blend, random.
    assert phase_counts(0.0, 10) == (10, 0, 0)
    assert phase_counts(0.349, 10) == (10, 0, 0)
    assert phase_counts(0.3625, 10) == (5, 5, 0)  # halfway through the first blend
    assert phase_counts(0.5, 10) == (0, 10, 0)
    assert phase_counts(0.7375, 10) == (0, 5, 5)
    assert phase_counts(0.9, 10) == (0, 0, 10)


def test_growth_rules_pick_most_least_similar_or_random():
    torch.manual_seed(0)
    features = F.normalize(torch.randn(3, 40, 16), dim=-1)
    selected = torch.randperm(40)[:5].repeat(3, 1)
    similarity = (features @ features.gather(1, selected[..., None].expand(-1, -1, 16)).mT).amax(-1)
    free = torch.ones(3, 40, dtype=torch.bool).scatter_(1, selected, False)

    near = expand_selection(features, selected, 4, 0, 0)[:, 5:]
    far = expand_selection(features, selected, 0, 4, 0)[:, 5:]
    for b in range(3):
        candidates = similarity[b][free[b]]
        assert torch.equal(similarity[b, near[b]].sort().values, candidates.sort().values[-4:])
        assert torch.equal(similarity[b, far[b]].sort().values, candidates.sort().values[:4])
    both = expand_selection(features, selected, 2, 2, 3)
    assert torch.equal(both[:, :5], selected) and both.shape == (3, 12)
    assert all(len(set(row)) == 12 for row in both.tolist())
    randoms = {
        tuple(expand_selection(features, selected, 0, 0, 3)[0, 5:].tolist()) for _ in range(5)
    }
    assert len(randoms) > 1


def test_progress_changes_the_selection_rule(batch):
    objective = _objective()
    view = batch["S2L2A"]
    tokens = objective.encoder.tokenize(view["image"], view["band_ids"], view["wavelengths"])
    score = hog_energy(view["image"], 8, view["valid"])
    features = F.normalize(tokens.detach(), dim=-1)

    def grown_similarity(progress):
        """Mean similarity of the grown patches to the initial set (same seed: same set)."""
        objective.set_progress(progress)
        torch.manual_seed(3)
        keep, _ = objective.select(tokens.detach(), score)
        initial, grown = keep[:, :5], keep[:, 5:]
        chosen = features.gather(1, initial[..., None].expand(-1, -1, 64))
        similarity = (features @ chosen.mT).amax(-1)
        return similarity.gather(1, grown).mean().item(), keep

    similar, keep_similar = grown_similarity(0.0)
    dissimilar, keep_dissimilar = grown_similarity(0.5)
    _, keep_random = grown_similarity(0.9)
    assert torch.equal(keep_similar[:, :5], keep_dissimilar[:, :5])  # same initial draw
    assert similar > dissimilar + 0.05, (similar, dissimilar)
    assert not torch.equal(keep_random, keep_similar)
    assert not torch.equal(keep_random, keep_dissimilar)


def test_loss_falls_on_a_fixed_real_batch_and_every_parameter_learns(batch):
    # Raw-pixel targets: in 50 steps a tiny model learns the level and colour of hidden patches
    # from the visible ones; per-patch normalised targets (texture only) take far longer.
    objective = _objective(norm_pix=False)
    opt = torch.optim.AdamW(objective.parameters(), lr=2e-3)
    losses = []
    for step in range(50):
        torch.manual_seed(step)
        objective.set_progress(step / 50)
        loss = objective(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        if step == 0:
            for name, param in objective.named_parameters():
                assert param.grad is not None, name
                assert param.grad.abs().sum() > 0 and param.grad.isfinite().all(), name
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses


def test_absent_samples_add_no_loss(batch):
    objective = _objective()
    view = dict(batch["S2L2A"], present=torch.tensor([True, False]))
    losses = []
    for fill in (0.0, 100.0):  # whatever an absent sample's pixels hold
        image = view["image"].clone()
        image[1] = fill
        torch.manual_seed(0)
        losses.append(objective({"S2L2A": dict(view, image=image), "meta": {}})["loss"])
    assert losses[0].isfinite() and torch.equal(losses[0], losses[1])


def test_preview_shows_visible_and_reconstructed_targets_only(batch):
    objective = _objective(norm_pix=False)
    torch.manual_seed(0)
    images = objective(batch, preview=True)["S2L2A"]
    torch.manual_seed(0)
    _, pred, keep, targets = objective.reconstruct(batch["S2L2A"])
    source = patchify(batch["S2L2A"]["image"], 8)
    masked, recon = patchify(images["masked"], 8), patchify(images["reconstruction"], 8)
    assert images["input"].shape == images["reconstruction"].shape == (2, 12, 64, 64)
    for b in range(2):
        hidden = sorted(set(range(64)) - set(keep[b].tolist()) - set(targets[b].tolist()))
        assert torch.equal(masked[b][:, keep[b]], source[b][:, keep[b]])
        assert torch.equal(recon[b][:, keep[b]], source[b][:, keep[b]])
        assert torch.allclose(recon[b][:, targets[b]], pred[b], atol=1e-6)
        assert (masked[b][:, targets[b]] == 0).all() and (recon[b][:, hidden] == 0).all()


@pytest.mark.parametrize(
    "option", [{"target_ratio": 0.9}, {"grow_steps": 0}, {"phase_bounds": (0.5, 0.2, 0.7, 0.8)}]
)
def test_bad_options_name_themselves(option):
    with pytest.raises(ValueError, match=next(iter(option))):
        _objective(**option)


def test_benchmark_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "selective_bench", REPO_ROOT / "perf" / "selective_mae.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--smoke", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "selective_mae.json").read_text())
    assert {"selective_mae", "mae"} <= set(result["models"])
    assert all(row["step_s"] > 0 for row in result["models"].values())
    assert result["gate"]["speedup"] == pytest.approx(
        result["models"]["mae"]["step_s"] / result["models"]["selective_mae"]["step_s"]
    )
    assert "Gate" in (tmp_path / "selective_mae.md").read_text()
