"""Bad data in the reader: an undecodable sample, NaN/Inf at valid pixels, an all-nodata tile, a
band count that disagrees with the metadata and a truncated shard are each skipped, counted under
their reason, logged with shard and key, kept across resume; ``max_bad_fraction`` stops a run."""

from __future__ import annotations

import io
import json
import logging
import shutil
from itertools import islice
from pathlib import Path

import numpy as np
import pytest

from eoforge.datasets.errors import DataError
from eoforge.datasets.ingest import write_shard_folder
from eoforge.datasets.reader import ShardStream
from eoforge.datasets.sample_checks import (
    ALL_NODATA,
    BAND_COUNT,
    NON_FINITE,
    REASONS,
    TRUNCATED_SHARD,
    UNDECODABLE,
    bad_reason,
)
from eoforge.datasets.shards import (
    FORMAT,
    FORMAT_VERSION,
    SHARD_NAME,
    STATS_FILE,
    encode_group,
    encode_sample,
    iter_tar_samples,
    list_shards,
)
from eoforge.datasets.stats import Normaliser, compute_stats
from eoforge.pretrain.config import DataConfig
from eoforge.pretrain.data import build_stream

from pretrain_runs import eoforge, scalars

BANDS = ["S1GRD:VV", "S1GRD:VH"]
SIZE = 8
SHARD_SIZE = 8
# The bad samples of shards 0 and 1 and their reasons; shard 2 is cut half-way.
BAD = {
    "undecodable": UNDECODABLE,
    "nan_at_valid": NON_FINITE,
    "all_nodata": ALL_NODATA,
    "band_count": BAND_COUNT,
    "inf_no_mask": NON_FINITE,
}
STATS_ROW = {"count": 64, "p1": 0.0, "p99": 1.0, "norm_mean": 0.5, "norm_std": 0.25}


