"""Hyper-MAE (SPECS O3): band then patch masking, what the encoder may see, the two loss terms,
training on a real EnMAP batch with nodata, and cross-modal generation of a missing sensor."""

from __future__ import annotations

import warnings

import pytest
import torch
from real_batches import enmap_batch, paired_s1s2_batch

from eoforge.models.registry import create_model
from eoforge.pretrain.hyper_mae import HyperMAE, channel_masking
from eoforge.pretrain.mae import norm_pix
from eoforge.pretrain.objectives import objective_class

SMALL_DECODER = dict(decoder_dim=32, decoder_depth=1, decoder_heads=2)


def _view(c: int, b: int = 2, size: int = 32, seed: int = 0, offset: float = 400.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(b, c, size, size, generator=g),
        "valid": torch.rand(b, c, size, size, generator=g) > 0.1,
        "band_ids": [f"X:B{i}" for i in range(c)],
        "wavelengths": offset + 100.0 * torch.arange(c, dtype=torch.float64),
        "gsd": torch.full((b,), 10.0),
    }


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tensors here are tiny: with several threads on a shared CPU, thread start-up and
    waiting cost 10-20x the arithmetic, so these tests run on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def enmap(sample_data, tmp_path_factory) -> dict:
    """Two real EnMAP tiles, 224 bands x 32 x 32 through the data layer (water-vapour bands
    nodata), plus a scan-edge gap over every band so partly valid patches are exercised too."""
    with warnings.catch_warnings():  # the data layer reports the nodata bands it marks
        warnings.filterwarnings("ignore", message=".*nodata", category=UserWarning)
        batch = enmap_batch(sample_data, tmp_path_factory.mktemp("enmap"), size=32)
    batch["ENMAP"]["valid"][0, :, :8, :11] = False
    return batch


def _objective(seed: int = 0, **kwargs) -> HyperMAE:
    torch.manual_seed(seed)
    return HyperMAE(create_model("less_test_patch8"), **{**SMALL_DECODER, **kwargs})


def _run(objective: HyperMAE, batch: dict, seed: int = 1):
    torch.manual_seed(seed)  # the masks come from torch's RNG, as in the training loop
    return objective.reconstruct(batch)


def test_registry_and_option_errors():
    assert objective_class("hyper_mae") is HyperMAE
    encoder = create_model("less_test_patch8")
    for option, value in [
        ("channel_mask_ratio", 1.0),
        ("position_mask_ratio", 0.0),
        ("min_channels", 0),
        ("drop_sensor", 1.0),
    ]:
        with pytest.raises(ValueError, match=option):
            HyperMAE(encoder, **{option: value})
    with pytest.raises(ValueError, match="less_"):
        HyperMAE(create_model("vit_test_patch8"))
    objective = HyperMAE(encoder, **SMALL_DECODER)
    series = {**_view(3), "image": torch.randn(2, 4, 3, 32, 32)}
    with pytest.raises(ValueError, match="'TS'.*time series"):
        objective({"TS": series, "meta": {}})
    with pytest.raises(ValueError, match="'B'.*co-registered"):
        objective({"A": _view(3), "B": _view(3, size=16), "meta": {}})


@pytest.mark.parametrize("c", [2, 3, 4, 5, 7, 10, 224])
def test_channel_masking_keeps_at_least_two_bands(c):
    torch.manual_seed(c)
    has_data = torch.ones(64, c, dtype=torch.bool)
    keep, mask = channel_masking(has_data, 0.5, min_keep=2)
    expected = min(c, max(2, round(c * 0.5)))
    assert keep.shape == (64, expected) and expected >= 2
    assert torch.equal(mask.sum(1), torch.full((64,), c - expected))
    assert not mask.gather(1, keep).any()  # kept bands are exactly the unmasked ones
    assert all(len(set(row.tolist())) == expected for row in keep)
    if c >= 4:  # a random choice per sample, not one fixed set
        assert len({tuple(sorted(row.tolist())) for row in keep}) > 1


def test_channel_masking_hides_empty_bands_first():
    torch.manual_seed(0)
    has_data = torch.ones(32, 10, dtype=torch.bool)
    has_data[:, 2:8] = False  # 4 bands with data, 6 empty; 5 kept
    keep, mask = channel_masking(has_data, 0.5)
    kept_with_data = has_data.gather(1, keep).sum(1)  # [B]
    assert torch.equal(kept_with_data, torch.full((32,), 4))  # all data bands kept, 1 empty


