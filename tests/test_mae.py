"""MAE objective (SPECS O1): masking, the per-band norm-pix loss on masked patches, learning."""

from __future__ import annotations

import torch

from eoforge.launch.run_logging import false_colour_bands, reconstruction_grid
from eoforge.models import create_model
from eoforge.models.spectral import patchify
from eoforge.pretrain.mae import MAE, random_masking

IDS = ["S2L2A:B02", "S2L2A:B03", "S2L2A:B04", "S2L2A:B08"]
WL = torch.tensor([492.4, 559.8, 664.6, 832.8])


def _mae(**kwargs) -> MAE:
    torch.manual_seed(0)
    return MAE(
        create_model("vit_test_patch8"), decoder_dim=32, decoder_depth=1, decoder_heads=4, **kwargs
    )


def _batch(b=4, c=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Smooth images (low-frequency structure) so there is something to learn.
    coarse = torch.randn(b, c, size // 8, size // 8, generator=g)
    image = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")
    return {
        "S2L2A": {
            "image": image,
            "valid": torch.ones_like(image, dtype=torch.bool),
            "band_ids": IDS[:c],
            "wavelengths": WL[:c].expand(b, -1),
        },
        "meta": {"id": [str(i) for i in range(b)]},
    }


def test_random_masking_keeps_a_quarter_per_sample():
    torch.manual_seed(0)
    keep, mask = random_masking(3, 16, 0.75, "cpu")
    assert keep.shape == (3, 4)
    assert mask.shape == (3, 16) and (mask.sum(1) == 12).all()
    assert (mask.gather(1, keep) == 0).all()
    assert len({tuple(k.sort().values.tolist()) for k in keep}) > 1  # per-sample masks differ


def test_loss_counts_only_masked_valid_pixels_per_band():
    mae = _mae()
    images = torch.randn(2, 4, 16, 16)
    target = patchify(images, 8)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    mask = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    valid = torch.ones_like(images, dtype=torch.bool)
    pred = target.clone()
    pred[:, :, :, :] += (1 - mask)[:, None, :, None] * 100.0  # wrong only on visible patches
    assert mae.loss(images, valid, pred, mask).item() < 1e-6
    pred = target.clone()
    pred[0, 2, 0] += 1.0  # error of 1 on every pixel of band 2's one masked patch in sample 0
    # Band 2 has 2 masked patches x 64 pixels; one is off by 1 -> band loss 0.5; mean over 4 bands.
    assert abs(mae.loss(images, valid, pred, mask).item() - 0.5 / 4) < 1e-5
    valid[0, 2, :8, :8] = False  # the bad patch is nodata: it must not count
    assert mae.loss(images, valid, pred, mask).item() < 1e-6


def test_mae_learns_on_a_fixed_batch():
    mae = _mae()
    batch = _batch()
    opt = torch.optim.AdamW(mae.parameters(), lr=2e-3)
    losses = []
    for step in range(60):
        torch.manual_seed(step)
        loss = mae(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


def test_every_parameter_gets_a_gradient_through_mae():
    mae = _mae()
    mae(_batch())["loss"].backward()
    missing = [n for n, p in mae.named_parameters() if p.grad is None]
    assert not missing


def test_preview_gives_input_masked_and_reconstruction_grid():
    mae = _mae()
    images = mae(_batch(b=3), preview=True)["S2L2A"]
    for key in ("input", "masked", "reconstruction"):
        assert images[key].shape == (3, 4, 32, 32)
    # Visible patches of the reconstruction are the input itself.
    visible = images["masked"] != 0
    torch.testing.assert_close(images["reconstruction"][visible], images["input"][visible])
    grid = reconstruction_grid(images)
    assert grid.shape[0] == 3 and grid.min() >= 0 and grid.max() <= 1


def test_false_colour_picks_true_colour_or_sar_composite():
    assert false_colour_bands(IDS, WL.tolist()) == [2, 1, 0]
    assert false_colour_bands(["S1GRD:VH", "S1GRD:VV"], [5.5e7, 5.5e7]) == [1, 0, 1]
