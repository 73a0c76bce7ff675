"""Trained protocols through the CLI, each on a real dataset at tiny size: finetune (EuroSAT MS
classification, BigEarthNet v2 multilabel), segmentation (Indian Pines as a map), change
detection (Taizhou Landsat pairs); and the Indian Pines map split."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from eoforge.datasets.indian_pines import CLASS_NAMES, load_indian_pines_map
from eoforge.launch.cli import main

from conftest import random_release

PINES = "indian_pines_aviris"
EUROSAT = "eurosat_ms_samples"
BEN_V2 = "bigearthnet_s1s2/v2_lmdb_configilm_mock"
TAIZHOU = "landsat_tm_change_detection_taizhou_nanjing"


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A random-weight release trained on S2 L1C and L2A bands (EuroSAT, BigEarthNet: native)."""
    return random_release(tmp_path_factory.mktemp("release") / "s2", ("S2L1C", "S2L2A"))


def evaluate(protocol, release, dataset, tmp_path, *options, frozen=False) -> dict:
    out = tmp_path / f"{protocol}.json"
    argv = ["eval", protocol, "--release", str(release), "--dataset", dataset, "--out", str(out)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bands unseen by the release are reported, expectedly
        code = main([*argv, *(["--frozen"] if frozen else []), *options])
    assert code == 0
    return json.loads(out.read_text())


def test_finetune_classification_on_eurosat(sample_data, release, tmp_path):
    result = evaluate(
        "finetune", release, f"eurosat:{sample_data / EUROSAT}", tmp_path, "epochs=2",
        "batch_size=2", "form=ms", "test_fraction=0.5", "val_fraction=0.0",
    )  # fmt: skip
    assert result["protocol"] == "finetune" and not result["frozen"]
    assert 0.0 <= result["accuracy"] <= 1.0 and np.isfinite(result["final_train_loss"])
    assert result["band_policy"] == "native: all 13 bands seen in pretraining"


def test_frozen_finetune_multilabel_on_bigearthnet(sample_data, release, tmp_path):
    result = evaluate(
        "finetune", release, f"bigearthnet:{sample_data / BEN_V2}", tmp_path, "epochs=2",
        "batch_size=4", frozen=True,
    )  # fmt: skip
    assert result["frozen"] and result["n_classes"] == 19
    assert 0.0 < result["map_macro"] <= 1.0 and 0.0 < result["map_micro"] <= 1.0


def test_segmentation_on_the_indian_pines_map(sample_data, release, tmp_path):
    result = evaluate(
        "segmentation", release, f"indian_pines_map:{sample_data / PINES}", tmp_path,
        "epochs=2", "batch_size=8",
    )  # fmt: skip
    assert 0.0 <= result["miou"] <= 1.0 and set(result["per_class_iou"]) <= set(CLASS_NAMES)
    assert result["band_policy"] == "interpolated: 200 of 200 bands unseen in pretraining"


def test_change_detection_on_taizhou(sample_data, release, tmp_path):
    result = evaluate(
        "change", release, f"taizhou:{sample_data / TAIZHOU}", tmp_path, "epochs=2",
        "batch_size=8",
    )  # fmt: skip
    assert result["protocol"] == "change" and result["image_size"] == [32, 32]
    for key in ("f1", "iou", "precision", "recall"):
        assert 0.0 <= result[key] <= 1.0, key


def test_a_protocol_refuses_a_dataset_of_another_task(sample_data, release, tmp_path, capsys):
    argv = ["eval", "segmentation", "--release", str(release)]
    assert main([*argv, "--dataset", f"eurosat:{sample_data / 'eurosat_ms_subset'}"]) == 2
    assert "is a classification dataset; segmentation needs segmentation" in capsys.readouterr().err


def test_indian_pines_map_split(sample_data):
    root = sample_data / PINES
    split = load_indian_pines_map(root, tile=16, block_size=32, seed=0)
    assert split.task == "segmentation" and split.x_train.shape[1:] == (200, 16, 16)
    assert split.y_train.shape[1:] == (16, 16) and split.y_train.dtype == np.int64
    for y in (split.y_train, split.y_test):
        assert y.min() == -1 and 0 <= y[y >= 0].min() and y.max() <= 15
        assert ((y >= 0).any(axis=(1, 2))).all()  # every tile has a labelled pixel
    assert not set(split.train_ids) & set(split.test_ids)
    # Labelled pixels of the two splits together are every labelled pixel of the scene once.
    labels = np.load(root / "Indian_pines_gt.npy")
    assert (split.y_train >= 0).sum() + (split.y_test >= 0).sum() == (labels > 0).sum()
    assert load_indian_pines_map(root, seed=0).split_hash == split.split_hash
    assert load_indian_pines_map(root, seed=1).split_hash != split.split_hash
    with pytest.raises(ValueError, match="a multiple of it"):
        load_indian_pines_map(root, tile=16, block_size=40)