def meta(key: str) -> dict:
    return {
        "id": key,
        "sensor": "S1GRD",
        "band_ids": BANDS,
        "wavelengths": [5.547e7] * 2,
        "bandwidths": [0.0] * 2,
        "gsd": 10.0,
        "crs": "EPSG:32632",
        "bounds": [0, 0, 80, 80],
        "source": "test",
        "time": None,
    }


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def sample(key: str, rng: np.random.Generator) -> dict:
    """One encoded sample: good unless ``key`` names a kind of bad sample (``BAD``)."""
    image = rng.uniform(0, 1, (2, SIZE, SIZE)).astype(np.float16)
    valid = np.ones(image.shape, dtype=bool)
    if key in ("nan_at_invalid", "nan_at_valid"):
        image[0, 0, :2], valid[0, 0, :2] = np.nan, False  # nodata, as the writers store it
    if key == "nan_at_valid":
        image[1, 3, 3] = np.nan  # the stored mask marks it valid
    if key == "inf_no_mask":
        image[0, 5, 5] = np.inf  # no mask stored: every pixel is marked valid
    if key == "all_nodata":
        image[:], valid[:] = np.nan, False
    raw = encode_sample(key, image, valid, meta(key))
    if key == "undecodable":
        raw["image.npy"] = b"\x93NUMPY garbage, not an npy header" + bytes(64)
    if key == "band_count":
        raw["image.npy"] = npy(rng.uniform(0, 1, (3, SIZE, SIZE)).astype(np.float16))
    return raw


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A shard folder of 3 shards: shard 0 and 1 hold the bad samples among good ones, shard 2
    (good samples only) is cut half-way. Returns the folder, the normaliser, the good ids a full
    epoch reads, and the samples read in it."""
    out = tmp_path_factory.mktemp("bad") / "s1"
    rng = np.random.default_rng(0)
    keys = [
        *("g00", "g01", "g02", "undecodable", "g03", "nan_at_valid", "g04", "all_nodata"),
        *("g10", "band_count", "g11", "nan_at_invalid", "g12", "inf_no_mask", "g13", "g14"),
        *(f"g2{i}" for i in range(SHARD_SIZE)),
    ]

    def index(counts: list[int]) -> dict:
        rows = [{"name": SHARD_NAME.format(i), "samples": n} for i, n in enumerate(counts)]
        return {"format": FORMAT, "version": FORMAT_VERSION, "shards": rows, "samples": len(keys)}

    write_shard_folder(
        out,
        (sample(key, rng) for key in keys),
        index,
        shard_size=SHARD_SIZE,
        overwrite=False,
        empty=lambda: DataError("no sample"),
        order_seed=None,  # the bad samples in the shards named above
    )
    (out / STATS_FILE).write_text(json.dumps({"bands": dict.fromkeys(BANDS, STATS_ROW)}))
    last = out / SHARD_NAME.format(2)
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    kept = []
    with pytest.raises(DataError, match="truncated"):
        for raw in iter_tar_samples(last):
            kept.append(raw["__key__"])
    assert 0 < len(kept) < SHARD_SIZE  # the samples before the damage, and some lost
    good = {k for k in keys[: 2 * SHARD_SIZE] if k not in BAD} | set(kept)
    return out, Normaliser.from_file(out / STATS_FILE), good, 2 * SHARD_SIZE + len(kept)


def make(shards, **kwargs) -> ShardStream:
    folder, normaliser, _, _ = shards
    options = {"batch_size": 2, "shuffle_buffer": 4, "max_bad_fraction": 1.0} | kwargs
    return ShardStream(folder, normaliser, **options)


def ids(batches) -> list[list[str]]:
    return [b["meta"]["id"] for b in batches]


def test_bad_reason_names_each_kind_and_passes_good_samples(shards):
    folder, _, _, _ = shards
    raws = [raw for url in list_shards(folder)[:2] for raw in iter_tar_samples(url)]
    reasons = {raw["__key__"]: bad_reason(raw) for raw in raws}
    assert {k: r for k, r in reasons.items() if r is not None} == BAD
    assert reasons["nan_at_invalid"] is None  # NaN where the mask says invalid is nodata
    assert bad_reason({k: v for k, v in raws[0].items() if k != "json"}) == UNDECODABLE
    assert bad_reason(raws[0] | {"json": b"{not json"}) == UNDECODABLE
    integers = encode_sample(
        "u", np.zeros((2, 4, 4), np.uint16), np.ones((2, 4, 4), bool), meta("u")
    )
    assert bad_reason(integers) is None
    # float32 is no stored dtype (shards.STORED_DTYPES): the decoders refuse it, NaN or not.
    float32 = integers | {"image.npy": npy(np.zeros((2, 4, 4), np.float32))}
    assert bad_reason(float32) == UNDECODABLE
    wrong_mask = integers | {"valid.npy": npy(np.ones((2, 4, 5), bool))}
    assert bad_reason(wrong_mask) == UNDECODABLE


def group_raw(s1: tuple | None, s2_shape: tuple = (2, SIZE, SIZE)) -> dict:
    """A group sample of an S1 view (``(image, valid)``, or absent) and an all-nodata 2-band S2
    view whose image is then replaced by one of ``s2_shape``."""
    s2 = np.ones((2, SIZE, SIZE), np.uint16)
    band_rows = {
        "S1GRD": {"band_ids": BANDS, "wavelengths": [5.547e7] * 2, "bandwidths": [0.0] * 2},
        "S2L2A": {"band_ids": ["S2L2A:B04", "S2L2A:B08"], "wavelengths": [665.0, 842.0]}
        | {"bandwidths": [30.0, 115.0]},
    }
    present = {"S1GRD": s1 is not None, "S2L2A": True}
    sensors = {
        name: row | {"present": present[name], "shape": [2, SIZE, SIZE], "gsd": 10.0}
        for name, row in band_rows.items()
    }
    group = {"id": "grp", "crs": "EPSG:32632", "bounds": [0, 0, 80, 80], "source": "test"}
    views = {"S2L2A": (s2, np.zeros(s2.shape, bool))} | ({"S1GRD": s1} if s1 else {})
    raw = encode_group("grp", views, group | {"sensors": sensors})
    raw["s2l2a.image.npy"] = npy(np.ones(s2_shape, np.uint16))
    raw["s2l2a.valid.npy"] = npy(np.zeros(s2_shape, bool))
    return raw


def test_group_samples_are_checked_per_view():
    s1 = np.ones((2, SIZE, SIZE), np.float16)
    everywhere = np.ones(s1.shape, bool)
    assert bad_reason(group_raw((s1, everywhere))) is None  # S2 all nodata, S1 has data
    assert bad_reason(group_raw(None)) == ALL_NODATA  # S1 absent, S2 without a valid pixel
    assert bad_reason(group_raw((s1, everywhere), s2_shape=(3, SIZE, SIZE))) == BAND_COUNT
    # Two dates where the metadata records one image: it would not batch with the others.
    assert bad_reason(group_raw((s1, everywhere), s2_shape=(2, 2, SIZE, SIZE))) == BAND_COUNT
    s1[1, 2, 2] = np.inf
    assert bad_reason(group_raw((s1, everywhere))) == NON_FINITE


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_bad_samples_are_skipped_counted_and_logged(shards):
    folder, _, good, read = shards
    records = Records()
    logger = logging.getLogger("eoforge")
    logger.addHandler(records)
    try:
        stream = make(shards, batch_size=1)
        seen = [i for batch in ids(stream.epoch_batches(0)) for i in batch]
    finally:
        logger.removeHandler(records)
    assert sorted(seen) == sorted(good)  # every good sample once, no bad one
    health = stream.health()
    expected = dict.fromkeys(REASONS, 0) | {
        UNDECODABLE: 1,
        BAND_COUNT: 1,
        NON_FINITE: 2,
        ALL_NODATA: 1,
        TRUNCATED_SHARD: 1,
    }
    assert health == {"samples": read, "bad": expected, "bad_fraction": 6 / read}
    urls = list_shards(folder)
    for key, reason in BAD.items():
        url = urls[0] if key in ("undecodable", "nan_at_valid", "all_nodata") else urls[1]
        assert [m for m in records.messages if key in m and url in m and reason in m], key
    assert [m for m in records.messages if urls[2] in m and TRUNCATED_SHARD in m]
    assert len(records.messages) == 6


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_keeps_counts_and_repeats_or_skips_no_good_sample(shards, workers):
    full_stream = make(shards, num_workers=workers)
    full, healths = [], []
    for batch in islice(full_stream.iter_batches(), 24):  # about two epochs per worker
        full.append(batch)
        healths.append(full_stream.health())
    assert all(healths[-1]["bad"][reason] >= 1 for reason in REASONS)
    assert all(set(b["meta"]["id"]).isdisjoint(BAD) for b in full)
    stop = 7  # odd: with two workers, the second worker's turn is next
    first = make(shards, num_workers=workers)
    list(islice(first.iter_batches(), stop))
    state = json.loads(json.dumps(first.state_dict()))
    resumed = make(shards, num_workers=workers)
    resumed.load_state_dict(state)
    assert resumed.health() == healths[stop - 1]  # the counts travel with the position
    after = []
    for batch in islice(resumed.iter_batches(), len(full) - stop):
        after.append((batch["meta"]["id"], resumed.health()))
    assert after == [(b["meta"]["id"], h) for b, h in zip(full[stop:], healths[stop:], strict=True)]


def test_positions_saved_without_counts_resume_from_zero(shards):
    full = ids(islice(make(shards).iter_batches(), 10))
    first = make(shards)
    list(islice(first.iter_batches(), 4))
    state = first.state_dict()
    for worker in state["workers"]:
        del worker["samples"], worker["bad"]
    resumed = make(shards)
    resumed.load_state_dict(state)
    assert resumed.health()["samples"] == 0
    assert ids(islice(resumed.iter_batches(), 6)) == full[4:]
    assert resumed.health()["samples"] > 0


def test_max_bad_fraction_stops_the_stream_above_the_limit(shards):
    # About 6 of every 20 samples are bad. With a limit of 0.05 the stream may stop only from
    # the 20th sample read on: one bad sample among the first few does not stop a run.
    stream = make(shards, max_bad_fraction=0.05)
    batches, fractions = stream.iter_batches(), []
    with pytest.raises(DataError) as err:
        for _ in range(40):
            next(batches)
            fractions.append(stream.health()["bad_fraction"])
    assert max(fractions) > 0.05  # tolerated while fewer than 20 samples were read
    health, message = stream.health(), str(err.value)
    assert health["samples"] >= 20
    assert message.startswith(f"{sum(health['bad'].values())} of {health['samples']} samples")
    assert "data.max_bad_fraction=0.05" in message and "see the rank logs" in message
    assert all(reason in message for reason in (UNDECODABLE, NON_FINITE, TRUNCATED_SHARD))
    assert len(list(islice(make(shards, max_bad_fraction=0.5).iter_batches(), 40))) == 40
    with pytest.raises(DataError, match="max_bad_fraction=0.1"):  # evaluation passes count too
        list(make(shards, max_bad_fraction=0.1).epoch_batches(0))
    strict = make(shards, max_bad_fraction=0.0)  # 0: the first bad sample stops the stream
    batches = strict.iter_batches()
    with pytest.raises(DataError, match=r"max_bad_fraction=0\.0 allows"):
        for _ in range(40):
            next(batches)
            assert strict.health()["bad_fraction"] == 0  # no batch after a bad sample


def test_max_bad_fraction_is_validated_and_reaches_the_stream(shards):
    folder, normaliser, _, _ = shards
    with pytest.raises(DataError, match="max_bad_fraction=1.5"):
        ShardStream(folder, normaliser, batch_size=1, max_bad_fraction=1.5)
    with pytest.raises(ValueError, match="data.max_bad_fraction=-0.1"):
        DataConfig(shards=[str(folder)], max_bad_fraction=-0.1).validate()
    cfg = DataConfig(shards=[str(folder)], max_bad_fraction=0.2)
    cfg.validate()
    assert build_stream(cfg, [Path(folder)], seed=0).max_bad_fraction == 0.2


@pytest.mark.slow
def test_pretraining_logs_bad_data_counters_and_stops_over_the_limit(shards, tmp_path):
    folder = shards[0]
    common = [
        *("pretrain", "--config", "demo", "data.demo=false", f"data.shards=[{folder}]"),
        *("data.batch_size=2", "data.shuffle_buffer=4", "log_every=3", "image_every=100"),
        *("release.export=false", "engine.precision=fp32"),
    ]
    run = tmp_path / "run"
    eoforge([*common, "steps=6", "data.max_bad_fraction=0.5", f"run_dir={run}"], tmp_path)
    bad = {reason: scalars(run, f"data/bad/{reason}")[6] for reason in REASONS}
    assert sum(bad.values()) >= 1
    # Every sample read went into a batch (6 steps of 2) or was skipped as bad.
    read = scalars(run, "data/samples")[6]
    assert read == 12 + sum(bad.values()) - bad[TRUNCATED_SHARD]
    result = eoforge(
        [*common, "steps=40", "data.max_bad_fraction=0.05", f"run_dir={tmp_path / 'strict'}"],
        tmp_path,
        check=False,
    )
    assert result.returncode != 0
    assert "more than data.max_bad_fraction=0.05 allows" in result.stderr


def test_statistics_leave_bad_data_out(shards, tmp_path, caplog):
    folder = tmp_path / "s1"
    shutil.copytree(shards[0], folder)
    index = json.loads((folder / "index.json").read_text())
    index["bands"] = [{"band_id": band} for band in BANDS]
    (folder / "index.json").write_text(json.dumps(index))
    with caplog.at_level(logging.WARNING, logger="eoforge"):
        stats = json.loads(compute_stats(folder, progress=False).read_text())
    assert stats["skipped"] == {reason: 1 for reason in REASONS} | {NON_FINITE: 2}
    for band in BANDS:  # the NaN/Inf of corrupt samples did not reach the statistics
        assert all(np.isfinite(stats["bands"][band][field]) for field in ("mean", "std", "p99"))
    assert "stats: skipped sample nan_at_valid of shard" in caplog.text
