"""Multi-scale reconstruction (SPECS O4, SatMAE++) on real BigEarthNet Sentinel-2 tiles: the
4x-downsampled input and the 2x / 4x targets, the band-agnostic upsampling head, the three loss
terms, and learning on a fixed real batch."""

from __future__ import annotations

import pytest
import torch
from real_batches import paired_s1s2_batch, s2_batch

from eoforge.models import create_model
from eoforge.pretrain.multiscale_mae import MultiScaleHead, MultiScaleMAE, downsample
from eoforge.pretrain.objectives import objective_class

SIZE = 64  # 4 x patch 8 x a 2 x 2 grid at the encoder's input scale


@pytest.fixture(scope="module")
def s2(sample_data, tmp_path_factory) -> dict:
    """Real BigEarthNet S2 L2A tiles, 64 x 64 pixels: view "S2L2A" [3, 12, 64, 64]."""
    return s2_batch(sample_data, tmp_path_factory.mktemp("s2"), size=SIZE, batch_size=3)


@pytest.fixture(scope="module")
def s1(sample_data, tmp_path_factory) -> dict:
    """Real BigEarthNet S1 GRD tiles (2 bands), 64 x 64 pixels: view "S1GRD" [3, 2, 64, 64]."""
    pairs = paired_s1s2_batch(sample_data, tmp_path_factory.mktemp("s1"), size=SIZE, batch_size=3)
    return pairs["S1GRD"]


def _objective(**kwargs) -> MultiScaleMAE:
    torch.manual_seed(0)
    kwargs = dict(decoder_dim=32, decoder_depth=1, decoder_heads=4) | kwargs
    return MultiScaleMAE(create_model("vit_test_patch8"), **kwargs)


def test_registry_and_option_errors(s2):
    assert objective_class("multiscale_mae") is MultiScaleMAE
    with pytest.raises(ValueError, match="mask_ratio"):
        MultiScaleMAE(create_model("vit_test_patch8"), mask_ratio=0.0)
    view = dict(s2["S2L2A"], image=s2["S2L2A"]["image"][..., :48, :48])
    with pytest.raises(ValueError, match=r"S2L2A images are \(48, 48\).*multiples of 32"):
        _objective()({"S2L2A": view})


def test_downsampling_averages_areas_and_keeps_only_fully_valid_pixels():
    image = torch.arange(64.0).reshape(1, 1, 8, 8)
    valid = torch.ones_like(image, dtype=torch.bool)
    valid[0, 0, 5, 6] = False
    image[0, 0, 5, 6] = float("nan")  # nodata must not leak into any mean
    low, low_valid = downsample(image, valid, 4)
    assert low.shape == (1, 1, 2, 2)
    assert low[0, 0, 0, 0].item() == pytest.approx(image[0, 0, :4, :4].mean().item())
    assert torch.isfinite(low).all()
    assert low_valid[0, 0].tolist() == [[True, True], [True, False]]
    half, half_valid = downsample(image, valid, 2)
    assert half.shape == (1, 1, 4, 4) and half_valid.sum().item() == 15
    assert not half_valid[0, 0, 2, 3]


def test_targets_and_predictions_at_three_scales(s2):
    objective = _objective()
    torch.manual_seed(1)
    res = objective.scales("S2L2A", s2["S2L2A"])
    assert res["input"].shape == res["pred_1x"].shape == (3, 12, 16, 16)
    assert res["target_2x"].shape == res["pred_2x"].shape == (3, 12, 32, 32)
    assert res["target_4x"].shape == res["pred_4x"].shape == (3, 12, 64, 64)
    torch.testing.assert_close(res["target_4x"], s2["S2L2A"]["image"])
    torch.testing.assert_close(
        res["target_2x"], torch.nn.functional.avg_pool2d(s2["S2L2A"]["image"], 2)
    )
    assert torch.equal(res["mask"].sum(1), torch.full((3,), 3))  # 4 patches, 1 visible


def test_loss_is_the_weighted_sum_of_three_scalar_terms(s2):
    objective = _objective()
    torch.manual_seed(1)
    out = objective(s2)
    assert set(out) == {"loss", "loss/mse_1x", "loss/l1_2x", "loss/l1_4x", "loss/S2L2A"}
    assert all(v.dim() == 0 and v.item() > 0 for v in out.values())
    expected = 0.6 * out["loss/mse_1x"] + 0.4 * (out["loss/l1_2x"] + out["loss/l1_4x"]) / 2
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_head_upsamples_each_band_alone_with_shared_weights():
    torch.manual_seed(0)
    head = MultiScaleHead()
    image = torch.randn(2, 5, 6, 6)
    x2, x4 = head(image)
    assert x2.shape == (2, 5, 12, 12) and x4.shape == (2, 5, 24, 24)
    one2, one4 = head(image[:, [3]])  # any band count; a band's output ignores the others
    torch.testing.assert_close(one2, x2[:, [3]])
    torch.testing.assert_close(one4, x4[:, [3]])


def test_absent_samples_add_nothing(s1):
    # 2 radar bands: the head takes any band count. Only `present` marks sample 1 as lacking
    # the sensor (its valid mask says otherwise), so `present` alone must keep it out.
    absent = dict(s1, present=torch.tensor([True, False, True]))
    objective = _objective()
    torch.manual_seed(1)
    out = objective({"S1GRD": absent})
    absent["image"] = s1["image"].clone()
    absent["image"][1] = torch.randn_like(s1["image"][1]) * 5
    torch.manual_seed(1)
    again = objective({"S1GRD": absent})
    for key in ("loss/mse_1x", "loss/l1_2x", "loss/l1_4x"):
        assert again[key].item() == pytest.approx(out[key].item(), rel=1e-5), key
    torch.manual_seed(1)
    counted = objective({"S1GRD": dict(absent, present=torch.ones(3, dtype=torch.bool))})
    assert counted["loss/l1_4x"].item() != pytest.approx(out["loss/l1_4x"].item(), rel=1e-3)


def test_every_parameter_gets_a_gradient_and_preview_returns_images(s2):
    objective = _objective()
    torch.manual_seed(0)
    objective(s2)["loss"].backward()
    missing = [n for n, p in objective.named_parameters() if p.grad is None]
    assert not missing, missing
    images = objective(s2, preview=True)
    assert set(images) == {"S2L2A"}
    for key in ("input", "masked", "reconstruction"):
        assert images["S2L2A"][key].shape == (3, 12, SIZE, SIZE), key
    assert torch.isfinite(images["S2L2A"]["reconstruction"]).all()


def test_loss_falls_on_a_real_s2_batch(s2):
    objective = _objective()
    opt = torch.optim.AdamW(objective.parameters(), lr=2e-3)
    losses = []
    for step in range(50):
        torch.manual_seed(step)
        loss = objective(s2)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
