"""Finetuning protocols: layer-wise lr decay, frozen vs full finetuning, UPerNet and siamese
heads, and segmentation / change detection trained on real Indian Pines and Taizhou scenes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import rasterio
import torch
from torch import nn

from eoforge.datasets.indian_pines import IMAGE_FILE, LABEL_FILE
from eoforge.datasets.sensors import get_sensor
from eoforge.finetune.dense import pixel_loss, train_change, train_segmentation
from eoforge.finetune.finetune import finetune_classifier, param_groups_lrd
from eoforge.finetune.heads import (
    SiameseChangeHead,
    UPerNetHead,
    default_layers,
    multilevel_features,
)
from eoforge.finetune.metrics import change_f1_iou, miou
from eoforge.models import create_model

S2_IDS = ["S2L2A:B02", "S2L2A:B03", "S2L2A:B04", "S2L2A:B08"]
S2_WL = torch.tensor([492.4, 559.8, 664.6, 832.8])
TILE = 16
# Taizhou is a Landsat 7 ETM+ pair (its ENVI header names ETM+ bands 1-5 and 7).
TAIZHOU_BANDS = ("B1", "B2", "B3", "B4", "B5", "B7")


def _encoder(seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("vit_test_patch8", **kwargs)


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _synthetic(n: int = 24, seed: int = 0):
    """Images [N, 4, 16, 16] whose band means carry 3 multi-hot labels and a class index."""
    g = torch.Generator().manual_seed(seed)
    multi_hot = (torch.rand(n, 3, generator=g) < 0.5).long()  # [N, 3]
    images = 0.5 * torch.randn(n, 4, TILE, TILE, generator=g)
    images[:, :3] += 2.0 * multi_hot[:, :, None, None]
    classes = multi_hot[:, 0] + 2 * multi_hot[:, 1]  # [N] in 0..3
    return images, multi_hot, classes


# ---------------------------------------------------------------- layer-wise lr decay


def test_lrd_groups_scale_each_block_and_exempt_norms_biases_tokens():
    encoder, head = _encoder(depth=4), nn.Linear(64, 3)
    groups = param_groups_lrd(encoder, head, base_lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    lr, wd = {}, {}
    for group in groups:
        for name in group["names"]:
            assert name not in lr, f"{name} is in two groups"
            lr[name], wd[name] = group["lr"], group["weight_decay"]
    expected = {f"head.{n}" for n, _ in head.named_parameters()}
    assert set(lr) == {n for n, _ in encoder.named_parameters()} | expected
    for i in range(4):  # block i at base_lr * decay^(depth - i)
        assert lr[f"blocks.{i}.attn.qkv.weight"] == pytest.approx(1e-3 * 0.5 ** (4 - i))
        assert lr[f"blocks.{i}.norm1.bias"] == lr[f"blocks.{i}.attn.qkv.weight"]
    block_lrs = [lr[f"blocks.{i}.mlp.fc1.weight"] for i in range(4)]
    assert block_lrs == sorted(block_lrs) and len(set(block_lrs)) == 4
    for name in ("patch_embed.weight", "patch_embed.bias", "cls_token.token"):
        assert lr[name] == pytest.approx(1e-3 * 0.5**5)
    assert lr["head.weight"] == lr["norm.weight"] == 1e-3
    no_decay = {n for n, v in wd.items() if v == 0.0}
    assert no_decay == {
        n for n in lr if n.endswith(".bias") or "norm" in n or n == "cls_token.token"
    }
    assert wd["blocks.0.attn.qkv.weight"] == wd["patch_embed.weight"] == wd["head.weight"] == 0.05

    head_only = param_groups_lrd(None, head, 1e-3, 0.05, 0.5)
    assert {n for g in head_only for n in g["names"]} == expected
    flat = param_groups_lrd(encoder, head, 1e-3, 0.05, 1.0)
    assert {g["lr"] for g in flat} == {1e-3}
    with pytest.raises(ValueError, match="layer_decay"):
        param_groups_lrd(encoder, head, 1e-3, 0.05, 0.0)


# ---------------------------------------------------------------- frozen vs full finetuning


def test_frozen_leaves_encoder_bit_identical_and_full_finetune_changes_a_copy():
    images, _, classes = _synthetic()
    encoder = _encoder()
    before = _state(encoder)
    args = (images[:16], classes[:16], images[16:], classes[16:], S2_IDS, S2_WL)
    options = dict(epochs=2, lr=1e-3, layer_decay=0.75, batch_size=8, seed=3)

    frozen = finetune_classifier(encoder, *args, frozen=True, **options)
    assert frozen.encoder is encoder and _same(_state(encoder), before)
    assert frozen.loss == "cross_entropy" and len(frozen.train_loss) == 2

    full = finetune_classifier(encoder, *args, **options)
    assert _same(_state(encoder), before), "the caller's encoder must not be trained in place"
    changed = [k for k, v in _state(full.encoder).items() if not torch.equal(v, before[k])]
    assert any(k.startswith("blocks.0.") for k in changed)
    assert any(k.startswith("patch_embed.") for k in changed)
    assert 0.0 <= full.accuracy <= 1.0 and full.loss == "cross_entropy"

    again = finetune_classifier(encoder, *args, **options)  # same seed: same run on the CPU
    assert again.train_loss == full.train_loss and again.accuracy == full.accuracy
    assert _same(_state(again.encoder), _state(full.encoder))


def test_frozen_segmentation_leaves_encoder_bit_identical_and_repeats_under_a_seed():
    encoder = _encoder()
    before = _state(encoder)
    images, _, _ = _synthetic(8)
    labels = (images[:, 0] > 0).long()  # [N, H, W]
    args = (encoder, images, labels, images, labels, 2, S2_IDS, S2_WL)
    options = dict(epochs=2, lr=1e-3, layer_decay=0.75, batch_size=4, seed=0, channels=8)
    result = train_segmentation(*args, frozen=True, **options)
    assert result.encoder is encoder and _same(_state(encoder), before)
    assert result.predictions.shape == labels.shape
    again = train_segmentation(*args, frozen=True, **options)  # same seed: same run on the CPU
    assert again.train_loss == result.train_loss and torch.equal(
        again.predictions, result.predictions
    )


# ---------------------------------------------------------------- heads


def test_default_layers_are_evenly_spaced():
    assert default_layers(12) == (2, 5, 8, 11)
    assert default_layers(24) == (5, 11, 17, 23)
    assert default_layers(2) == (0, 0, 1, 1)


def test_multilevel_features_tap_the_named_blocks():
    encoder = _encoder(depth=4).eval()
    images = torch.randn(2, 4, 24, 32)
    with torch.no_grad():
        maps = multilevel_features(encoder, images, S2_IDS, S2_WL, layers=(0, 1, 3, 3))
        tokens = encoder.tokenize(images, S2_IDS, S2_WL)
        x = torch.cat([encoder.cls_token(tokens), tokens], dim=1)
        by_hand = []
        for block in encoder.blocks:
            x = block(x)
            by_hand.append(x[:, 1:])  # [B, N, D]
        final = encoder.forward_features(images, S2_IDS, S2_WL)[:, 1:]
    assert [tuple(m.shape) for m in maps] == [(2, 64, 3, 4)] * 4
    for got, block in zip(maps, (0, 1, 3, 3), strict=True):
        expected = by_hand[block].transpose(1, 2).reshape(2, 64, 3, 4)
        torch.testing.assert_close(got, expected)
    # The last block's tap, through the final norm, is what forward_features returns.
    torch.testing.assert_close(encoder.norm(maps[3].flatten(2).transpose(1, 2)), final)
    assert not torch.allclose(maps[0], maps[1])
    with pytest.raises(ValueError, match="block index 4"):
        multilevel_features(encoder, images, S2_IDS, S2_WL, layers=(0, 1, 2, 4))


@pytest.mark.parametrize("size", [(8, 8), (16, 16), (24, 40), (48, 32)])
def test_upernet_and_siamese_logits_match_the_input_size(size):
    encoder = _encoder().eval()
    head = UPerNetHead(64, 5, channels=16).eval()
    change = SiameseChangeHead(64, channels=8).eval()
    a, b = torch.randn(2, 4, *size), torch.randn(2, 4, *size)
    with torch.no_grad():
        maps_a = multilevel_features(encoder, a, S2_IDS, S2_WL)
        maps_b = multilevel_features(encoder, b, S2_IDS, S2_WL)
        assert head(maps_a, size).shape == (2, 5, *size)
        forward, backward = change(maps_a, maps_b, size), change(maps_b, maps_a, size)
    assert forward.shape == (2, 2, *size)
    torch.testing.assert_close(forward, backward)  # |a - b| fusion: the date order is irrelevant


def test_pixel_loss_ignores_unlabelled_pixels():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, generator=g, requires_grad=True)
    targets = torch.randint(0, 3, (2, 4, 4), generator=g)
    targets[:, :2] = -1
    loss = pixel_loss(logits, targets)
    loss.backward()
    assert torch.all(logits.grad[:, :, :2] == 0) and logits.grad[:, :, 2:].abs().sum() > 0
    other = logits.detach().clone()
    other[:, :, :2] = 100.0 * torch.randn(2, 3, 2, 4, generator=g)
    torch.testing.assert_close(pixel_loss(other, targets), loss.detach())
    all_ignored = pixel_loss(logits, torch.full_like(targets, -1))
    assert all_ignored.item() == 0.0 and all_ignored.requires_grad


# ---------------------------------------------------------------- real data


def _tiles(array: np.ndarray, tile: int) -> np.ndarray:
    """[..., H, W] -> [n_rows * n_cols, ..., tile, tile], dropping the remainder."""
    h, w = array.shape[-2] // tile, array.shape[-1] // tile
    cut = array[..., : h * tile, : w * tile]
    cut = cut.reshape(*array.shape[:-2], h, tile, w, tile)
    lead = tuple(range(array.ndim - 2))
    n = len(lead)
    return cut.transpose(n, n + 2, *lead, n + 1, n + 3).reshape(
        h * w, *array.shape[:-2], tile, tile
    )


def _zscore(train: np.ndarray, test: np.ndarray, axes: tuple[int, ...]):
    """Per-band z-score with statistics of the train tiles only."""
    mean = train.mean(axis=axes, keepdims=True)
    std = train.std(axis=axes, keepdims=True) + 1e-6
    return ((train - mean) / std).astype(np.float32), ((test - mean) / std).astype(np.float32)


def _changed_only_where_ignored(predictions: torch.Tensor, targets: torch.Tensor, n_classes: int):
    g = torch.Generator().manual_seed(1)
    noise = torch.randint(0, n_classes, predictions.shape, generator=g)
    return torch.where(targets == -1, noise, predictions)


# A random-init encoder embeds AVIRIS bands between its spectral ranges, and says so.
@pytest.mark.filterwarnings("ignore:.*fall in no spectral range:UserWarning")
def test_segmentation_on_indian_pines_tiles(sample_data):
    root = sample_data / "indian_pines_aviris"
    cube = np.load(root / IMAGE_FILE).astype(np.float32).transpose(2, 0, 1)  # [200, 145, 145]
    gt = np.load(root / LABEL_FILE).astype(np.int64) - 1  # 0 unlabelled -> -1
    images, labels = _tiles(cube, TILE), _tiles(gt, TILE)  # [81, 200, 16, 16], [81, 16, 16]
    assert np.array_equal(images[1], cube[:, :TILE, TILE : 2 * TILE])  # row-major tiles
    labelled = (labels >= 0).any(axis=(1, 2))
    images, labels = images[labelled], labels[labelled]
    order = np.random.default_rng(0).permutation(len(images))
    train, test = order[: 2 * len(order) // 3], order[2 * len(order) // 3 :]
    x_train, x_test = _zscore(images[train], images[test], axes=(0, 2, 3))
    y_train, y_test = torch.from_numpy(labels[train]), torch.from_numpy(labels[test])
    bands = get_sensor("AVIRIS").bands
    band_ids, wavelengths = [b.band_id for b in bands], torch.tensor([b.wavelength for b in bands])
    assert len(band_ids) == cube.shape[0]

    result = train_segmentation(
        _encoder(),
        x_train,
        y_train,
        x_test,
        y_test,
        16,
        band_ids,
        wavelengths,
        frozen=False,
        epochs=12,
        lr=1e-3,
        layer_decay=0.75,
        batch_size=8,
        seed=0,
        channels=16,
    )
    assert result.train_loss[-1] < 0.8 * result.train_loss[0]
    assert result.predictions.shape == y_test.shape
    present = set(y_test[y_test >= 0].unique().tolist())
    predicted = set(result.predictions[y_test >= 0].unique().tolist())
    assert present <= set(result.per_class_iou) <= present | predicted
    assert result.miou == pytest.approx(np.mean(list(result.per_class_iou.values())))
    assert 0.0 <= result.miou <= 1.0
    # Unlabelled test pixels never count: any prediction there gives the same score.
    scrambled = _changed_only_where_ignored(result.predictions, y_test, 16)
    assert not torch.equal(scrambled, result.predictions)
    assert miou(scrambled, y_test, 16).mean == pytest.approx(result.miou)
    assert miou(result.predictions, y_test, 16).mean == pytest.approx(result.miou)


def _read(path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_change_detection_on_taizhou_pairs(sample_data):
    root = sample_data / "landsat_tm_change_detection_taizhou_nanjing" / "Taizhou"
    date1, date2 = _read(root / "2000TM"), _read(root / "2003TM")  # [6, 400, 400] uint8 each
    changed, unchanged = _read(root / "change.bmp")[0] > 0, _read(root / "unchanged.bmp")[0] > 0
    reference = np.full(changed.shape, -1, dtype=np.int64)
    reference[unchanged], reference[changed] = 0, 1  # sparse: the rest stays unlabelled
    pairs = _tiles(np.stack([date1, date2]).astype(np.float32), TILE)  # [625, 2, 6, 16, 16]
    labels = _tiles(reference, TILE)  # [625, 16, 16]
    labelled = np.flatnonzero((labels >= 0).any(axis=(1, 2)))
    pick = np.random.default_rng(0).permutation(labelled)[:72]
    train, test = pick[:48], pick[48:]
    x_train, x_test = _zscore(pairs[train], pairs[test], axes=(0, 1, 3, 4))
    y_train, y_test = torch.from_numpy(labels[train]), torch.from_numpy(labels[test])
    assert (y_test == 1).any() and (y_test == 0).any() and (y_test == -1).any()
    sensor = get_sensor("LANDSAT7ETM")
    bands = [sensor.band(name) for name in TAIZHOU_BANDS]
    band_ids, wavelengths = [b.band_id for b in bands], torch.tensor([b.wavelength for b in bands])

    result = train_change(
        _encoder(),
        x_train,
        y_train,
        x_test,
        y_test,
        band_ids,
        wavelengths,
        frozen=False,
        epochs=6,
        lr=1e-3,
        layer_decay=0.75,
        batch_size=8,
        seed=0,
        channels=16,
    )
    assert result.train_loss[-1] < 0.8 * result.train_loss[0]
    assert result.predictions.shape == y_test.shape
    scores = change_f1_iou(result.predictions, y_test)
    assert (result.f1, result.iou) == (pytest.approx(scores.f1), pytest.approx(scores.iou))
    assert 0.0 <= result.iou <= result.f1 <= 1.0
    # Better than calling every labelled pixel a change (the best constant guess for F1).
    assert result.f1 > change_f1_iou(torch.ones_like(y_test), y_test).f1
    scrambled = _changed_only_where_ignored(result.predictions, y_test, 2)
    assert not torch.equal(scrambled, result.predictions)
    assert change_f1_iou(scrambled, y_test).f1 == pytest.approx(result.f1)


# ---------------------------------------------------------------- multilabel


def test_multilabel_finetune_reports_map_with_bce():
    images, multi_hot, _ = _synthetic(48)
    result = finetune_classifier(
        _encoder(),
        images[:32],
        multi_hot[:32],
        images[32:],
        multi_hot[32:],
        S2_IDS,
        S2_WL,
        multilabel=True,
        epochs=8,
        lr=3e-3,
        layer_decay=0.75,
        batch_size=8,
        seed=0,
    )
    assert result.loss == "binary_cross_entropy" and result.accuracy is None
    # The head starts at ~0 logits: BCE over 3 labels is ln 2 there (cross-entropy would be ln 3).
    assert result.train_loss[0] == pytest.approx(math.log(2), abs=0.1)
    assert result.train_loss[-1] < result.train_loss[0]
    assert 0.0 <= result.map_macro <= 1.0 and 0.0 <= result.map_micro <= 1.0
    assert set(result.per_class_ap) == {c for c in range(3) if multi_hot[32:, c].any()}
    chance = multi_hot[32:].float().mean().item()  # mAP of a random ranking
    assert result.map_micro > chance


def test_dense_protocols_name_bad_labels_and_batch_sizes():
    encoder = _encoder()
    images, _, _ = _synthetic(4)
    pairs = torch.stack([images, images], dim=1)  # [N, 2, C, H, W]
    labels = torch.zeros(4, TILE, TILE, dtype=torch.long)
    options = dict(epochs=1, lr=1e-3, layer_decay=0.75, seed=0, channels=8)
    with pytest.raises(ValueError, match="y_train holds 2"):
        train_change(encoder, pairs, labels + 2, pairs, labels, S2_IDS, S2_WL, **options)
    with pytest.raises(ValueError, match="y_test holds 5, outside the 3 classes"):
        train_segmentation(encoder, images, labels, images, labels + 5, 3, S2_IDS, S2_WL, **options)
    with pytest.raises(ValueError, match="batch_size >= 2"):
        train_segmentation(
            encoder, images, labels, images, labels, 3, S2_IDS, S2_WL, batch_size=1, **options
        )