def test_masks_have_the_configured_ratios_and_the_loss_is_their_sum(enmap):
    objective = _objective()
    r = _run(objective, enmap)
    targets = r.channel_targets["ENMAP"]  # [B, 224]
    assert torch.equal(targets.sum(1), torch.tensor([112, 112]))  # channel ratio 0.5
    assert torch.equal(r.position_mask.sum(1), torch.tensor([12, 12]))  # 16 patches, ratio 0.75
    assert r.latent.shape == (2, 112 + 1, 4 + 1, 48)  # visible bands x visible patches + cls
    # EnMAP's empty water-vapour bands are hidden before any band with data.
    has_data = enmap["ENMAP"]["valid"].flatten(2).any(2)  # [B, 224]
    assert not (~targets & ~has_data).any()
    seen = r.seen["ENMAP"]  # [B, C, N]
    assert torch.equal(seen.any(2), ~targets)  # every kept band is seen at some patch

    with torch.no_grad():
        torch.manual_seed(1)
        out = objective(enmap)
    assert set(out) == {"loss", "loss/position", "loss/channel", "loss/ENMAP"}
    assert out["loss/position"] > 0 and out["loss/channel"] > 0
    torch.testing.assert_close(out["loss"], out["loss/position"] + out["loss/channel"])
    torch.testing.assert_close(out["loss/position"], r.loss_position)
    torch.testing.assert_close(out["loss/channel"], r.loss_channel)


def test_encoder_never_sees_masked_tokens(enmap):
    objective = _objective().eval()
    view = enmap["ENMAP"]
    with torch.no_grad():
        r = _run(objective, enmap)
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(view["image"].shape, generator=g)  # [B, C, H, W]
        patch_mask = r.position_mask.reshape(2, 1, 4, 1, 4, 1).expand(2, 1, 4, 8, 4, 8)
        patch_mask = patch_mask.reshape(2, 1, 32, 32)  # [B, 1, H, W] masked patches
        masked_band = r.channel_targets["ENMAP"][:, :, None, None]  # [B, C, 1, 1]
        for hidden in (masked_band, patch_mask, masked_band | patch_mask):
            changed = {**view, "image": torch.where(hidden, view["image"] + noise, view["image"])}
            again = _run(objective, {"ENMAP": changed})
            torch.testing.assert_close(again.latent, r.latent, atol=0, rtol=0)
        # The check can fail: a visible band at a visible patch does reach the encoder.
        seen = ~masked_band & ~patch_mask
        changed = {**view, "image": torch.where(seen, view["image"] + noise, view["image"])}
        assert (_run(objective, {"ENMAP": changed}).latent - r.latent).abs().amax() > 1e-3


def test_nodata_pixels_never_count(enmap):
    """Whatever the file holds at invalid pixels changes neither the loss nor the predictions:
    the encoder zeroes them and the norm-pix statistics and errors use valid pixels only."""
    objective = _objective().eval()
    view = enmap["ENMAP"]
    assert not view["valid"].all()
    with torch.no_grad():
        r = _run(objective, enmap)
        g = torch.Generator().manual_seed(0)
        junk = torch.where(
            view["valid"], view["image"], 1e3 * torch.randn(view["image"].shape, generator=g)
        )
        again = _run(objective, {"ENMAP": {**view, "image": junk}})
    torch.testing.assert_close(again.loss_position, r.loss_position)
    torch.testing.assert_close(again.loss_channel, r.loss_channel)
    torch.testing.assert_close(again.predictions["ENMAP"], r.predictions["ENMAP"])


def test_every_parameter_gets_a_gradient():
    objective = _objective()
    batch = {"X": _view(6), "Y": _view(3, seed=1, offset=3000.0), "meta": {}}
    objective(batch)["loss"].backward()
    for name, p in objective.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_loss_falls_on_a_real_enmap_batch(enmap):
    objective = _objective()
    optimizer = torch.optim.AdamW(objective.parameters(), lr=2e-3, weight_decay=0.0)

    def evaluate() -> dict:
        with torch.no_grad():
            torch.manual_seed(12345)  # the same masks before and after training
            return objective(enmap)

    before = evaluate()
    assert all(torch.isfinite(v) for v in before.values())
    for step in range(50):
        torch.manual_seed(step)
        losses = objective(enmap)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    after = evaluate()
    assert after["loss"] < 0.8 * before["loss"], (before, after)
    assert after["loss/position"] < before["loss/position"]
    assert after["loss/channel"] < before["loss/channel"]


