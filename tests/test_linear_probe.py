"""Linear probe: the head grid trains in one pass, selection never sees test labels, and the
whole protocol runs on a release over real Indian Pines."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from eoforge.datasets.indian_pines import load_indian_pines
from eoforge.datasets.sensors import band_table, get_sensor
from eoforge.finetune import linear
from eoforge.finetune.evaluate import run_protocol
from eoforge.finetune.features import extract_features
from eoforge.finetune.linear import LinearHeadGrid, linear_probe, stratified_holdout
from eoforge.launch.cli import main
from eoforge.models import create_model, save_release

RESULT_KEYS = {
    "protocol",
    "dataset",
    "release",
    "accuracy",
    "majority_baseline",
    "best_lr",
    "n_train",
    "n_test",
    "n_classes",
    "seed",
    "split_hash",
    "band_policy",
}


def _separable(n_per_class: int, n_classes: int = 4, dim: int = 32, seed: int = 0):
    """Gaussian blobs around far-apart class means: [N, dim] features, [N] labels."""
    g = torch.Generator().manual_seed(seed)
    means = 6.0 * torch.randn(n_classes, dim, generator=g)
    labels = torch.arange(n_classes).repeat_interleave(n_per_class)
    features = means[labels] + torch.randn(len(labels), dim, generator=g)
    return features, labels


def test_heads_are_stacked_and_applied_in_one_forward():
    grid = LinearHeadGrid(in_dim=8, n_classes=3, n_heads=5)
    assert grid(torch.randn(4, 8)).shape == (5, 4, 3)


def test_grid_trains_every_head_in_one_pass(monkeypatch):
    calls = []
    forward = LinearHeadGrid.forward
    monkeypatch.setattr(
        LinearHeadGrid, "forward", lambda self, x: calls.append(len(x)) or forward(self, x)
    )
    features, labels = _separable(50)
    lrs, wds = [1e-3, 1e-2, 1e-1, 1.0], [0.0, 0.0, 1e-3, 1e-3]
    grid = linear.train_head_grid(
        features,
        labels,
        4,
        lrs,
        wds,
        epochs=3,
        batch_size=64,
        generator=torch.Generator().manual_seed(0),
    )
    assert calls == [64] * (3 * (200 // 64))  # one forward per batch for all four heads
    norms = grid.weight.detach().flatten(1).norm(dim=1)  # [H]
    assert (norms > 0).all()
    assert norms[0] < norms[1] < norms[2]  # larger learning rate, further from the zero start


def test_linearly_separable_features_are_learned():
    train_x, train_y = _separable(100, seed=0)
    test_x, test_y = _separable(30, seed=0)
    test_x = test_x + 0.1 * torch.randn(test_x.shape, generator=torch.Generator().manual_seed(1))
    result = linear_probe(train_x, train_y, test_x, test_y, epochs=20, seed=0)
    assert result.accuracy > 0.99
    assert result.majority_baseline == pytest.approx(0.25)
    assert set(result.per_class_accuracy) == {0, 1, 2, 3}
    assert len(result.grid) == len(linear.DEFAULT_LRS) * len(linear.DEFAULT_WEIGHT_DECAYS)


def test_a_selected_learning_rate_at_the_grid_edge_is_flagged():
    train_x, train_y = _separable(60, seed=4)
    test_x, test_y = _separable(20, seed=4)
    # Every rate far too small for 5 epochs: the largest learns most and is chosen.
    # The advice names an option that exists: the linear protocol's lrs, widened past the edge.
    advice = r"selected learning rate 1e-05 is the grid's largest.*lrs=\[1e-07, 1e-06, 1e-05, 3e-05, 0\.0001\]"
    with pytest.warns(UserWarning, match=advice):
        low = linear_probe(train_x, train_y, test_x, test_y, lrs=(1e-7, 1e-6, 1e-5), epochs=5)
    assert low.lr_at_grid_edge and low.best_lr == 1e-5
    assert linear.grid_edge(1e-3, (1e-3, 0.1, 1.0)) == "smallest"
    assert linear.grid_edge(0.1, (1e-3, 0.1, 1.0)) is None
    assert linear.grid_edge(0.1, (0.1, 0.1)) is None  # one rate: no edge to speak of


def test_selection_never_looks_at_test_labels():
    train_x, train_y = _separable(60, seed=2)
    train_x = train_x + 4.0 * torch.randn(train_x.shape, generator=torch.Generator().manual_seed(3))
    test_x, test_y = _separable(40, seed=2)
    honest = linear_probe(train_x, train_y, test_x, test_y, epochs=10, seed=0)
    scrambled = torch.roll(test_y, 7)
    blind = linear_probe(train_x, train_y, test_x, scrambled, epochs=10, seed=0)
    assert blind.best_head == honest.best_head and blind.best_lr == honest.best_lr
    assert blind.grid == honest.grid
    assert blind.accuracy != honest.accuracy
    # The chosen head is the best on the held-out train part.
    best = honest.grid[honest.best_head]["val_accuracy"]
    assert best == max(row["val_accuracy"] for row in honest.grid) == honest.val_accuracy


def test_stratified_holdout_splits_each_class():
    labels = torch.tensor([0] * 50 + [1] * 20 + [2] * 3)
    fit, val = stratified_holdout(labels, 0.2, torch.Generator().manual_seed(0))
    assert sorted(torch.cat([fit, val]).tolist()) == list(range(len(labels)))
    assert torch.bincount(labels[val], minlength=3).tolist() == [10, 4, 0]  # class 2 too rare


def test_features_are_cls_and_patch_mean():
    torch.manual_seed(0)
    encoder = create_model("vit_test_patch8")
    ids, wl = ["S2L2A:B04", "S2L2A:B08"], torch.tensor([664.6, 832.8])
    images = torch.randn(5, 2, 16, 16).numpy()
    features = extract_features(encoder, images, ids, wl, batch_size=2, progress=False)
    with torch.no_grad():
        tokens = encoder.forward_features(torch.from_numpy(images), ids, wl)  # [5, 1 + 4, 64]
    assert features.shape == (5, 128)
    torch.testing.assert_close(features, torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], -1))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A release of a randomly initialised vit_test_patch8 'pretrained' on Sentinel-2 L2A."""
    torch.manual_seed(0)
    encoder = create_model("vit_test_patch8")
    bands = band_table(get_sensor("S2L2A").bands)
    card = {
        "bands": bands,
        "normalisation": {
            b["band_id"]: {"p1": 0.0, "p99": 0.3, "mean": 0.4, "std": 0.2} for b in bands
        },
        "objective": {"name": "mae"},
        "data": {},
        "steps": 0,
    }
    out = tmp_path_factory.mktemp("release") / "random_s2"
    return save_release(out, encoder.state_dict(), "vit_test_patch8", {}, card)


