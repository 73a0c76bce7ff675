"""Benchmark metrics against hand-computed cases (and scikit-learn / scipy where installed), and
weighted kNN on synthetic clusters and real Indian Pines spectra."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from eoforge.datasets.indian_pines import load_indian_pines
from eoforge.finetune.knn import KnnMultilabelResult, KnnResult, knn_classify, knn_probe
from eoforge.finetune.metrics import (
    accuracy,
    average_precision_micro_macro,
    balanced_accuracy,
    change_f1_iou,
    confusion_matrix,
    iou_from_confusion,
    mean_ci95,
    miou,
    t_quantile,
)

# ---------------------------------------------------------------- classification metrics


def test_accuracy_balanced_accuracy_and_confusion_by_hand():
    targets = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    predictions = torch.tensor([0, 0, 0, 1, 1, 0, 2, 3])  # class 3 only predicted
    assert accuracy(predictions, targets) == pytest.approx(5 / 8)
    # Recalls 3/4, 1/2, 1/2 over the classes in the targets; class 3 has no support.
    assert balanced_accuracy(predictions, targets) == pytest.approx((0.75 + 0.5 + 0.5) / 3)
    expected = torch.tensor([[3, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]])
    assert torch.equal(confusion_matrix(predictions, targets, 4), expected)
    with pytest.raises(ValueError, match="predictions hold 3, outside the 3 classes"):
        confusion_matrix(predictions, targets, 3)
    with pytest.raises(ValueError, match="shape"):
        accuracy(predictions[:3], targets)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_classification_metrics_match_sklearn():
    skm = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 5, (300,), generator=g)
    predictions = torch.where(
        torch.rand(300, generator=g) < 0.6, targets, torch.randint(0, 6, (300,), generator=g)
    )
    assert balanced_accuracy(predictions, targets) == pytest.approx(
        skm.balanced_accuracy_score(targets.numpy(), predictions.numpy())
    )
    assert np.array_equal(
        confusion_matrix(predictions, targets, 6).numpy(),
        skm.confusion_matrix(targets.numpy(), predictions.numpy(), labels=range(6)),
    )


# ---------------------------------------------------------------- average precision


def _ap_reference(scores: list[float], targets: list[int]) -> float:
    """AP as the mean, over positives, of the precision among everything scored >= that
    positive's score: the same quantity as the step sum, counted a different way (ties included)."""
    positives = [s for s, t in zip(scores, targets, strict=True) if t]
    precisions = []
    for s in positives:
        above = [t for s2, t in zip(scores, targets, strict=True) if s2 >= s]
        precisions.append(sum(above) / len(above))
    return sum(precisions) / len(precisions)


def test_average_precision_with_ties_by_hand():
    # Thresholds 0.9 (1 hit of 1), 0.8 (2 hits of 3: the tie is one threshold), 0.1.
    # AP = 1/2 * 1 + 1/2 * 2/3 = 5/6; ranking the tied positive first would give 1.0.
    scores = torch.tensor([[0.9], [0.8], [0.8], [0.1]])
    targets = torch.tensor([[1], [0], [1], [0]])
    ap = average_precision_micro_macro(scores, targets)
    assert ap.micro == pytest.approx(5 / 6)
    assert ap.per_class == {0: pytest.approx(5 / 6)}
    # Same result whichever order the tied rows come in.
    swapped = average_precision_micro_macro(scores[[0, 2, 1, 3]], targets[[0, 2, 1, 3]])
    assert swapped.micro == pytest.approx(5 / 6)


def test_class_without_positives_is_left_out_of_macro_and_reported():
    scores = torch.tensor([[0.9, 0.2, 0.7], [0.1, 0.8, 0.6], [0.4, 0.3, 0.5]])
    targets = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 0]])  # class 2: no positive
    ap = average_precision_micro_macro(scores, targets)
    assert ap.no_positive == [2]
    assert set(ap.per_class) == {0, 1}
    assert ap.per_class[0] == pytest.approx(1.0)  # positives 0.9, 0.4 above negative 0.1
    assert ap.per_class[1] == pytest.approx(1.0)
    assert ap.macro == pytest.approx(1.0)
    # Micro pools all 9 pairs, class 2's negatives included: ranking 0.9+ 0.8+ 0.7 0.6 0.5 0.4+ ...
    # precisions at the positives: 1, 1, 3/6 -> AP = (1 + 1 + 0.5) / 3.
    assert ap.micro == pytest.approx(2.5 / 3)
    with pytest.raises(ValueError, match="no positive at all"):
        average_precision_micro_macro(scores, torch.zeros_like(targets))
    with pytest.raises(ValueError, match="only 0 and 1"):
        average_precision_micro_macro(scores, 2 * targets)


