"""timm interop and parameter counts: the ViT trunk maps to and from timm's ViT-B/16 both ways."""

from __future__ import annotations

import pytest
import timm
import torch

from eoforge.models import create_model
from eoforge.models.timm_interop import load_timm_trunk, to_timm_state_dict

PUBLISHED_MILLIONS = {  # ViT-B/16, L/16, H/14 as published (Dosovitskiy et al. 2021)
    ("vit_base_patch16", "vit_base_patch16_224"): 86,
    ("vit_large_patch16", "vit_large_patch16_224"): 307,
    ("vit_huge_patch14", "vit_huge_patch14_224"): 632,
}


def _timm_trunk_out(model, x):
    x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
    return model.norm(model.blocks(x))


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    theirs = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    ours = create_model("vit_base_patch16").eval()
    return ours, theirs


def test_timm_to_eoforge(pair):
    ours, theirs = pair
    skipped = load_timm_trunk(ours, theirs.state_dict())
    assert set(skipped) == {
        "pos_embed",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        "head.weight",
        "head.bias",
    }
    tokens = torch.randn(2, 20, 768)
    with torch.no_grad():
        torch.testing.assert_close(
            ours.encode(tokens), _timm_trunk_out(theirs, tokens), rtol=1e-4, atol=1e-4
        )


def test_eoforge_to_timm(pair):
    ours, _ = pair
    torch.manual_seed(1)
    fresh = create_model("vit_base_patch16").eval()  # different weights from the fixture's
    theirs = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    result = theirs.load_state_dict(to_timm_state_dict(fresh.state_dict()), strict=False)
    assert set(result.missing_keys) == {
        "pos_embed",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        "head.weight",
        "head.bias",
    }
    assert not result.unexpected_keys
    tokens = torch.randn(2, 20, 768)
    with torch.no_grad():
        torch.testing.assert_close(
            fresh.encode(tokens), _timm_trunk_out(theirs, tokens), rtol=1e-4, atol=1e-4
        )


@pytest.mark.parametrize(("names", "millions"), PUBLISHED_MILLIONS.items())
def test_trunk_parameter_counts_match_timm_and_published(names, millions):
    ours_name, timm_name = names
    with torch.device("meta"):
        ours = create_model(ours_name)
        theirs = timm.create_model(timm_name, pretrained=False)
    trunk = sum(p.numel() for k, p in ours.named_parameters() if not k.startswith("patch_embed."))
    timm_trunk = sum(
        p.numel()
        for k, p in theirs.named_parameters()
        if k.startswith(("blocks.", "norm.", "cls_token"))
    )
    assert trunk == timm_trunk
    # Published counts include the RGB patch embedding and position table (< 1.5 M).
    assert abs(trunk / 1e6 - millions) / millions < 0.02, trunk
