"""Cross-sensor token mixup (SPECS O7) on real BigEarthNet Sentinel-2 / Sentinel-1 pairs: the
two views are exact complements built from the original tokens (the upstream bug is fixed),
samples lacking a sensor take it all from the other, and the loss learns."""

from __future__ import annotations

import pytest
import torch
from real_batches import paired_s1s2_batch

from eoforge.models import create_model
from eoforge.pretrain.mixup_mae import MixupMAE, mixup_choice
from eoforge.pretrain.objectives import objective_class

CROP = 32
N = (CROP // 8) ** 2  # patches per image with vit_test_patch8
PAIR = ["S2L2A", "S1GRD"]  # sensor A, sensor B


@pytest.fixture(scope="module")
def paired(sample_data, tmp_path_factory) -> dict:
    """Real BigEarthNet S2 L2A tiles and their S1 partners, 32 x 32 pixels: B = 6."""
    return paired_s1s2_batch(sample_data, tmp_path_factory.mktemp("pairs"), size=CROP, batch_size=6)


def _absent(view: dict, rows: list[int]) -> dict:
    """The view with ``rows`` marked as lacking this sensor (zero image, nothing valid)."""
    present = torch.ones(view["image"].shape[0], dtype=torch.bool)
    present[rows] = False
    image, valid = view["image"].clone(), view["valid"].clone()
    image[rows], valid[rows] = 0.0, False
    return dict(view, image=image, valid=valid, present=present)


def _mixup(**kwargs) -> MixupMAE:
    torch.manual_seed(0)
    kwargs = dict(sensors=PAIR, decoder_dim=32, decoder_depth=1, decoder_heads=4) | kwargs
    return MixupMAE(create_model("vit_test_patch8"), **kwargs)


def _mix(objective: MixupMAE, batch: dict, seed: int = 1):
    torch.manual_seed(seed)  # choice and mask come from torch's RNG, as in the training loop
    return objective.mix(batch)


def test_registry_and_option_errors(paired):
    assert objective_class("mixup_mae") is MixupMAE
    encoder = create_model("vit_test_patch8")
    with pytest.raises(ValueError, match="sensors"):
        MixupMAE(encoder, sensors=["S2L2A"])
    with pytest.raises(ValueError, match="sensors"):
        MixupMAE(encoder, sensors=["S2L2A", "S2L2A"])
    with pytest.raises(ValueError, match="mask_ratio"):
        MixupMAE(encoder, mask_ratio=1.0)


def test_a_batch_with_one_sensor_or_unaligned_views_is_refused(paired):
    only_s2 = {"S2L2A": paired["S2L2A"], "meta": {}}
    with pytest.raises(ValueError, match=r"two sensors.*\['S2L2A'\]"):
        _mixup(sensors=None)(only_s2)
    with pytest.raises(ValueError, match=r"\['S2L2A', 'S1GRD'\].*lacks \['S1GRD'\]"):
        _mixup()(only_s2)
    s1 = paired["S1GRD"]
    cropped = dict(s1, image=s1["image"][..., :16, :16], valid=s1["valid"][..., :16, :16])
    with pytest.raises(ValueError, match=r"same B, H, W: S2L2A is \(6, 12, 32, 32\)"):
        _mixup()(dict(paired, S1GRD=cropped))


def test_views_are_exact_complements_with_half_the_positions_each(paired):
    res = _mix(_mixup(), paired)
    from_a = res.from_a  # [2, B, N]
    assert from_a.shape == (2, 6, N)
    assert torch.equal(from_a[0], ~from_a[1])  # every position from A in exactly one view
    assert torch.equal(from_a.sum(-1), torch.full((2, 6), N // 2))
    assert len({tuple(row.tolist()) for row in from_a[0]}) > 1  # a choice per sample
    assert torch.equal(res.mask.sum(1), torch.full((6,), N * 3 // 4))  # one shared 75% mask


def test_view_two_is_mixed_from_the_originals_not_just_sensor_b(paired):
    objective = _mixup()
    res = _mix(objective, paired)
    s2, s1 = paired["S2L2A"], paired["S1GRD"]
    with torch.no_grad():
        tokens_a = objective.encoder.tokenize(s2["image"], s2["band_ids"], s2["wavelengths"])
        tokens_b = objective.encoder.tokenize(s1["image"], s1["band_ids"], s1["wavelengths"])
    for v in range(2):
        expected = torch.where(res.from_a[v][..., None], tokens_a, tokens_b)
        torch.testing.assert_close(res.tokens[v].detach(), expected)
    # The buggy view 2 would be sensor B everywhere.
    assert res.from_a[1].any()
    assert not torch.allclose(res.tokens[1].detach(), tokens_b)
    # View 2 also reconstructs A's bands at A's positions: its A term is a real loss.
    assert res.sensor_losses[1, 0].item() > 0 and res.sensor_losses[1, 1].item() > 0


def test_choice_for_samples_lacking_a_sensor():
    torch.manual_seed(0)
    present_a = torch.tensor([True, True, False, False])
    present_b = torch.tensor([True, False, True, False])
    from_a = mixup_choice(present_a, present_b, 16)  # [2, 4, 16]
    assert torch.equal(from_a[0, 0], ~from_a[1, 0])
    assert from_a[:, 1].all()  # only A: A everywhere, in both views
    assert not from_a[:, 2].any()  # only B: B everywhere, in both views


def test_missing_sensor_samples_take_the_sensor_they_have(paired):
    objective = _mixup()
    # Sample 1 lacks radar, sample 3 lacks optics.
    batch = dict(paired, S1GRD=_absent(paired["S1GRD"], [1]), S2L2A=_absent(paired["S2L2A"], [3]))
    res = _mix(objective, batch)
    assert res.from_a[:, 1].all() and not res.from_a[:, 3].any()
    torch.testing.assert_close(res.tokens[0, [1, 3]], res.tokens[1, [1, 3]])  # same in both views
    complete = [0, 2, 4, 5]
    assert torch.equal(res.from_a[0, complete], ~res.from_a[1, complete])
    # What the absent views hold does not matter: only `present` decides.
    noisy = {k: dict(v) for k, v in batch.items()}
    for sensor, row in (("S1GRD", 1), ("S2L2A", 3)):
        noisy[sensor]["image"] = batch[sensor]["image"].clone()
        noisy[sensor]["image"][row] = torch.randn_like(noisy[sensor]["image"][row]) * 5
    again = _mix(objective, noisy)
    assert again.loss.item() == pytest.approx(res.loss.item(), rel=1e-6)


def test_a_sensor_absent_from_the_whole_batch_is_left_out_of_the_mean(paired):
    objective = _mixup()
    batch = dict(paired, S1GRD=_absent(paired["S1GRD"], list(range(6))))
    res = _mix(objective, batch)
    assert res.from_a.all()
    assert res.sensor_losses[:, 1].abs().sum().item() == 0.0  # no radar target anywhere
    torch.testing.assert_close(res.view_losses, res.sensor_losses[:, 0])  # not halved


def test_every_parameter_gets_a_gradient_and_preview_returns_images(paired):
    objective = _mixup()
    torch.manual_seed(0)
    out = objective(paired)
    assert set(out) == {"loss", "loss/view1", "loss/view2", "loss/S2L2A", "loss/S1GRD"}
    assert all(v.dim() == 0 for v in out.values())
    assert out["loss"].item() == pytest.approx((out["loss/view1"] + out["loss/view2"]).item() / 2)
    out["loss"].backward()
    missing = [n for n, p in objective.named_parameters() if p.grad is None]
    assert not missing, missing
    images = objective(paired, preview=True)
    assert set(images) == {"S2L2A", "S1GRD"}
    for sensor, c in (("S2L2A", 12), ("S1GRD", 2)):
        for key in ("input", "masked", "reconstruction"):
            assert images[sensor][key].shape == (4, c, CROP, CROP), (sensor, key)
        assert torch.isfinite(images[sensor]["reconstruction"]).all()


def test_loss_falls_on_real_s1_s2_pairs(paired):
    objective = _mixup()
    opt = torch.optim.AdamW(objective.parameters(), lr=2e-3)
    losses = []
    for step in range(50):
        torch.manual_seed(step)
        loss = objective(paired)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5, losses