def test_average_precision_matches_reference_on_random_ties():
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 6, (60, 4), generator=g).float() / 5  # coarse: many ties
    targets = (torch.rand(60, 4, generator=g) < 0.3).long()
    ap = average_precision_micro_macro(scores, targets)
    for c in range(4):
        assert ap.per_class[c] == pytest.approx(
            _ap_reference(scores[:, c].tolist(), targets[:, c].tolist())
        )
    assert ap.micro == pytest.approx(
        _ap_reference(scores.flatten().tolist(), targets.flatten().tolist())
    )
    assert ap.macro == pytest.approx(sum(ap.per_class.values()) / 4)


def test_average_precision_matches_sklearn():
    skm = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(2)
    scores = torch.randint(0, 8, (80, 5), generator=g).float()
    targets = (torch.rand(80, 5, generator=g) < 0.25).long()
    ap = average_precision_micro_macro(scores, targets)
    assert ap.micro == pytest.approx(
        skm.average_precision_score(targets.numpy(), scores.numpy(), average="micro")
    )
    assert ap.macro == pytest.approx(
        skm.average_precision_score(targets.numpy(), scores.numpy(), average="macro")
    )


# ---------------------------------------------------------------- segmentation and change


def test_miou_by_hand_with_ignore_index():
    targets = torch.tensor([[[0, 0, 1, -1], [1, 1, 2, -1]]])  # [1, 2, 4]
    predictions = torch.tensor([[[0, 1, 1, 3], [1, 1, 3, 0]]])  # 3 only predicted (and ignored)
    result = miou(predictions, targets, n_classes=5)
    # Kept pixels (t, p): (0,0) (0,1) (1,1) (1,1) (1,1) (2,3).
    # IoU0 = 1/2, IoU1 = 3/4, IoU2 = 0/1, IoU3 = 0/1 (only predicted: counts); 4 in neither: out.
    assert result.per_class == pytest.approx({0: 0.5, 1: 0.75, 2: 0.0, 3: 0.0})
    assert result.mean == pytest.approx((0.5 + 0.75) / 4)
    # The ignored pixels' predictions do not count: changing them changes nothing.
    predictions[..., 3] = 4
    assert miou(predictions, targets, n_classes=5) == result
    all_ignored = miou(predictions, torch.full_like(targets, -1), n_classes=5)
    assert math.isnan(all_ignored.mean) and all_ignored.per_class == {}
    with pytest.raises(ValueError, match="targets hold 7"):
        miou(predictions, torch.full_like(targets, 7), n_classes=5)


def test_iou_from_summed_confusions_equals_miou_of_all_pixels():
    g = torch.Generator().manual_seed(3)
    targets = torch.randint(-1, 4, (6, 8, 8), generator=g)
    predictions = torch.randint(0, 4, (6, 8, 8), generator=g)
    keep = targets != -1
    summed = sum(
        confusion_matrix(p[k], t[k], 4) for p, t, k in zip(predictions, targets, keep, strict=True)
    )
    assert iou_from_confusion(summed) == miou(predictions, targets, 4)


def test_change_f1_iou_by_hand_with_ignore_index():
    targets = torch.tensor([[[1, 1, 0, 0], [1, 0, -1, -1]]])
    predictions = torch.tensor([[[1, 0, 1, 0], [1, 0, 1, 1]]])
    scores = change_f1_iou(predictions, targets)
    # Kept: tp = 2, fn = 1, fp = 1 (the two predicted changes under ignore do not count).
    assert scores.f1 == pytest.approx(4 / 6)
    assert scores.iou == pytest.approx(2 / 4)
    assert scores.precision == pytest.approx(2 / 3)
    assert scores.recall == pytest.approx(2 / 3)
    none = change_f1_iou(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2))
    assert math.isnan(none.f1) and math.isnan(none.iou)
    with pytest.raises(ValueError, match="predictions must hold only 0 and 1, found 2"):
        change_f1_iou(2 * predictions, targets)


