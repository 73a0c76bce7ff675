"""Instance contrast (MoCo-v2 on two augmented views of one image) on real EuroSAT images: the
momentum copy, the queue, the band jitter, and a loss that falls."""

from __future__ import annotations

import re

import pytest
import torch

from eoforge.datasets.eurosat import load_eurosat
from eoforge.models import create_model
from eoforge.pretrain.contrastive import collapse_warnings
from eoforge.pretrain.instance_contrast import InstanceContrast, jitter_bands
from eoforge.pretrain.objectives import objective_class

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")


@pytest.fixture(scope="module")
def batches(sample_data):
    """Real EuroSAT views: RGB (S2RGB8) and MS (13 S2L1C bands, B8A last), 16 images each."""
    out = {}
    for sensor, folder in (("S2RGB8", "eurosat_rgb"), ("S2L1C", "eurosat_ms_subset")):
        split = load_eurosat(sample_data / folder, labels_per_class=2, seed=0)
        images = torch.from_numpy(split.x_train[:16, :, :32, :32])  # [16, C, 32, 32]
        out[sensor] = {
            sensor: {
                "image": images,
                "band_ids": split.band_ids,
                "wavelengths": torch.as_tensor(split.wavelengths),
                "gsd": torch.full((16,), 10.0),
            },
            "meta": {},
        }
    return out


def _moco(**kwargs) -> InstanceContrast:
    torch.manual_seed(0)
    return InstanceContrast(create_model("vit_test_patch8"), **({"queue_size": 32} | kwargs))


def test_registered_with_a_shipped_config():
    assert objective_class("instance_contrast") is InstanceContrast


def test_band_jitter_scales_bands_and_sometimes_averages_them():
    images = torch.randn(64, 5, 4, 4)
    torch.manual_seed(0)
    out = jitter_bands(images, gain=0.4, p_mean=0.5)
    ratio = out / images  # per sample and band: the gain, unless the sample was averaged
    grey = (out == out[:, :1]).all(dim=(1, 2, 3))
    assert 10 < grey.sum() < 54  # about half of 64
    gains = ratio[~grey].flatten(2).median(dim=2).values  # [n, C]
    assert gains.min() >= 0.6 - 1e-5 and gains.max() <= 1.4 + 1e-5 and gains.std() > 0.05
    assert torch.equal(jitter_bands(images, 0.0, 0.0), images)


@pytest.mark.parametrize("sensor", ["S2RGB8", "S2L1C"])
def test_every_parameter_gets_a_gradient(batches, sensor):
    moco = _moco()
    out = moco(batches[sensor])
    assert set(out) == {"loss", "positive_cosine", "collapse/std", "collapse/mean_cosine"}
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    missing = [n for n, p in moco.named_parameters() if p.grad is None]
    assert not missing, missing
    assert moco(batches[sensor], preview=True) == {}


def test_crops_can_be_smaller_than_the_image(batches):
    moco = _moco(crop_size=16)
    view = batches["S2RGB8"]["S2RGB8"]
    assert moco.augment(view["image"]).shape == (16, 3, 16, 16)
    assert torch.isfinite(moco(batches["S2RGB8"])["loss"])
    with pytest.raises(ValueError, match="crop_size=12"):
        _moco(crop_size=12)  # not a multiple of the patch size 8


