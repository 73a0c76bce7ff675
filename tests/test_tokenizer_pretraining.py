"""Every tokenizer with one token per patch can be pretrained by the MAE family: DOFA's
hypernetwork on real Sentinel-2 tiles and the spectral adapter on real EnMAP tiles, through the
wavelength-conditioned reconstruction head; the loss falls for each (objective, tokenizer)."""

from __future__ import annotations

import pytest
import torch
from real_batches import enmap_batch, s2_batch

from eoforge.models import create_model
from eoforge.models.reconstruction import WavelengthReconstructionHead, wavelength_code
from eoforge.models.spectral import SpectralReconstructionHead
from eoforge.pretrain.objectives import objective_class

SMALL = {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 4}


@pytest.fixture(scope="module")
def batches(sample_data, tmp_path_factory):
    """{(tokenizer, side): batch}: 32-px tiles (16 patches), and 64-px ones for multi-scale MAE,
    whose encoder sees the image at a quarter of its side."""
    out = tmp_path_factory.mktemp("tokenizer_batches")
    found = {}
    for size in (32, 64):
        found["dofa", size] = s2_batch(sample_data, out / f"s2_{size}", size=size, batch_size=2)
        found["spectral_adapter", size] = enmap_batch(
            sample_data, out / f"enmap_{size}", size=size, batch_size=2
        )
    return found


def build(objective: str, tokenizer: str, **kwargs):
    torch.manual_seed(0)
    encoder = create_model("vit_test_patch8", tokenizer=tokenizer)
    return objective_class(objective)(encoder, **SMALL, **kwargs)


def test_the_head_follows_the_tokenizer():
    assert isinstance(build("mae", "spectral").head, SpectralReconstructionHead)
    assert isinstance(build("mae", "dofa").head, WavelengthReconstructionHead)
    with pytest.raises(ValueError, match="channel_groups tokenizer makes one per band group"):
        build("mae", "channel_groups")


def test_wavelength_codes_tell_optical_and_radar_bands_apart():
    codes = wavelength_code(torch.tensor([490.0, 492.4, 842.0, 5.547e7]))
    assert not torch.allclose(codes[0], codes[1])  # 2.4 nm apart
    cos = torch.nn.functional.cosine_similarity(codes[:, None], codes[None], dim=-1)
    assert cos[0, 3] < 0.9 and cos[2, 3] < 0.9  # radar is not aliased onto an optical band


@pytest.mark.parametrize("objective", ["mae", "selective_mae", "multiscale_mae"])
@pytest.mark.parametrize("tokenizer", ["dofa", "spectral_adapter"])
def test_loss_falls_on_real_shards(batches, objective, tokenizer):
    # Raw (not norm-pix) targets: within a few dozen steps a model learns each band's level and
    # texture, where norm-pix targets first plateau near their unit variance (so does the
    # spectral tokenizer's head); multi-scale MAE has raw targets anyway.
    options = {} if objective == "multiscale_mae" else {"norm_pix": False}
    model = build(objective, tokenizer, **options)
    batch = batches[tokenizer, 64 if objective == "multiscale_mae" else 32]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(40):
        torch.manual_seed(step)
        if hasattr(model, "set_progress"):
            model.set_progress(step / 40)
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(round(loss.item(), 4))
    assert all(torch.isfinite(torch.tensor(losses)))
    # Selective MAE picks other patches as its phases change: compare ten-step means.
    assert sum(losses[-10:]) / 10 < 0.85 * sum(losses[:10]) / 10, losses
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