# ---------------------------------------------------------------- confidence intervals


@pytest.mark.parametrize(
    ("df", "expected"),
    [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622), (29, 2.0452)],
)
def test_t_quantile_matches_table(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)
    assert t_quantile(0.025, df) == pytest.approx(-expected, abs=1e-4)


def test_t_quantile_tends_to_normal_and_other_levels():
    assert t_quantile(0.975, 5000) == pytest.approx(1.95996, abs=1e-3)
    assert t_quantile(0.95, 4) == pytest.approx(2.1318, abs=1e-4)  # one-sided 95%, table value
    assert t_quantile(0.5, 3) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_quantile(0.975, 0)


def test_t_quantile_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 5, 12, 50):
        for p in (0.6, 0.9, 0.975, 0.999):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9)


def test_mean_ci95_by_hand():
    mean, half = mean_ci95([1.0, 2.0, 3.0])  # s = 1, n = 3
    assert mean == pytest.approx(2.0)
    assert half == pytest.approx(4.3027 / math.sqrt(3), abs=1e-4)
    mean, half = mean_ci95([0.5, 0.5, 0.5, 0.5, 0.5])
    assert (mean, half) == (pytest.approx(0.5), pytest.approx(0.0))
    mean, half = mean_ci95([0.8])
    assert mean == 0.8 and math.isnan(half)
    with pytest.raises(ValueError, match="at least one value"):
        mean_ci95([])


# ---------------------------------------------------------------- kNN


def _clusters(n_per_class: int, n_classes: int = 4, dim: int = 16, seed: int = 0):
    """Points scattered around far-apart directions: [N, dim] features, [N] labels."""
    g = torch.Generator().manual_seed(seed)
    means = 5.0 * torch.eye(n_classes, dim)
    labels = torch.arange(n_classes).repeat_interleave(n_per_class)
    return means[labels] + 0.5 * torch.randn(len(labels), dim, generator=g), labels


def test_knn_scores_weighted_votes_by_hand():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    test = torch.tensor([[2.0, 0.0]])  # cosine 1, 0, 1/sqrt(2): scale does not matter
    scores = knn_classify(train, labels, test, k=2, temperature=0.5)
    w0, w2 = math.exp(1 / 0.5), math.exp(2**-0.5 / 0.5)  # neighbours 0 and 2
    assert scores.shape == (1, 2)
    assert scores[0].tolist() == pytest.approx([w0 / (w0 + w2), w2 / (w0 + w2)])


def test_knn_separable_clusters_are_classified_perfectly():
    train_x, train_y = _clusters(30, seed=0)
    test_x, test_y = _clusters(10, seed=1)
    result = knn_probe(train_x, train_y, test_x, test_y)
    assert isinstance(result, KnnResult)
    assert result.accuracy == 1.0 and result.balanced_accuracy == 1.0
    assert result.per_class_accuracy == {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0}
    assert result.majority_baseline == pytest.approx(0.25)
    assert result.k == 20 and result.temperature == 0.07


def test_weighted_votes_beat_majority_votes():
    # One near neighbour of class 0 against two farther ones of class 1, with k = 3.
    angles = torch.tensor([0.1, 1.2, -1.2])  # radians from the test direction
    train = torch.stack([angles.cos(), angles.sin()], dim=1)  # [3, 2]
    labels = torch.tensor([0, 1, 1])
    test = torch.tensor([[1.0, 0.0]])
    sharp = knn_classify(train, labels, test, k=3, temperature=0.07)
    flat = knn_classify(train, labels, test, k=3, temperature=1e4)  # ~equal weights: majority
    assert sharp.argmax(1).item() == 0
    assert flat.argmax(1).item() == 1
    assert flat[0].tolist() == pytest.approx([1 / 3, 2 / 3], abs=1e-3)


def test_k_is_clamped_to_the_train_size():
    train_x, train_y = _clusters(2, n_classes=3)  # N = 6
    test_x, test_y = _clusters(4, n_classes=3, seed=1)
    all_six = knn_classify(train_x, train_y, test_x, k=6)
    assert torch.equal(knn_classify(train_x, train_y, test_x, k=50), all_six)
    assert torch.equal(knn_classify(train_x, train_y, test_x), all_six)  # default min(20, N)
    assert knn_probe(train_x, train_y, test_x, test_y).k == 6
    assert not torch.equal(knn_classify(train_x, train_y, test_x, k=2), all_six)
    with pytest.raises(ValueError, match="k must be >= 1"):
        knn_classify(train_x, train_y, test_x, k=0)