def test_momentum_copy_queue_and_state(batches):
    moco = _moco(momentum=0.9)
    key = moco.key_model
    trainable = {id(p) for p in moco.parameters()}
    assert all(id(p) not in trainable and not p.requires_grad for p in key.parameters())
    q0 = moco.encoder.blocks[0].attn.qkv.weight.detach().clone()
    moco(batches["S2RGB8"])["loss"].backward()
    with torch.no_grad():
        moco.encoder.blocks[0].attn.qkv.weight.add_(1.0)
    moco(batches["S2RGB8"])
    k1 = key["encoder"].blocks[0].attn.qkv.weight
    assert torch.equal(k1, q0)  # a forward pass leaves the copy alone
    moco.after_optimizer_step()  # the training loop's hook, once per optimizer step
    assert torch.allclose(k1, 0.9 * q0 + 0.1 * (q0 + 1.0), atol=1e-6)  # EMA, m = 0.9
    assert moco.queue.ptr.item() == 0  # two steps of 16 keys filled the queue of 32
    restored = _moco(momentum=0.9)
    restored.load_state_dict(moco.state_dict())
    for a, b in zip(restored.key_model.parameters(), key.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(restored.queue.keys, moco.queue.keys)


def test_absent_samples_enter_neither_loss_nor_queue(batches):
    moco = _moco()
    view = dict(batches["S2RGB8"]["S2RGB8"], present=torch.tensor([True] * 4 + [False] * 12))
    moco({"S2RGB8": view, "meta": {}})
    assert moco.queue.ptr.item() == 4


def test_time_series_views_are_refused(batches):
    view = batches["S2RGB8"]["S2RGB8"]
    series = dict(view, image=torch.stack([view["image"]] * 2, dim=1))
    with pytest.raises(ValueError, match="seasonal_contrast"):
        _moco()({"S2RGB8": series, "meta": {}})


def test_loss_falls_on_real_images(sample_data):
    """Two disjoint batches of real RGB images in turn, so the queue's negatives are always other
    images; mild augmentations, so the pretext task is learnable within a few dozen steps."""
    split = load_eurosat(sample_data / "eurosat_rgb", labels_per_class=4, seed=0)
    batches = [
        {
            "S2RGB8": {
                "image": torch.from_numpy(split.x_train[k::2][:16, :, :32, :32]),
                "band_ids": split.band_ids,
                "wavelengths": torch.as_tensor(split.wavelengths),
                "gsd": torch.full((16,), 10.0),
            },
            "meta": {},
        }
        for k in range(2)
    ]
    moco = _moco(
        queue_size=16, momentum=0.9, min_crop_scale=0.8, brightness=0.1, band_jitter=0.1,
        p_mean_bands=0.0,
    )  # fmt: skip
    opt = torch.optim.AdamW(moco.parameters(), lr=1e-3)
    losses = []
    for step in range(40):
        torch.manual_seed(step)
        loss = moco(batches[step % 2])["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        moco.after_optimizer_step()  # the training loop's hook
        losses.append(round(loss.item(), 3))
    # Step 0's negatives are the queue's random start; from step 1 on they are real keys.
    # Each query comes to pick its own key out of them.
    assert sum(losses[-6:]) / 6 < 0.6 * sum(losses[1:7]) / 6, losses


def test_collapse_is_measured_and_warned(batches):
    """Identical images with augmentations off (flips remain) embed onto nearly one vector:
    collapse/std reads near 0 and the training loop's check names the statistic; real images
    spread the embeddings."""
    moco = _moco(min_crop_scale=1.0, brightness=0.0, band_jitter=0.0, p_mean_bands=0.0)
    view = batches["S2RGB8"]["S2RGB8"]
    same = dict(view, image=view["image"][:1].expand_as(view["image"]).contiguous())
    with torch.no_grad():
        collapsed = moco({"S2RGB8": same, "meta": {}})
        spread = moco(batches["S2RGB8"])
    assert collapsed["collapse/std"] < 0.05 and collapsed["collapse/mean_cosine"] > 0.99
    assert spread["collapse/std"] > collapsed["collapse/std"]
    values = {k: float(v) for k, v in collapsed.items()}
    [message] = collapse_warnings(values, step=7)
    assert re.match(r"collapse/std = 0\.0\d\d at step 7, below 0\.1: the embeddings", message)
    assert not collapse_warnings({"loss": 0.0, "croma/collapse/std_radar": 0.5}, step=7)
    assert collapse_warnings({"croma/collapse/std_radar": 0.05}, step=7)
