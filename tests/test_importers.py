"""Published DOFA and SatMAE checkpoints import into eoforge encoders, key by key.

The reference models below are built in the tests with the PUBLISHED module names (so their
``state_dict()`` has the published keys) and the published forward passes, written out by hand:
DOFA's ``Dynamic_MLP_OFA`` + ``OFAViT`` and SatMAE's ``GroupChannelsVisionTransformer``, with
MAE's 2-D sincos (column code first). DOFA's one-pixel padding is left out of the reference: it
is the documented difference between the two tokenizers.
"""

from __future__ import annotations

import argparse
import pickle
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models.vision_transformer import Block
from torch import nn

from eoforge.models import load_release
from eoforge.models.importers import (
    CheckpointImportError,
    import_checkpoint,
    import_release,
    load_checkpoint,
)

P, D, DEPTH, HEADS = 8, 64, 2, 4  # vit_test_patch8
GRID = 4  # the published tables' grid (32 px images)
S2_10 = ["B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"]  # SatMAE's input
SATMAE_GROUPS = ((0, 1, 2, 6), (3, 4, 5, 7), (8, 9))
GROUP_DIM = 16


def mae_sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def mae_sincos_2d(dim: int, side: int) -> torch.Tensor:
    """MAE's get_2d_sincos_pos_embed(cls_token=True): [1, 1 + side^2, dim], column code first."""
    grid = np.meshgrid(np.arange(side), np.arange(side))  # w goes first, as in MAE
    emb = np.concatenate([mae_sincos_1d(dim // 2, grid[0]), mae_sincos_1d(dim // 2, grid[1])], 1)
    return torch.from_numpy(np.concatenate([np.zeros((1, dim)), emb])).float()[None]


def blocks() -> nn.ModuleList:
    norm = partial(nn.LayerNorm, eps=1e-6)
    return nn.ModuleList(Block(D, HEADS, 4.0, qkv_bias=True, norm_layer=norm) for _ in range(DEPTH))


def randomise(module: nn.Module, skip=("pos_embed", "channel_embed")) -> None:
    """Every parameter random (norms included), so a misplaced channel shows."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name not in skip:
                param.copy_(torch.randn_like(param) * 0.2 + (1.0 if "norm" in name else 0.0))


def trunk(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    for block in module.blocks:
        x = block(x)
    return module.norm(x)


class DofaWeightGenerator(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(128, 4, activation="gelu", dropout=0.0)
        self.transformer_encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.fc_weight = nn.Linear(128, P * P * D)
        self.fc_bias = nn.Linear(128, D)
        self.weight_tokens = nn.Parameter(torch.randn(128, 128) * 0.02)
        self.bias_token = nn.Parameter(torch.randn(1, 128) * 0.02)


class DofaFCRes(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1, self.w2 = nn.Linear(128, 128), nn.Linear(128, 128)


class DofaPatchEmbed(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight_generator = DofaWeightGenerator()
        self.fclayer = DofaFCRes()


class Dofa(nn.Module):
    """DOFA's published module tree (pretraining checkpoint: + mask_token, projector)."""

    def __init__(self):
        super().__init__()
        self.patch_embed = DofaPatchEmbed()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(mae_sincos_2d(D, GRID), requires_grad=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        self.blocks = blocks()
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.projector = nn.Linear(D, 32)

    def forward_features(self, x: torch.Tensor, wavelengths_um: list[float]) -> torch.Tensor:
        gen, fc = self.patch_embed.weight_generator, self.patch_embed.fclayer
        waves = torch.from_numpy(mae_sincos_1d(128, np.array(wavelengths_um) * 1000)).float()
        waves = waves + F.relu(fc.w2(F.relu(fc.w1(waves))))  # FCResLayer
        seq = torch.cat([gen.weight_tokens, waves, gen.bias_token])
        out = gen.transformer_encoder(seq)
        weight, bias = gen.fc_weight(out[128:-1] + waves), gen.fc_bias(out[-1])
        kernel = weight.view(len(wavelengths_um), P, P, D).permute(3, 0, 1, 2) * 0.01
        tokens = F.conv2d(x, kernel, bias * 0.01, stride=P).flatten(2).transpose(1, 2)
        tokens = tokens + self.pos_embed[:, 1:]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return trunk(self, torch.cat([cls, tokens], dim=1))


class GroupEmbed(nn.Module):
    def __init__(self, bands: int):
        super().__init__()
        self.proj = nn.Conv2d(bands, D, P, stride=P)


class SatMAE(nn.Module):
    """SatMAE's GroupChannelsVisionTransformer (fine-tuning form: channel_cls_embed), plus the
    MAE pretraining's mask_token and a decoder key."""

    def __init__(self):
        super().__init__()
        self.patch_embed = nn.ModuleList(GroupEmbed(len(g)) for g in SATMAE_GROUPS)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(mae_sincos_2d(D - GROUP_DIM, GRID))
        code = mae_sincos_1d(GROUP_DIM, np.arange(len(SATMAE_GROUPS)))
        self.channel_embed = nn.Parameter(torch.from_numpy(code).float()[None])
        self.channel_cls_embed = nn.Parameter(torch.zeros(1, 1, GROUP_DIM))
        self.blocks = blocks()
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 32))
        self.decoder_embed = nn.Linear(D, 32)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        tokens = torch.stack(
            [
                embed.proj(x[:, list(g)]).flatten(2).transpose(1, 2)
                for embed, g in zip(self.patch_embed, SATMAE_GROUPS, strict=True)
            ],
            dim=1,
        )  # [B, G, L, D]
        groups, length = tokens.shape[1:3]
        pos = self.pos_embed[:, 1:].unsqueeze(1).expand(-1, groups, -1, -1)
        chan = self.channel_embed.unsqueeze(2).expand(-1, -1, length, -1)
        tokens = (tokens + torch.cat([pos, chan], dim=-1)).reshape(x.shape[0], -1, D)
        cls = self.cls_token + torch.cat([self.pos_embed[:, :1], self.channel_cls_embed], -1)
        return trunk(self, torch.cat([cls.expand(x.shape[0], -1, -1), tokens], dim=1))


@pytest.fixture(scope="module")
def dofa():
    torch.manual_seed(0)
    model = Dofa().eval()
    randomise(model)
    return model


@pytest.fixture(scope="module")
def satmae():
    torch.manual_seed(1)
    model = SatMAE().eval()
    randomise(model)
    return model


WAVELENGTHS_NM = [492.4, 559.8, 664.6, 832.8]
DOFA_BANDS = ["S2L2A:B02", "S2L2A:B03", "S2L2A:B04", "S2L2A:B08"]


def test_dofa_every_key_is_loaded_checked_or_reported(dofa):
    encoder = import_checkpoint(dofa.state_dict(), "dofa", "vit_test_patch8")
    report = encoder.import_report
    accounted = set(report.loaded) | set(report.checked) | set(report.skipped)
    assert accounted == set(dofa.state_dict())
    assert set(report.skipped) == {"mask_token", "projector.weight", "projector.bias"}
    assert set(report.checked) == {"pos_embed"}
    assert (
        report.loaded[
            "patch_embed.weight_generator.transformer_encoder.layers.0.self_attn.in_proj_weight"
        ]
        == "patch_embed.weight_generator.layer.self_attn.in_proj_weight"
    )


def test_dofa_weights_land_where_they_should(dofa):
    encoder = import_checkpoint(dofa.state_dict(), "dofa", "vit_test_patch8")
    order = torch.tensor(encoder.import_report.channel_order)
    # MAE's table is [column ‖ row]; eoforge's [row ‖ column]: the halves swap.
    assert order.tolist() == [*range(D // 2, D), *range(D // 2)]
    ours, theirs = encoder.state_dict(), dofa.state_dict()
    torch.testing.assert_close(
        ours["patch_embed.weight_generator.layer.linear1.weight"],
        theirs["patch_embed.weight_generator.transformer_encoder.layers.0.linear1.weight"],
    )
    torch.testing.assert_close(
        ours["patch_embed.fclayer.w2.bias"], theirs["patch_embed.fclayer.w2.bias"]
    )
    torch.testing.assert_close(
        ours["blocks.1.attn.qkv.weight"], theirs["blocks.1.attn.qkv.weight"][:, order]
    )
    torch.testing.assert_close(
        ours["blocks.0.mlp.fc2.weight"], theirs["blocks.0.mlp.fc2.weight"][order]
    )
    torch.testing.assert_close(ours["norm.bias"], theirs["norm.bias"][order])
    fc = theirs["patch_embed.weight_generator.fc_weight.weight"].view(P * P, D, 128)
    torch.testing.assert_close(
        ours["patch_embed.weight_generator.fc_weight.weight"], fc[:, order].reshape(-1, 128)
    )
    assert ours["patch_embed.sar_codes"].shape == (0, 128)


def test_dofa_features_equal_the_published_forward(dofa):
    encoder = import_checkpoint(dofa.state_dict(), "dofa", "vit_test_patch8")
    order = torch.tensor(encoder.import_report.channel_order)
    x = torch.randn(2, 4, GRID * P, GRID * P)
    with torch.no_grad():
        ours = encoder.forward_features(x, DOFA_BANDS, torch.tensor(WAVELENGTHS_NM))
        theirs = dofa.forward_features(x, [w / 1000 for w in WAVELENGTHS_NM])
    torch.testing.assert_close(ours, theirs[..., order], atol=2e-4, rtol=1e-4)


def test_satmae_every_key_accounted_and_features_equal(satmae):
    encoder = import_checkpoint(satmae.state_dict(), "satmae", "vit_test_patch8")
    report = encoder.import_report
    assert set(report.loaded) | set(report.checked) | set(report.skipped) == set(
        satmae.state_dict()
    )
    assert set(report.skipped) == {"mask_token", "decoder_embed.weight", "decoder_embed.bias"}
    assert report.loaded["patch_embed.2.proj.weight"] == "patch_embed.embeds.2.weight"
    assert encoder.patch_embed.group_dim == GROUP_DIM
    order = torch.tensor(report.channel_order)
    spatial = D - GROUP_DIM
    assert order.tolist() == [
        *range(spatial // 2, spatial),
        *range(spatial // 2),
        *range(spatial, D),
    ]
    torch.testing.assert_close(
        encoder.state_dict()["patch_embed.embeds.1.weight"],
        satmae.state_dict()["patch_embed.1.proj.weight"][order],
    )
    x = torch.randn(2, len(S2_10), GRID * P, GRID * P)
    band_ids = [f"S2L2A:{b}" for b in S2_10]
    with torch.no_grad():
        ours = encoder.forward_features(x, band_ids, torch.zeros(len(S2_10)))
        theirs = satmae.forward_features(x)
    torch.testing.assert_close(ours, theirs[..., order], atol=2e-4, rtol=1e-4)


def test_missing_and_extra_keys_fail_naming_them(dofa, satmae):
    state = dict(dofa.state_dict())
    del state["blocks.1.mlp.fc1.bias"]
    with pytest.raises(CheckpointImportError, match=r"missing \['blocks\.1\.mlp\.fc1\.bias'\]"):
        import_checkpoint(state, "dofa", "vit_test_patch8")
    state = {**dofa.state_dict(), "blocks.2.norm1.weight": torch.ones(D)}
    with pytest.raises(CheckpointImportError, match=r"unexpected \['blocks\.2\.norm1\.weight'\]"):
        import_checkpoint(state, "dofa", "vit_test_patch8")
    state = {**satmae.state_dict(), "patch_embed.3.proj.weight": torch.ones(D, 1, P, P)}
    with pytest.raises(CheckpointImportError, match=r"patch_embed\.3\.proj\.weight"):
        import_checkpoint(state, "satmae", "vit_test_patch8")
    state = {k: v for k, v in satmae.state_dict().items() if k != "channel_embed"}
    with pytest.raises(CheckpointImportError, match="channel_embed"):
        import_checkpoint(state, "satmae", "vit_test_patch8")


def test_wrong_shape_and_learned_positions_are_refused(dofa):
    with pytest.raises(CheckpointImportError, match=r"fc_weight\.weight \(4096, 128\)"):
        import_checkpoint(dofa.state_dict(), "dofa", "vit_test_patch8", patch_size=4)
    state = {**dofa.state_dict(), "pos_embed": torch.randn(1, 1 + GRID * GRID, D)}
    with pytest.raises(CheckpointImportError, match="pos_embed is not the fixed 2-D sincos"):
        import_checkpoint(state, "dofa", "vit_test_patch8")


class Payload:
    """Unpickling this calls ``open(path, "w")``: a stand-in for arbitrary code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_pickle_is_refused_without_running(tmp_path, dofa):
    marker = tmp_path / "ran"
    checkpoint = tmp_path / "evil.pth"
    torch.save({**dofa.state_dict(), "x": Payload(marker)}, checkpoint)
    with pytest.raises(CheckpointImportError, match="evil.pth"):
        load_checkpoint(checkpoint)
    assert not marker.exists()
    pickle.loads(pickle.dumps(Payload(marker)))  # the control: a plain unpickle does run it
    assert marker.exists()


def test_training_checkpoint_with_args_loads_and_imports_as_release(tmp_path, satmae):
    path = tmp_path / "satmae.pth"
    torch.save({"model": satmae.state_dict(), "epoch": 3, "args": argparse.Namespace(lr=1.0)}, path)
    bands = [
        {"band_id": f"S2L2A:{b}", "wavelength": 500.0 + i, "bandwidth": 10.0, "gsd": 10.0}
        for i, b in enumerate(S2_10)
    ]
    with pytest.warns(UserWarning, match="S2L2A:B02"):
        out = import_release(
            path, "satmae", tmp_path / "rel", architecture="vit_test_patch8", bands=bands
        )
    release = load_release(out)
    assert release.card["objective"] == {"name": "imported", "source": "satmae"}
    assert release.card["data"]["skipped_keys"].keys() == {
        "mask_token",
        "decoder_embed.weight",
        "decoder_embed.bias",
    }
    assert release.normalisation["S2L2A:B12"] == {
        "p1": 0.0,
        "p99": 1.0,
        "mean": 0.0,
        "std": 1.0,
        "clip": False,
    }
    x = torch.randn(1, len(S2_10), 16, 16)
    direct = import_checkpoint(satmae.state_dict(), "satmae", "vit_test_patch8")
    with torch.no_grad():
        torch.testing.assert_close(
            release.encoder.forward_features(x, release.band_ids, release.wavelengths),
            direct.forward_features(x, release.band_ids, release.wavelengths),
        )


def test_safetensors_checkpoint_imports(tmp_path, dofa):
    path = tmp_path / "dofa.safetensors"
    save_file({k: v.contiguous() for k, v in dofa.state_dict().items()}, path)
    bands = [
        {"band_id": b, "wavelength": w, "bandwidth": 30.0}
        for b, w in zip(DOFA_BANDS, WAVELENGTHS_NM, strict=True)
    ]
    norm = {b: {"p1": 0, "p99": 1e4, "mean": 0.1, "std": 0.2} for b in DOFA_BANDS}
    out = import_release(
        path,
        "dofa",
        tmp_path / "rel",
        architecture="vit_test_patch8",
        bands=bands,
        normalisation=norm,
    )
    release = load_release(out)
    assert release.card["data"]["checkpoint"] == str(path)
    assert release.encoder.patch_embed.sar_polarisations == ()