def test_run_linear_on_indian_pines(sample_data, release, tmp_path):
    root = sample_data / "indian_pines_aviris"
    dataset = f"indian_pines:{root}"
    out = tmp_path / "linear.json"
    with pytest.warns(UserWarning) as caught:
        result = run_protocol(
            "linear",
            release,
            dataset,
            seed=0,
            max_train=1000,
            max_test=500,
            progress=False,
            out=out,
        )
    # AVIRIS bands are unseen by an S2 release: embedded through the spectral ranges, loudly.
    assert any("not trained on 200 band" in str(w.message) for w in caught)
    assert RESULT_KEYS <= set(result)
    assert json.loads(out.read_text()) == result
    assert result["n_train"] == 1000 and result["n_test"] == 500 and result["n_classes"] == 16
    assert result["band_policy"] == "interpolated: 200 of 200 bands unseen in pretraining"
    expected = load_indian_pines(root, seed=0, max_train=1000, max_test=500)
    assert result["split_hash"] == expected.split_hash
    # Random spectral projections of the spectra carry class information a probe can use.
    assert result["accuracy"] > result["majority_baseline"]


def test_unknown_dataset_names_the_known_ones(release):
    with pytest.raises(ValueError, match="known datasets: bigearthnet, change_pairs, eurosat"):
        run_protocol("linear", release, "sen12ms:/data")
    with pytest.raises(ValueError, match="names no folder"):
        run_protocol("linear", release, "indian_pines")


def test_window_must_fit_the_patch(sample_data, release):
    dataset = f"indian_pines:{sample_data / 'indian_pines_aviris'}"
    with pytest.raises(ValueError, match="patch size 8"), pytest.warns(UserWarning):
        run_protocol(
            "linear", release, dataset, window=12, max_train=50, max_test=50, progress=False
        )
    with pytest.raises(ValueError, match=r"takes no option\(s\) \['tile'\]; its options: "):
        run_protocol("linear", release, dataset, tile=12, progress=False)


def test_linear_probe_refuses_multilabel_and_knn_scores_it_by_map(sample_data, release):
    bigearthnet = f"bigearthnet:{sample_data / 'bigearthnet_s1s2' / 'v2_lmdb_configilm_mock'}"
    with pytest.raises(ValueError, match="multilabel dataset; the linear probe"):
        run_protocol("linear", release, bigearthnet, progress=False)
    result = run_protocol("knn", release, bigearthnet, progress=False)
    assert result["n_classes"] == 19 and 0.0 < result["map_macro"] <= 1.0
    assert result["band_policy"] == "native: all 12 bands seen in pretraining"


def test_the_grid_is_an_option_of_eval_linear(sample_data, release, tmp_path):
    out = tmp_path / "linear.json"
    argv = ["eval", "linear", "--release", str(release), "--out", str(out)]
    dataset = f"indian_pines:{sample_data / 'indian_pines_aviris'}"
    options = ["max_train=200", "max_test=100", "lrs=[0.03, 0.3]", "weight_decays=[0.0]"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # AVIRIS bands unseen by the S2 release
        assert main([*argv, "--dataset", dataset, *options]) == 0
    result = json.loads(out.read_text())
    assert result["best_lr"] in (0.03, 0.3) and result["best_weight_decay"] == 0.0


def test_a_training_split_without_a_test_class_warns_and_says_so(sample_data, release):
    """The 4-image EuroSAT sample split in halves: its 2 training images are of other classes
    than its 2 test images, so no probe can score anything but 0 on them."""
    dataset = f"eurosat:{sample_data / 'eurosat_ms_samples'}"
    options = {"form": "ms", "test_fraction": 0.5, "val_fraction": 0.0}
    with pytest.warns(UserWarning) as caught:
        result = run_protocol("knn", release, dataset, progress=False, **options)
    assert any("no sample of test class(es) Highway, Pasture" in str(w.message) for w in caught)
    assert len(result["warnings"]) == 1 and "Highway, Pasture" in result["warnings"][0]
