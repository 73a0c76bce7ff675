"""Tokenizers: DOFA dynamic patch embedding, SatMAE channel groups, SpectralEarth adapter."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from eoforge.datasets.sensors import get_sensor
from eoforge.models.channel_groups import (
    ChannelGroupPatchEmbed,
    MissingBandError,
    group_code_dim,
    normalise_band_name,
)
from eoforge.models.dofa import DynamicPatchEmbed
from eoforge.models.pos_embed import sincos_1d, sincos_2d
from eoforge.models.spectral import UnsupportedBandError
from eoforge.models.spectral_adapter import MIN_BANDS, SpectralAdapterPatchEmbed

P, D = 4, 32


def bands(sensor: str, names: list[str] | None = None) -> tuple[list[str], torch.Tensor]:
    """band_ids and wavelengths [C] of a registered sensor (all bands, or those named)."""
    table = get_sensor(sensor).bands
    chosen = [b for b in table if names is None or b.name in names]
    return [b.band_id for b in chosen], torch.tensor([b.wavelength for b in chosen])


def images(channels: int, size: int = 8, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def hypernet() -> DynamicPatchEmbed:
    torch.manual_seed(0)
    return DynamicPatchEmbed(patch_size=P, embed_dim=D)


# --- the tokenizer contract, shared by all three ---------------------------------------------


@pytest.mark.parametrize(
    ("cls", "sensor"),
    [
        (DynamicPatchEmbed, "S2L2A"),
        (ChannelGroupPatchEmbed, "S2L2A"),
        (SpectralAdapterPatchEmbed, "ENMAP"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tokenizer_contract(cls, sensor, dtype):
    tokenizer = cls(patch_size=P, embed_dim=D).to(dtype)
    band_ids, wavelengths = bands(sensor)
    x = images(len(band_ids), size=8)  # float32, as the data layer delivers
    tokens = tokenizer(x, band_ids, wavelengths.expand(2, -1))  # [B, C] wavelengths
    n = tokenizer.tokens_per_patch * 2 * 2
    assert tokens.shape == (2, n, D) and tokens.dtype == dtype
    assert (tokenizer.patch_size, tokenizer.embed_dim) == (P, D)
    pos = tokenizer.positions(2, 2, tokens)
    assert pos.shape == (n, D) and pos.dtype == dtype


# --- DOFA dynamic patch embedding ------------------------------------------------------------


def test_hypernet_band_permutation_leaves_tokens_unchanged(hypernet):
    band_ids, wavelengths = bands("S2L2A")
    x = images(len(band_ids))
    perm = torch.randperm(len(band_ids), generator=torch.Generator().manual_seed(1))
    permuted = hypernet(x[:, perm], [band_ids[i] for i in perm], wavelengths[perm])
    assert torch.allclose(permuted, hypernet(x, band_ids, wavelengths), atol=1e-5)


def test_hypernet_one_instance_takes_s1_s2_and_enmap(hypernet):
    for sensor in ("S1GRD", "S2L2A", "ENMAP"):
        band_ids, wavelengths = bands(sensor)
        tokens = hypernet(images(len(band_ids)), band_ids, wavelengths)
        assert tokens.shape == (2, 4, D) and torch.isfinite(tokens).all(), sensor
    s1_ids, s1_wl = bands("S1GRD", ["VV", "VH"])
    vv, vh = hypernet.band_codes(s1_ids, s1_wl)
    assert not torch.allclose(vv, vh)  # same radar wavelength, told apart by polarisation


def test_hypernet_dropping_a_band_keeps_the_shape(hypernet):
    band_ids, wavelengths = bands("S2L2A")
    x = images(len(band_ids))
    full = hypernet(x, band_ids, wavelengths)
    dropped = hypernet(x[:, 1:], band_ids[1:], wavelengths[1:])
    assert dropped.shape == full.shape and not torch.allclose(dropped, full)


def test_hypernet_every_parameter_gets_a_gradient(hypernet):
    loss = 0
    for sensor in ("S2L2A", "S1GRD"):
        band_ids, wavelengths = bands(sensor)
        loss = loss + hypernet(images(len(band_ids)), band_ids, wavelengths).square().mean()
    loss.backward()
    for name, param in hypernet.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_hypernet_kernel_and_bias_scaled_by_a_hundredth(hypernet):
    raw = {}
    generator = hypernet.weight_generator
    generator.fc_weight.register_forward_hook(lambda m, i, o: raw.__setitem__("weight", o))
    generator.fc_bias.register_forward_hook(lambda m, i, o: raw.__setitem__("bias", o))
    band_ids, wavelengths = bands("S2L2A", ["B02", "B03", "B04"])
    kernel, bias = hypernet.generate(band_ids, wavelengths)
    assert kernel.shape == (D, 3, P, P)
    expected = raw["weight"].reshape(3, P, P, D).permute(3, 0, 1, 2) * 0.01
    assert torch.allclose(kernel, expected) and torch.allclose(bias, raw["bias"] * 0.01)
    x = images(3)
    conv = F.conv2d(x, kernel, bias, stride=P).flatten(2).transpose(1, 2)
    assert torch.allclose(hypernet(x, band_ids, wavelengths), conv, atol=1e-6)


def test_hypernet_warns_for_untrained_bands_only_when_told(hypernet):
    band_ids, wavelengths = bands("S2L2A", ["B02", "B05"])
    x = images(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hypernet(x, band_ids, wavelengths)  # trained_bands unset: no check
    hypernet.trained_bands = {"S2L2A:B02"}
    with pytest.warns(UserWarning, match="S2L2A:B05") as record:
        hypernet(x, band_ids, wavelengths)
    assert "S2L2A:B02" not in str(record[0].message)


@pytest.mark.parametrize(
    ("band_id", "wavelength"),
    [("S1GRD:RH", 5.5e7), ("LANDSAT89:FARIR", 2e5), ("BROKEN:B1", 0.0)],
)
def test_hypernet_refuses_bands_it_cannot_code(hypernet, band_id, wavelength):
    with pytest.raises(UnsupportedBandError, match=band_id):
        hypernet(images(2), ["S2L2A:B02", band_id], torch.tensor([492.4, wavelength]))


# --- SatMAE channel groups -------------------------------------------------------------------


@pytest.fixture
def grouped() -> ChannelGroupPatchEmbed:
    torch.manual_seed(0)
    return ChannelGroupPatchEmbed(patch_size=P, embed_dim=D)


def test_band_name_normaliser():
    names = ["b2", "B02", "B8A", "B08A", "b8a", "B12", "VV"]
    assert [normalise_band_name(n) for n in names] == [
        "B02", "B02", "B8A", "B8A", "B8A", "B12", "VV"
    ]  # fmt: skip


def test_one_token_per_group_from_that_groups_bands(grouped):
    band_ids, wavelengths = bands("S2L2A")  # B01 and B09 belong to no group: ignored
    x = images(len(band_ids))
    tokens = grouped(x, band_ids, wavelengths)
    assert tokens.shape == (2, 3 * 4, D) and grouped.tokens_per_patch == 3
    red_edge = [band_ids.index(f"S2L2A:{b}") for b in ("B05", "B06", "B07", "B8A")]
    expected = grouped.embeds[1](x[:, red_edge]).flatten(2).transpose(1, 2)
    assert torch.allclose(tokens[:, 4:8], expected, atol=1e-6)


def test_group_encoding_split():
    assert group_code_dim(768) == 256 and group_code_dim(1024) == 256
    assert group_code_dim(64) == 20  # small widths: a third, multiple of 4
    tokenizer = ChannelGroupPatchEmbed(patch_size=16, embed_dim=768)
    pos = tokenizer.positions(2, 3, torch.zeros(()))  # all 3 groups
    table = pos.reshape(3, 6, 768)
    for g in range(3):
        assert torch.allclose(table[g, :, :512], sincos_2d(2, 3, 512))
        group_code = sincos_1d(torch.tensor([g]), 256).float()
        assert torch.allclose(table[g, :, 512:], group_code.expand(6, -1))


def test_groups_gather_bands_by_name_in_any_order_and_spelling(grouped):
    band_ids, wavelengths = bands("S2L2A")
    x = images(len(band_ids))
    reference = grouped(x, band_ids, wavelengths)
    perm = torch.randperm(len(band_ids), generator=torch.Generator().manual_seed(2))
    respelled = [b.replace("B0", "B") for b in band_ids]  # "S2L2A:B2", ...
    shuffled = grouped(x[:, perm], [respelled[i] for i in perm], wavelengths[perm])
    assert torch.allclose(shuffled, reference, atol=1e-6)


def test_missing_band_names_band_and_group(grouped):
    band_ids, wavelengths = bands("S2L2A")
    keep = [i for i, b in enumerate(band_ids) if b != "S2L2A:B06"]
    with pytest.raises(MissingBandError, match=r"B06 of channel group 1 \{B05, B06, B07, B8A\}"):
        grouped(images(len(keep)), [band_ids[i] for i in keep], wavelengths[keep])


def test_omitted_group_is_skipped_and_positions_follow(grouped):
    band_ids, wavelengths = bands("S2L2A", ["B05", "B06", "B07", "B8A", "B11", "B12"])
    tokens = grouped(images(len(band_ids)), band_ids, wavelengths)
    assert tokens.shape == (2, 2 * 4, D) and grouped.last_groups == (1, 2)
    full = grouped.positions(2, 2, tokens, groups=(0, 1, 2))
    assert torch.allclose(grouped.positions(2, 2, tokens), full[4:])  # codes of groups 1 and 2
    assert grouped.present_groups(band_ids) == (1, 2)


def test_groups_ignore_other_sensors(grouped):
    band_ids, wavelengths = bands("ENMAP")  # ENMAP:B002 is not Sentinel-2 B02
    with pytest.raises(MissingBandError, match="no channel group"):
        grouped(images(len(band_ids)), band_ids, wavelengths)


# --- SpectralEarth spectral adapter ----------------------------------------------------------


def test_spectral_adapter_output_shape():
    tokenizer = SpectralAdapterPatchEmbed(patch_size=P, embed_dim=D)
    band_ids, wavelengths = bands("ENMAP")
    x = images(len(band_ids), size=8)
    assert tokenizer.adapter(x).shape == (2, 128, 8, 8)
    assert tokenizer(x, band_ids, wavelengths).shape == (2, 4, D)


def test_spectral_adapter_sorts_bands_by_wavelength():
    tokenizer = SpectralAdapterPatchEmbed(patch_size=P, embed_dim=D).eval()
    band_ids, wavelengths = bands("AVIRIS")
    x = images(len(band_ids))
    perm = torch.randperm(len(band_ids), generator=torch.Generator().manual_seed(3))
    shuffled = tokenizer(x[:, perm], [band_ids[i] for i in perm], wavelengths[perm])
    assert torch.allclose(shuffled, tokenizer(x, band_ids, wavelengths), atol=1e-5)


def test_spectral_adapter_refuses_too_few_bands():
    assert MIN_BANDS == 75
    tokenizer = SpectralAdapterPatchEmbed(patch_size=P, embed_dim=D)
    band_ids, wavelengths = bands("ENMAP")
    assert tokenizer(images(75), band_ids[:75], wavelengths[:75]).shape == (2, 4, D)
    with pytest.raises(ValueError, match="at least 75 bands, got 74"):
        tokenizer(images(74), band_ids[:74], wavelengths[:74])


def test_spectral_adapter_refuses_sar():
    tokenizer = SpectralAdapterPatchEmbed(patch_size=P, embed_dim=D)
    band_ids, wavelengths = bands("ENMAP")
    band_ids[-1], wavelengths[-1] = "S1GRD:VV", 5.5e7
    with pytest.raises(UnsupportedBandError, match="S1GRD:VV"):
        tokenizer(images(len(band_ids)), band_ids, wavelengths)
