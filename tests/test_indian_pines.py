"""Indian Pines adapter on the real scene: band identity, the spatially blocked split, and
normalisation from the training blocks only."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from eoforge.datasets.errors import DataError
from eoforge.datasets.indian_pines import (
    CLASS_NAMES,
    IMAGE_FILE,
    LABEL_FILE,
    TEST,
    TRAIN,
    load_indian_pines,
    split_hash,
)
from eoforge.datasets.sensors import get_sensor

# The split behind published result rows; if this changes, every recorded split_hash changes
# with it, so change it only on purpose.
SEED0_SPLIT_HASH = "e51f9af03962fbeeed934c3f62dd0be233a677bd6905e82056d6e67581efcbe1"


@pytest.fixture(scope="module")
def root(sample_data):
    return sample_data / "indian_pines_aviris"


@pytest.fixture(scope="module")
def split(root):
    return load_indian_pines(root, seed=0)


@pytest.fixture(scope="module")
def raw(root):
    return np.load(root / IMAGE_FILE), np.load(root / LABEL_FILE)


def _reflect(index: np.ndarray, size: int) -> np.ndarray:
    """numpy's 'reflect' padding as an index map (edge not repeated)."""
    index = np.abs(index)
    return np.where(index >= size, 2 * (size - 1) - index, index)


def _covered(pixels: np.ndarray, window: int, shape: tuple[int, int]) -> np.ndarray:
    """[H, W] bool: scene pixels read by any window centred on ``pixels``."""
    offsets = np.arange(window) - window // 2
    rows = _reflect(pixels[:, :1] + offsets, shape[0])  # [N, w]
    cols = _reflect(pixels[:, 1:] + offsets, shape[1])  # [N, w]
    mask = np.zeros(shape, dtype=bool)
    mask[rows[:, :, None], cols[:, None, :]] = True
    return mask


def _normalise(raw_values: np.ndarray, stats: dict) -> np.ndarray:
    p1, p99, mean, std = (stats[k] for k in ("p1", "p99", "mean", "std"))
    return ((np.clip(raw_values, p1, p99) - p1) / (p99 - p1) - mean) / std


def test_shapes_dtypes_and_band_identity(split):
    sensor = get_sensor("AVIRIS")
    assert split.band_ids == [f"AVIRIS:B{i:03d}" for i in range(1, 201)]
    np.testing.assert_allclose(split.wavelengths, [b.wavelength for b in sensor.bands], rtol=1e-6)
    assert split.wavelengths.dtype == np.float32 and split.wavelengths.shape == (200,)
    assert split.class_names == list(CLASS_NAMES) and len(CLASS_NAMES) == 16
    for x, y in ((split.x_train, split.y_train), (split.x_test, split.y_test)):
        assert x.shape == (len(y), 200, 16, 16) and x.dtype == np.float32
        batch = x[:3]
        assert isinstance(batch, np.ndarray) and batch.shape == (3, 200, 16, 16)
        assert batch.dtype == np.float32 and np.isfinite(batch).all()
        assert y.dtype == np.int64 and y.min() >= 0 and y.max() < 16
    assert np.asarray(split.x_test).shape == split.x_test.shape


def test_windows_are_centred_on_their_labelled_pixel(split, raw):
    image, labels = raw
    rows, cols = split.train_pixels[:50].T
    np.testing.assert_array_equal(split.y_train[:50], labels[rows, cols] - 1)
    centre = split.x_train[:50][:, :, 8, 8]  # [50, C]: pixel (r, c) sits at window index w // 2
    for c, band in ((0, "AVIRIS:B001"), (120, "AVIRIS:B121")):
        expected = _normalise(image[rows, cols, c].astype(np.float64), split.stats[band])
        np.testing.assert_allclose(centre[:, c], expected, rtol=1e-5, atol=1e-5)


