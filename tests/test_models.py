"""Model zoo: every registered size builds; the spectrum-aware tokenizer handles any band set."""

from __future__ import annotations

import warnings

import pytest
import torch

from eoforge.models import UnsupportedBandError, create_model, list_models
from eoforge.models.spectral import SMARTIES_RANGES, SpectralRanges, patchify

S2_IDS = ["S2L2A:B02", "S2L2A:B03", "S2L2A:B04", "S2L2A:B08", "S2L2A:B11", "S2L2A:B12"]
S2_WL = torch.tensor([492.4, 559.8, 664.6, 832.8, 1613.7, 2202.4])
EXPECTED_WIDTHS = {
    "vit_test_patch8": 64,
    "vit_tiny_patch16": 192,
    "vit_small_patch16": 384,
    "vit_base_patch16": 768,
    "vit_large_patch16": 1024,
    "vit_huge_patch14": 1280,
}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("vit_test_patch8").eval()


def test_registry_has_every_size():
    assert set(EXPECTED_WIDTHS) <= set(list_models())
    with pytest.raises(KeyError, match="vit_nope"):
        create_model("vit_nope")


@pytest.mark.parametrize("name", sorted(EXPECTED_WIDTHS))
def test_every_registered_model_builds(name):
    with torch.device("meta"):  # no memory for the large sizes; shapes and structure only
        m = create_model(name)
    assert m.embed_dim == EXPECTED_WIDTHS[name]
    assert m.arch_name == name
    tokens = torch.zeros(2, 4, m.embed_dim, device="meta")
    assert m.encode(tokens).shape == (2, 5, m.embed_dim)


def test_every_parameter_gets_a_gradient(model):
    m = create_model("vit_test_patch8")
    out = m.forward_features(torch.randn(2, 6, 16, 16), S2_IDS, S2_WL)
    out.mean().backward()
    # Only the ranges the six bands use get gradient through the projection; all else must.
    for name, p in m.named_parameters():
        assert p.grad is not None, name
    used = m.patch_embed.weights(S2_IDS, S2_WL, m.patch_embed.weight).sum(0) > 0
    assert (m.patch_embed.weight.grad[used].abs().sum((1, 2)) > 0).all()


def test_tokenizer_equals_explicit_per_band_projection(model):
    """The single batched matmul equals S * mean_b f_pi(b)(patch_b) written as a loop."""
    pe = model.patch_embed
    x = torch.randn(2, 6, 16, 16)
    got = pe(x, S2_IDS, S2_WL)
    patches = patchify(x, 8)  # [B, C, N, 64]
    expected = torch.zeros_like(got)
    for c, (band_id, wl) in enumerate(zip(S2_IDS, S2_WL.tolist(), strict=True)):
        ((r, w),) = pe.ranges.resolve(band_id, wl).items()
        expected += w * (patches[:, c] @ pe.weight[r] + pe.bias[r])
    expected *= pe.band_scale / len(S2_IDS)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_band_permutation_leaves_pooled_output_unchanged(model):
    x = torch.randn(3, 6, 16, 16)
    perm = torch.tensor([5, 2, 0, 4, 1, 3])
    a = model.forward_features(x, S2_IDS, S2_WL).mean(1)
    b = model.forward_features(x[:, perm], [S2_IDS[i] for i in perm], S2_WL[perm]).mean(1)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_dropping_a_band_keeps_shapes(model):
    x = torch.randn(2, 6, 16, 16)
    full = model.forward_features(x, S2_IDS, S2_WL)
    fewer = model.forward_features(x[:, 1:], S2_IDS[1:], S2_WL[1:])
    assert full.shape == fewer.shape
    assert not torch.allclose(full, fewer)


def test_sar_optical_and_hyperspectral_through_one_model(model):
    s1 = model.forward_features(
        torch.randn(2, 2, 16, 16), ["S1GRD:VV", "S1GRD:VH"], torch.tensor([5.55e7] * 2)
    )
    s2 = model.forward_features(torch.randn(2, 6, 16, 16), S2_IDS, S2_WL)
    wl = torch.linspace(420, 2440, 224)
    ids = [f"ENMAP:B{i + 1:03d}" for i in range(224)]
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # EnMAP bands between ranges are interpolated (tested below)
        enmap = model.forward_features(torch.randn(2, 224, 16, 16), ids, wl)
    assert s1.shape == s2.shape == enmap.shape == (2, 5, 64)
    # VV and VH use different ranges: swapping their identities changes the tokens.
    x = torch.randn(1, 2, 16, 16)
    swapped = model.forward_features(x, ["S1GRD:VH", "S1GRD:VV"], torch.tensor([5.55e7] * 2))
    assert not torch.allclose(
        model.forward_features(x, ["S1GRD:VV", "S1GRD:VH"], torch.tensor([5.55e7] * 2)), swapped
    )


def test_out_of_range_band_uses_inverse_distance_weights_with_warning():
    ranges = SpectralRanges(SMARTIES_RANGES)
    names = [r.name for r in SMARTIES_RANGES]
    # 620 nm: 42.2 nm above S2 B03's range, 29.1 nm below B04's -> B04 must weigh MORE.
    weights = ranges.resolve("LANDSAT89:B8", 620.0)
    by_name = {names[i]: w for i, w in weights.items()}
    assert set(by_name) == {"S2_B03", "S2_B04"}
    assert by_name["S2_B04"] > by_name["S2_B03"]
    assert by_name["S2_B04"] == pytest.approx((1 / 29.1) / (1 / 29.1 + 1 / 42.2), rel=1e-3)
    with pytest.warns(UserWarning, match="LANDSAT89:B8"):
        ranges.band_weights(["LANDSAT89:B8"], [620.0])