@pytest.fixture(scope="module")
def s1s2(sample_data, tmp_path_factory) -> dict:
    """Two real co-registered BigEarthNet tiles through the data layer: "S2L2A" [2, 12, 32, 32]
    and "S1GRD" [2, 2, 32, 32], both present in both samples."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)
        return paired_s1s2_batch(sample_data, tmp_path_factory.mktemp("s1s2"), size=32)


def _two_sensors(batch: dict, missing: int | None = 1) -> dict:
    """A copy of the paired batch; sample ``missing`` lacks the radar, as the data layer delivers
    an absent sensor (present False, zeros, nothing valid)."""
    out = {k: (dict(v) if k != "meta" else v) for k, v in batch.items()}
    radar = out["S1GRD"]
    radar.update({k: radar[k].clone() for k in ("image", "valid", "present")})
    if missing is not None:
        radar["present"][missing] = False
        radar["image"][missing] = 0.0
        radar["valid"][missing] = False
    out["S2L2A"] = {**out["S2L2A"], "image": out["S2L2A"]["image"].clone()}
    return out


def test_a_missing_sensor_is_generated_from_the_other(s1s2):
    objective = _objective().eval()
    batch = _two_sensors(s1s2, missing=1)
    with torch.no_grad():
        r = _run(objective, batch)
        # Sample 1 lacks the radar: all its bands are targets at every patch, none was seen.
        assert r.channel_targets["S1GRD"][1].all() and not r.seen["S1GRD"][1].any()
        # Sample 0 has it: 2 bands, both kept (min 2), seen at the visible patches.
        assert not r.channel_targets["S1GRD"][0].any()
        assert torch.equal(r.seen["S1GRD"][0].any(0), ~r.position_mask[0])
        assert r.predictions["S1GRD"].shape == (2, 2, 16, 64)
        assert torch.isfinite(r.predictions["S1GRD"]).all()

        # Whatever the missing radar's array holds changes nothing.
        filled = _two_sensors(s1s2, missing=1)
        filled["S1GRD"]["image"][1] = torch.randn(2, 32, 32)
        again = _run(objective, filled)
        torch.testing.assert_close(again.predictions["S1GRD"], r.predictions["S1GRD"])
        torch.testing.assert_close(again.loss_channel, r.loss_channel)

        # The generated radar comes from the optical tokens of the same sample.
        moved = _two_sensors(s1s2, missing=1)
        moved["S2L2A"]["image"][1] += torch.randn(12, 32, 32)
        generated = _run(objective, moved).predictions["S1GRD"]
        assert (generated[1] - r.predictions["S1GRD"][1]).abs().amax() > 1e-3
        torch.testing.assert_close(generated[0], r.predictions["S1GRD"][0])

        preview = objective(batch, preview=True)
    assert preview["S1GRD"]["reconstruction"].shape == (2, 2, 32, 32)
    assert preview["S1GRD"]["masked"][1].abs().sum() == 0  # nothing of it was shown
    assert torch.isfinite(preview["S1GRD"]["reconstruction"]).all()


def test_terms_are_averaged_over_the_sensors_that_have_targets(s1s2):
    objective = _objective()
    with torch.no_grad():
        r = _run(objective, _two_sensors(s1s2, missing=None))
    # 2 radar bands, both kept: no channel target, so the channel term is the optical one alone.
    assert r.sensor_channel["S1GRD"] == 0 and r.sensor_channel["S2L2A"] > 0
    torch.testing.assert_close(r.loss_channel, r.sensor_channel["S2L2A"])
    assert r.sensor_position["S1GRD"] > 0 and r.sensor_position["S2L2A"] > 0
    expected = (r.sensor_position["S2L2A"] + r.sensor_position["S1GRD"]) / 2
    torch.testing.assert_close(r.loss_position, expected)


def test_norm_pix_statistics_come_from_valid_pixels_only():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(3, 64, generator=g) * 5 + 2
    valid = torch.rand(3, 64, generator=g) > 0.4
    mean, std = norm_pix(target.masked_fill(~valid, 0.0), valid)
    for row in range(3):
        pixels = target[row][valid[row]]
        torch.testing.assert_close(mean[row, 0], pixels.mean())
        torch.testing.assert_close(std[row, 0], (pixels.var() + 1e-6).sqrt())


def test_drop_sensor_trains_generation_on_real_targets(s1s2):
    """Hiding a present sensor makes all of its bands channel targets, with pixels to score."""
    batch = _two_sensors(s1s2, missing=None)
    kept = _objective()
    r = _run(kept, batch)
    assert not r.channel_targets["S1GRD"].any()  # 2 radar bands: never masked by the ratio
    dropped = _objective(drop_sensor=0.999)
    r = _run(dropped, batch)
    hidden = [
        r.channel_targets[s].all(1) & ~r.seen[s].flatten(1).any(1) for s in ("S2L2A", "S1GRD")
    ]  # [B] each: the sensor hidden in that sample
    assert torch.equal(hidden[0] ^ hidden[1], torch.tensor([True, True]))  # exactly one each
    # The dropped sensor's channel term now has targets; the loss reflects them.
    with torch.no_grad():
        torch.manual_seed(1)
        out = dropped(batch)
    assert out["loss/channel"] > 0
    torch.testing.assert_close(out["loss"], out["loss/position"] + out["loss/channel"])
