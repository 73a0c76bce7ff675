"""Per-band statistics of shard folders and the normalisation they define."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from eoforge.datasets.errors import DataError
from eoforge.datasets.ingest import build_shards
from eoforge.datasets.shards import decode_sample, iter_tar_samples, list_shards
from eoforge.datasets.stats import FIELDS, Normaliser, _BandAccumulator, compute_stats
from eoforge.datasets.synthetic import write_demo_scenes


def valid_values(folder) -> dict[str, np.ndarray]:
    """Every valid raw value per band_id, read straight from the shards."""
    values: dict[str, list[np.ndarray]] = {}
    for url in list_shards(folder):
        for raw in iter_tar_samples(url):
            image, valid, meta = decode_sample(raw)
            for c, band_id in enumerate(meta["band_ids"]):
                values.setdefault(band_id, []).append(image[c][valid[c]].astype(np.float64))
    return {k: np.concatenate(v) for k, v in values.items()}


def clip_scale(x: np.ndarray, p1: float, p99: float) -> np.ndarray:
    return (np.clip(x, p1, p99) - p1) / (p99 - p1)


@pytest.fixture(scope="module")
def shard_dirs(sample_data, tmp_path_factory):
    """Real BigEarthNet S2 (uint16, all valid) and synthetic S2 with nodata patches."""
    root = tmp_path_factory.mktemp("stats")
    real = root / "ben_s2"
    build_shards(
        sample_data / "bigearthnet_s1s2/v1_tiles_bigearthnet_encoder/s2-tiny",
        real,
        "S2L2A",
        tile_size=120,
        progress=False,
    )
    demo = write_demo_scenes(root / "raw", n_scenes=3)
    synthetic = root / "demo_s2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the nodata patches are reported; not the point here
        build_shards(demo["S2L2A"], synthetic, "S2L2A", tile_size=32, shard_size=5, progress=False)
    return {"real": real, "synthetic": synthetic}


@pytest.mark.parametrize("which", ["real", "synthetic"])
def test_stats_equal_numpy_on_the_same_values(shard_dirs, which):
    folder = shard_dirs[which]
    path = compute_stats(folder, progress=False)
    stats = json.loads(path.read_text())
    assert path == folder / "stats.json"
    assert stats["version"] == 1 and stats["clip_percentiles"] == [1, 99]
    values = valid_values(folder)
    assert sorted(stats["bands"]) == sorted(values)
    for band_id, x in values.items():
        row = stats["bands"][band_id]
        assert set(row) == set(FIELDS)
        assert row["count"] == x.size  # invalid pixels (synthetic nodata patch) are excluded
        assert row["mean"] == pytest.approx(x.mean(), rel=1e-12)
        assert row["std"] == pytest.approx(x.std(), rel=1e-9)
        p1, p99 = np.percentile(x, [1, 99])  # below max_values_per_band: exact
        assert row["p1"] == pytest.approx(p1) and row["p99"] == pytest.approx(p99)
        scaled = clip_scale(x, p1, p99)
        assert row["norm_mean"] == pytest.approx(scaled.mean(), rel=1e-6)
        assert row["norm_std"] == pytest.approx(scaled.std(), rel=1e-6)
    if which == "synthetic":
        pixels = json.loads((folder / "index.json").read_text())["samples"] * 32 * 32
        assert min(r["count"] for r in stats["bands"].values()) < pixels


def test_subsampled_percentiles_are_close_and_seeded(shard_dirs):
    folder = shard_dirs["real"]
    values = valid_values(folder)
    first = json.loads(
        compute_stats(folder, max_values_per_band=2_000, seed=3, progress=False).read_text()
    )
    again = json.loads(
        compute_stats(folder, max_values_per_band=2_000, seed=3, progress=False).read_text()
    )
    other = json.loads(
        compute_stats(folder, max_values_per_band=2_000, seed=4, progress=False).read_text()
    )
    assert first == again
    assert first != other
    for band_id, x in values.items():
        row = first["bands"][band_id]
        assert row["mean"] == pytest.approx(x.mean(), rel=1e-12)  # moments stay exact
        assert row["std"] == pytest.approx(x.std(), rel=1e-9)
        # 2,000 of 43,200 values: the estimates sit at the right ranks of the full data.
        assert 0.0 <= (x < row["p1"]).mean() <= 0.03
        assert 0.97 <= (x <= row["p99"]).mean() <= 1.0
        assert row["norm_mean"] == pytest.approx(
            clip_scale(x, row["p1"], row["p99"]).mean(), abs=0.03
        )


def test_reservoir_is_uniform_over_the_stream():
    # One band whose values are their own position in the stream: a uniform subsample of
    # 0..N-1 has mean about N/2 whatever the order in which samples arrive.
    acc = _BandAccumulator(capacity=1_000)
    rng = np.random.default_rng(0)
    stream = np.arange(100_000, dtype=np.float64)
    for chunk in np.array_split(stream, 37):
        acc.add(chunk, rng)
    assert acc.count == stream.size and acc.reservoir.size == 1_000
    assert np.unique(acc.reservoir).size == 1_000  # without replacement
    assert abs(acc.reservoir.mean() - stream.mean()) < 3 * stream.std() / np.sqrt(1_000)
    assert acc.mean == pytest.approx(stream.mean()) and np.sqrt(
        acc.m2 / acc.count
    ) == pytest.approx(stream.std())


STATS = {
    "version": 1,
    "clip_percentiles": [1, 99],
    "bands": {
        "X:A": {
            "count": 10,
            "mean": 150.0,
            "std": 40.0,
            "p1": 100.0,
            "p99": 200.0,
            "norm_mean": 0.5,
            "norm_std": 0.25,
        },
        "X:FLAT": {
            "count": 10,
            "mean": 7.0,
            "std": 0.0,
            "p1": 7.0,
            "p99": 7.0,
            "norm_mean": 0.0,
            "norm_std": 0.0,
        },
        "X:EMPTY": dict.fromkeys(FIELDS, None) | {"count": 0},
    },
}


def test_normaliser_maps_the_clipped_range():
    norm = Normaliser(STATS)
    x = np.array([[[50.0, 100.0, 150.0, 200.0, 300.0]]], dtype=np.float32)  # [1, 1, 5]
    valid = np.array([[[True, True, True, True, False]]])
    out = norm(x, valid, ["X:A"])
    assert out.dtype == np.float32 and out.shape == x.shape
    # clip to [100, 200] -> [0, 1] -> z-score with mean 0.5, std 0.25; invalid -> 0
    np.testing.assert_allclose(out[0, 0], [-2.0, -2.0, 0.0, 2.0, 0.0], atol=1e-6)


def test_normaliser_integer_input_and_degenerate_bands():
    norm = Normaliser(STATS)
    x = np.stack(
        [
            np.full((2, 2), 150, np.uint16),
            np.full((2, 2), 7, np.uint16),
            np.full((2, 2), 3, np.uint16),
        ]
    )
    valid = np.ones(x.shape, dtype=bool)
    valid[2] = False
    out = norm(x, valid, ["X:A", "X:FLAT", "X:EMPTY"])
    np.testing.assert_array_equal(out, np.zeros(x.shape, np.float32))  # mean, constant, never valid


def test_normaliser_from_file_names_unknown_band_and_file(shard_dirs):
    path = compute_stats(shard_dirs["real"], progress=False)
    norm = Normaliser.from_file(path)
    assert "S2L2A:B8A" in norm.band_ids
    x = np.zeros((1, 4, 4), np.float32)
    with pytest.raises(DataError) as info:
        norm(x, np.ones_like(x, bool), ["S1GRD:VV"])
    assert "S1GRD:VV" in str(info.value) and str(path) in str(info.value)
    with pytest.raises(DataError, match="does not exist.*eoforge data stats"):
        Normaliser.from_file(shard_dirs["real"] / "nope.json")


def test_normalised_real_band_has_zero_mean_unit_std(shard_dirs):
    folder = shard_dirs["real"]
    norm = Normaliser.from_file(compute_stats(folder, progress=False))
    out: dict[str, list[np.ndarray]] = {}
    for url in list_shards(folder):
        for raw in iter_tar_samples(url):
            image, valid, meta = decode_sample(raw)
            z = norm(image, valid, meta["band_ids"])
            for c, band_id in enumerate(meta["band_ids"]):
                out.setdefault(band_id, []).append(z[c][valid[c]])
    for band_id, parts in out.items():
        z = np.concatenate(parts).astype(np.float64)
        assert z.mean() == pytest.approx(0.0, abs=1e-4), band_id
        assert z.std() == pytest.approx(1.0, rel=1e-3), band_id


def test_from_files_merges_sensors_and_rejects_conflicts(tmp_path):
    a, b, c = (tmp_path / f"{n}.json" for n in "abc")
    a.write_text(json.dumps({"bands": {"X:A": STATS["bands"]["X:A"]}}))
    b.write_text(json.dumps({"bands": {"Y:B": STATS["bands"]["X:A"]}}))
    conflicting = dict(STATS["bands"]["X:A"], p99=250.0)
    c.write_text(json.dumps({"bands": {"X:A": conflicting}}))
    assert sorted(Normaliser.from_files([a, b]).band_ids) == ["X:A", "Y:B"]
    with pytest.raises(DataError, match=f"X:A has different statistics in {a} and {c}"):
        Normaliser.from_files([a, b, c])