def test_unsupported_bands_are_refused_by_name():
    ranges = SpectralRanges(SMARTIES_RANGES)
    with pytest.raises(UnsupportedBandError, match="LANDSAT89:B10"):
        ranges.resolve("LANDSAT89:B10", 10895.0)  # thermal: far from every range
    with pytest.raises(UnsupportedBandError, match="HH"):
        ranges.resolve("S1GRD:HH", 5.55e7)  # no HH range in the SMARTIES table


def test_band_in_a_range_maps_to_the_narrowest_range():
    ranges = SpectralRanges(SMARTIES_RANGES)
    names = [r.name for r in SMARTIES_RANGES]
    # B8A's 864.7 nm lies inside both B08 (779.8-885.8) and B8A (854.2-875.2).
    assert [names[i] for i in ranges.resolve("S2L2A:B8A", 864.7)] == ["S2_B8A"]
    assert [names[i] for i in ranges.resolve("RGB:R", 665.0)] == ["RGB_R"]
    assert [names[i] for i in ranges.resolve("S2L2A:B04", 664.6)] == ["S2_B04"]


ENMAP_WL = torch.linspace(420.0, 2440.0, 224)
ENMAP_IDS = [f"ENMAP:B{i + 1:03d}" for i in range(224)]


@pytest.mark.parametrize("tokenizer", ["spectral", "dofa"])
def test_one_vit_takes_s1_s2_and_enmap_with_either_band_agnostic_tokenizer(tokenizer):
    torch.manual_seed(0)
    m = create_model("vit_test_patch8", tokenizer=tokenizer).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # interpolated EnMAP bands for T1 are tested above
        shapes = {
            m.forward_features(
                torch.randn(2, 2, 16, 16), ["S1GRD:VV", "S1GRD:VH"], torch.tensor([5.55e7] * 2)
            ).shape,
            m.forward_features(torch.randn(2, 6, 16, 16), S2_IDS, S2_WL).shape,
            m.forward_features(torch.randn(2, 224, 16, 16), ENMAP_IDS, ENMAP_WL).shape,
        }
    assert shapes == {(2, 5, 64)}
    x = torch.randn(2, 6, 16, 16)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    torch.testing.assert_close(
        m.forward_features(x, S2_IDS, S2_WL).mean(1),
        m.forward_features(x[:, perm], [S2_IDS[i] for i in perm], S2_WL[perm]).mean(1),
        rtol=1e-4,
        atol=1e-5,
    )


def test_channel_group_and_adapter_tokenizers_in_the_vit():
    torch.manual_seed(0)
    groups = create_model("vit_test_patch8", tokenizer="channel_groups")
    s2 = [
        "S2L2A:B02",
        "S2L2A:B03",
        "S2L2A:B04",
        "S2L2A:B08",
        "S2L2A:B05",
        "S2L2A:B06",
        "S2L2A:B07",
        "S2L2A:B8A",
        "S2L2A:B11",
        "S2L2A:B12",
    ]
    out = groups.forward_features(torch.randn(2, 10, 16, 16), s2, torch.zeros(10))
    assert out.shape == (2, 1 + 3 * 4, 64)  # 3 groups x 4 patches + cls
    adapter = create_model("vit_test_patch8", tokenizer="spectral_adapter")
    assert adapter.forward_features(torch.randn(1, 224, 16, 16), ENMAP_IDS, ENMAP_WL).shape == (
        1,
        5,
        64,
    )


def test_gsd_and_time_reach_the_position_encoding():
    torch.manual_seed(0)
    m = create_model("vit_test_patch8", gsd_reference=10.0).eval()
    x = torch.randn(2, 6, 16, 16)
    plain = m.forward_features(x, S2_IDS, S2_WL)
    torch.testing.assert_close(
        m.forward_features(x, S2_IDS, S2_WL, gsd=torch.tensor([10.0, 10.0])), plain
    )
    coarse = m.forward_features(x, S2_IDS, S2_WL, gsd=torch.tensor([10.0, 60.0]))
    torch.testing.assert_close(coarse[0], plain[0])
    assert not torch.allclose(coarse[1], plain[1])
    t = create_model("vit_test_patch8", temporal=True).eval()
    summer, winter = (
        torch.tensor([1593561600] * 2),
        torch.tensor([1577836800] * 2),
    )  # 2020-07-01, 2020-01-01
    assert not torch.allclose(
        t.forward_features(x, S2_IDS, S2_WL, time=summer),
        t.forward_features(x, S2_IDS, S2_WL, time=winter),
    )


def test_tokenizer_is_selectable_from_a_pretraining_config():
    from eoforge.launch.config import load_config
    from eoforge.pretrain.config import PretrainConfig, find_config
    from eoforge.pretrain.objectives import build_objective

    cfg = load_config(PretrainConfig, find_config("demo"), ["model.kwargs.tokenizer=dofa"])
    encoder = create_model(cfg.model.name, **cfg.model.kwargs)
    assert type(encoder.patch_embed).__name__ == "DynamicPatchEmbed"
    # DOFA has no spectral ranges: MAE reconstructs through the wavelength-conditioned head.
    mae = build_objective(cfg.objective, encoder)
    assert type(mae.head).__name__ == "WavelengthReconstructionHead"