def test_knn_matches_a_per_row_loop_reference():
    g = torch.Generator().manual_seed(5)
    train_x, train_y = torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g)
    test_x = torch.randn(5, 6, generator=g)
    scores = knn_classify(train_x, train_y, test_x, k=7, temperature=0.2)
    for row, query in enumerate(test_x.double()):
        cosines = [float(query @ t / (query.norm() * t.norm())) for t in train_x.double()]
        nearest = sorted(range(40), key=lambda i: -cosines[i])[:7]
        votes = [0.0, 0.0, 0.0]
        for i in nearest:
            votes[int(train_y[i])] += math.exp(cosines[i] / 0.2)
        assert scores[row].tolist() == pytest.approx([v / sum(votes) for v in votes], abs=1e-5)


def test_chunked_scores_equal_unchunked():
    g = torch.Generator().manual_seed(4)
    train_x, train_y = torch.randn(200, 24, generator=g), torch.randint(0, 7, (200,), generator=g)
    test_x = torch.randn(53, 24, generator=g)
    whole = knn_classify(train_x, train_y, test_x, batch_size=1000)
    # Equal up to float32 rounding: a matmul may block its sums differently for another shape.
    for batch_size in (1, 7, 53):
        chunked = knn_classify(train_x, train_y, test_x, batch_size=batch_size)
        torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
        assert torch.equal(chunked.argmax(1), whole.argmax(1))


def test_multilabel_scores_are_weighted_means_of_label_vectors():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])  # the last is never a neighbour
    labels = torch.tensor([[1, 0, 1], [0, 1, 1], [0, 0, 1]])
    test = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    scores = knn_classify(train, labels, test, k=2, temperature=0.5)
    w1, w0 = math.exp(1 / 0.5), 1.0  # similarities 1 and 0 for both test rows' two neighbours
    a = w1 / (w1 + w0)
    assert scores.tolist() == [
        pytest.approx([a, 1 - a, 1.0]),  # neighbours 0 (sim 1) and 1 (sim 0)
        pytest.approx([1 - a, a, 1.0]),  # neighbours 1 (sim 1) and 0 (sim 0)
    ]
    result = knn_probe(train, labels, test, torch.tensor([[1, 0, 0], [0, 1, 0]]), k=2)
    assert isinstance(result, KnnMultilabelResult)
    assert result.per_class_ap == {0: pytest.approx(1.0), 1: pytest.approx(1.0)}
    assert result.no_positive == [2] and result.map_macro == pytest.approx(1.0)
    assert 0 < result.map_micro < 1  # class 2 scores 1.0 for both rows, yet is never positive


def test_knn_rejects_mismatched_inputs():
    x, y = _clusters(3)
    with pytest.raises(ValueError, match="16 dims but test features have 8"):
        knn_classify(x, y, torch.randn(2, 8))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        knn_classify(x, y, x, temperature=0.0)
    with pytest.raises(ValueError, match="12 train features but 11 train labels"):
        knn_classify(x, y[:-1], x)
    with pytest.raises(ValueError, match="multi-hot"):
        knn_classify(x, torch.full((12, 3), 2), x)


def test_knn_on_real_indian_pines_spectra_beats_chance(sample_data):
    data = load_indian_pines(sample_data / "indian_pines_aviris", window=1)
    train_x = torch.from_numpy(np.asarray(data.x_train)).flatten(1)  # [N, 200] normalised spectra
    test_x = torch.from_numpy(np.asarray(data.x_test)).flatten(1)
    result = knn_probe(
        train_x,
        torch.from_numpy(data.y_train),
        test_x,
        torch.from_numpy(data.y_test),
        n_classes=len(data.class_names),
    )
    # Measured on the seed-0 blocked split (6134 train, 4115 test pixels): accuracy 0.513 against
    # a 0.273 test majority share and 1/16 chance. Raw spectra are a weak feature (neighbouring
    # classes such as the corn and soybean tillage types overlap spectrally), so the assertion
    # keeps a margin under the measured value rather than asking for a good classifier.
    assert result.accuracy > result.test_majority_share + 0.15
    assert result.accuracy > 0.45
    assert result.balanced_accuracy > 3 / 16
