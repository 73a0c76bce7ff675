"""The MAE family's reconstruction terms read valid pixels only: norm-pix statistics, loss and
encoder input ignore whatever value a nodata pixel holds (issue 17, point 6)."""

from __future__ import annotations

import pytest
import torch
from real_batches import paired_s1s2_batch

from eoforge.models import create_model
from eoforge.pretrain.croma import CROMA
from eoforge.pretrain.mae import MAE, norm_pix
from eoforge.pretrain.mixup_mae import MixupMAE
from eoforge.pretrain.multiscale_mae import MultiScaleMAE
from eoforge.pretrain.selective_mae import SelectiveMAE

SIZE = 32  # 4 x 4 patches of vit_test_patch8; multi-scale MAE needs a multiple of 4 x 8
DECODER = dict(decoder_dim=32, decoder_depth=1, decoder_heads=4)
OBJECTIVES = {
    "mae": lambda enc: MAE(enc, **DECODER),
    "selective_mae": lambda enc: SelectiveMAE(enc, **DECODER),
    "multiscale_mae": lambda enc: MultiScaleMAE(enc, **DECODER),
    "croma": lambda enc: CROMA(enc, cross_depth=1, proj_dim=32, **DECODER),
    "mixup_mae": lambda enc: MixupMAE(enc, sensors=["S2L2A", "S1GRD"], **DECODER),
}
PAIRED = {"croma", "mixup_mae"}


@pytest.fixture(scope="module")
def paired(sample_data, tmp_path_factory) -> dict:
    """Real BigEarthNet S2 L2A tiles and their S1 partners, 32 x 32 pixels, B = 2, with the
    left half of every top-left patch of both sensors marked nodata."""
    batch = paired_s1s2_batch(
        sample_data, tmp_path_factory.mktemp("pairs"), size=SIZE, batch_size=2
    )
    for sensor in ("S2L2A", "S1GRD"):
        valid = batch[sensor]["valid"].clone()
        valid[..., :8, :4] = False  # [B, C, H, W]: half of patch 0 of every band
        batch[sensor] = dict(batch[sensor], valid=valid)
    return batch


def _filled(batch: dict, value: float) -> dict:
    """The batch with every nodata pixel set to ``value``."""
    return {
        s: v if s == "meta" else dict(v, image=v["image"].masked_fill(~v["valid"], value))
        for s, v in batch.items()
    }


def test_norm_pix_statistics_come_from_valid_pixels():
    target = torch.tensor([[1.0, 3.0, 0.0, 0.0]])  # the last two pixels are nodata
    valid = torch.tensor([[True, True, False, False]])
    mean, std = norm_pix(target, valid)
    assert mean.item() == 2.0
    assert std.item() == pytest.approx((2.0 + 1e-6) ** 0.5)  # unbiased variance of {1, 3}


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_loss_is_unchanged_by_nodata_values(paired, name):
    """The same step (same weights and draws) on a half-nodata patch filled with 0 and with 1e4
    gives the identical loss; without nodata (every pixel valid) it differs, so the fill is in a
    patch the loss reads."""
    torch.manual_seed(0)
    objective = OBJECTIVES[name](create_model("vit_test_patch8"))
    batch = paired if name in PAIRED else {"S2L2A": paired["S2L2A"], "meta": paired["meta"]}

    def loss(b: dict) -> torch.Tensor:
        torch.manual_seed(1)  # masks and mixup choices from torch's RNG, as in the loop
        return objective(b)["loss"].detach()

    zeros = loss(_filled(batch, 0.0))
    assert torch.isfinite(zeros)
    assert torch.equal(zeros, loss(_filled(batch, 1e4)))
    all_valid = {
        s: dict(v, valid=torch.ones_like(v["valid"])) if s != "meta" else v
        for s, v in _filled(batch, 1e4).items()
    }
    assert not torch.equal(zeros, loss(all_valid))