def test_no_window_crosses_the_split(split, raw):
    shape = raw[1].shape
    covered_train = _covered(split.train_pixels, split.window, shape)
    covered_test = _covered(split.test_pixels, split.window, shape)
    train_rows, train_cols = split.train_pixels.T
    test_rows, test_cols = split.test_pixels.T
    assert not covered_test[train_rows, train_cols].any(), "a test window contains a train pixel"
    assert not covered_train[test_rows, test_cols].any(), "a train window contains a test pixel"
    assert not (covered_train & covered_test).any(), "train and test windows overlap"
    # Windows read only pixels of blocks of their own split.
    assert (split.split_map[covered_train] == TRAIN).all()
    assert (split.split_map[covered_test] == TEST).all()


def test_both_splits_hold_several_classes(split):
    train_classes, test_classes = set(split.y_train.tolist()), set(split.y_test.tolist())
    assert len(train_classes) >= 8 and len(test_classes) >= 8
    # The balanced draw keeps most of the test set in classes the probe can learn.
    assert np.isin(split.y_test, list(train_classes)).mean() > 0.8


def test_split_is_deterministic_and_its_hash_stable(root, split):
    again = load_indian_pines(root, seed=0)
    np.testing.assert_array_equal(again.train_pixels, split.train_pixels)
    np.testing.assert_array_equal(again.test_pixels, split.test_pixels)
    assert again.split_hash == split.split_hash == SEED0_SPLIT_HASH
    assert split_hash(split.train_pixels, split.test_pixels, 145) == SEED0_SPLIT_HASH
    other = load_indian_pines(root, seed=1)
    assert other.split_hash != split.split_hash


def test_caps_take_a_seeded_stratified_subset(root, split):
    capped = load_indian_pines(root, seed=0, max_train=300, max_test=150)
    assert len(capped.y_train) == 300 and len(capped.y_test) == 150
    assert capped.split_hash != split.split_hash
    full = {tuple(p) for p in split.train_pixels.tolist()}
    assert {tuple(p) for p in capped.train_pixels.tolist()} <= full
    # Class shares follow the uncapped split to within a sample or two per class.
    share_full = np.bincount(split.y_train, minlength=16) / len(split.y_train)
    share_capped = np.bincount(capped.y_train, minlength=16) / 300
    assert np.abs(share_full - share_capped).max() <= 2 / 300
    again = load_indian_pines(root, seed=0, max_train=300, max_test=150)
    assert again.split_hash == capped.split_hash
    # Capping train leaves the test subset alone, so rows with different train caps compare.
    test_only = load_indian_pines(root, seed=0, max_test=150)
    np.testing.assert_array_equal(test_only.test_pixels, capped.test_pixels)


def test_normalisation_uses_training_blocks_only(root, split, raw, tmp_path):
    image, labels = raw
    train_values = image[split.split_map == TRAIN].astype(np.float64)  # [N, C]
    p1, p99 = np.percentile(train_values, [1, 99], axis=0)
    for c in (0, 57, 199):
        stats = split.stats[split.band_ids[c]]
        assert stats["p1"] == pytest.approx(p1[c]) and stats["p99"] == pytest.approx(p99[c])
        normalised = _normalise(train_values[:, c], stats)
        assert normalised.mean() == pytest.approx(0.0, abs=1e-9)
        assert normalised.std() == pytest.approx(1.0, rel=1e-9)
    # Tripling every test-block pixel changes neither the statistics nor a training window.
    altered = image.copy()
    altered[split.split_map == TEST] *= 3
    np.save(tmp_path / IMAGE_FILE, altered)
    shutil.copy(root / LABEL_FILE, tmp_path / LABEL_FILE)
    moved = load_indian_pines(tmp_path, seed=0)
    assert moved.split_hash == split.split_hash
    assert moved.stats == split.stats
    np.testing.assert_array_equal(moved.x_train[:64], split.x_train[:64])
    assert not np.array_equal(moved.x_test[:64], split.x_test[:64])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match=IMAGE_FILE):
        load_indian_pines(tmp_path)
