"""The streaming reader: sample/batch contracts, determinism, resume, rank and worker splits."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings
from itertools import islice

import numpy as np
import pytest
import torch

from eoforge.datasets.batching import collate, sensor_of
from eoforge.datasets.errors import DataError
from eoforge.datasets.ingest import build_shards
from eoforge.datasets.reader import ShardStream, distributed_rank, to_sample
from eoforge.datasets.shards import (
    decode_sample,
    encode_sample,
    iter_tar_samples,
    list_shards,
    sanitise_key,
)
from eoforge.datasets.stats import Normaliser, compute_stats
from eoforge.datasets.synthetic import write_demo_scenes

CHANNELS = {"S2L2A": 12, "S1GRD": 2, "ENMAP": 224}
TILE = 32
PER_SENSOR = 16  # 4 scenes x 4 tiles of 32 over 64 x 64


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Mixed S2 + S1 + EnMAP shard folders (4 shards of 4 samples per sensor) and a normaliser."""
    root = tmp_path_factory.mktemp("reader")
    folders = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nodata patches and corners are reported, and expected
        for sensor, src in write_demo_scenes(root / "raw", n_scenes=4).items():
            out = root / "shards" / sensor
            build_shards(src, out, sensor, tile_size=TILE, shard_size=4, progress=False)
            compute_stats(out, progress=False)
            folders.append(out)
    normaliser = Normaliser.from_files([f / "stats.json" for f in folders])
    ids = {raw["__key__"] for url in list_shards(folders) for raw in iter_tar_samples(url)}
    return folders, normaliser, ids


def stream(shards, **kwargs) -> ShardStream:
    folders, normaliser, _ = shards
    options = {"batch_size": 4, "seed": 0, "shuffle_buffer": 8} | kwargs
    return ShardStream(folders, normaliser, **options)


def batch_ids(batches) -> list[list[str]]:
    return [b["meta"]["id"] for b in batches]


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert batch_ids(a) == batch_ids(b)
    for x, y in zip(a, b, strict=True):
        sensor = sensor_of(x)
        assert sensor_of(y) == sensor
        for key in ("image", "valid", "wavelengths", "gsd"):
            assert torch.equal(x[sensor][key], y[sensor][key]), key


def test_sample_contract(shards):
    folders, normaliser, _ = shards
    url = list_shards(folders[0])[0]
    for raw in iter_tar_samples(url):
        sample = to_sample(raw, normaliser)
        sensor = sensor_of(sample)
        view, meta = sample[sensor], sample["meta"]
        c = CHANNELS[sensor]
        assert set(sample) == {sensor, "meta"}
        assert set(view) == {
            "image",
            "band_ids",
            "wavelengths",
            "bandwidths",
            "valid",
            "gsd",
            "time",
        }
        assert view["image"].dtype == torch.float32 and view["image"].shape == (c, TILE, TILE)
        assert view["valid"].dtype == torch.bool and view["valid"].shape == (c, TILE, TILE)
        assert len(view["band_ids"]) == c and all(
            b.startswith(f"{sensor}:") for b in view["band_ids"]
        )
        assert view["wavelengths"].dtype == torch.float32 and view["wavelengths"].shape == (c,)
        assert view["bandwidths"].dtype == torch.float32 and view["bandwidths"].shape == (c,)
        assert isinstance(view["gsd"], float)
        assert view["time"].dtype == torch.int64 and view["time"].ndim == 0
        assert set(meta) == {"id", "crs", "bounds", "source", "shard"}
        assert meta["shard"] == url and len(meta["bounds"]) == 4 and meta["crs"].startswith("EPSG:")
        assert torch.isfinite(view["image"]).all()
        assert (view["image"][~view["valid"]] == 0).all()


def test_batches_are_sensor_homogeneous(shards):
    batches = list(stream(shards).epoch_batches(0))
    assert len(batches) == 3 * PER_SENSOR // 4  # every buffer fills exactly: nothing dropped
    seen = set()
    for batch in batches:
        sensor = sensor_of(batch)
        seen.add(sensor)
        view, c = batch[sensor], CHANNELS[sensor]
        assert view["image"].shape == (4, c, TILE, TILE) and view["image"].dtype == torch.float32
        assert view["valid"].shape == (4, c, TILE, TILE) and view["valid"].dtype == torch.bool
        assert len(view["band_ids"]) == c
        assert view["wavelengths"].shape == (4, c) and view["bandwidths"].shape == (4, c)
        assert view["gsd"].shape == (4,) and view["gsd"].dtype == torch.float32
        assert view["time"].shape == (4,) and view["time"].dtype == torch.int64
        assert all(len(batch["meta"][k]) == 4 for k in ("id", "source", "shard", "crs", "bounds"))
        assert all(i.startswith(sensor) for i in batch["meta"]["id"])
    assert seen == set(CHANNELS)


def test_collate_refuses_mixed_samples(shards):
    folders, normaliser, _ = shards
    samples = [
        to_sample(next(iter_tar_samples(list_shards(f)[0])), normaliser) for f in folders[:2]
    ]
    with pytest.raises(DataError, match="cannot batch samples of different sensors"):
        collate(samples)


def test_same_seed_gives_identical_batches(shards):
    first = list(islice(stream(shards).iter_batches(), 15))  # crosses into the second epochs
    again = list(islice(stream(shards).iter_batches(), 15))
    assert_same_batches(first, again)
    other = list(islice(stream(shards, seed=1).iter_batches(), 15))
    assert batch_ids(other) != batch_ids(first)
    assert batch_ids(list(stream(shards).epoch_batches(1))) != batch_ids(
        list(stream(shards).epoch_batches(0))
    )


@pytest.mark.parametrize("stop", [5, 14, 30])
def test_resuming_from_the_state_equals_the_uninterrupted_stream(shards, stop):
    full = list(islice(stream(shards).iter_batches(), stop + 4))
    first = stream(shards)
    list(islice(first.iter_batches(), stop))
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip
    resumed = stream(shards)
    resumed.load_state_dict(state)
    assert_same_batches(list(islice(resumed.iter_batches(), 4)), full[stop:])


def test_two_ranks_read_disjoint_shards_covering_everything(shards):
    _, _, ids = shards
    per_rank = []
    for rank in (0, 1):
        s = stream(shards, batch_size=1, rank=rank, world_size=2)
        per_rank.append([i for b in s.epoch_batches(0) for i in b["meta"]["id"]])
    a, b = (set(r) for r in per_rank)
    assert len(a) == len(per_rank[0]) and len(b) == len(per_rank[1])
    assert not a & b
    assert a | b == ids


def test_rank_from_environment(shards, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed_rank() == (1, 2)
    from_env = batch_ids(stream(shards, batch_size=1).epoch_batches(0))
    explicit = batch_ids(stream(shards, batch_size=1, rank=1, world_size=2).epoch_batches(0))
    assert from_env == explicit


def test_torch_distributed_rank_takes_precedence(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 2)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 3)
    assert distributed_rank() == (2, 3)


def test_two_workers(shards):
    _, _, ids = shards
    s = stream(shards, batch_size=1, num_workers=2)
    seen = [i for b in s.epoch_batches(0) for i in b["meta"]["id"]]
    assert sorted(seen) == sorted(ids)
    first = list(islice(stream(shards, num_workers=2).iter_batches(), 14))
    again = list(islice(stream(shards, num_workers=2).iter_batches(), 14))
    assert_same_batches(first, again)
    stopped = stream(shards, num_workers=2)
    list(islice(stopped.iter_batches(), 9))  # odd: worker 1's turn is next
    resumed = stream(shards, num_workers=2)
    resumed.load_state_dict(stopped.state_dict())
    assert_same_batches(list(islice(resumed.iter_batches(), 5)), first[9:])


def test_an_epoch_without_batches_raises(shards):
    with pytest.raises(
        DataError, match=r"12 shards \(48 samples\) in all, 0 shards .* on this rank"
    ):
        next(stream(shards, rank=12, world_size=13).iter_batches())
    with pytest.raises(DataError, match="no batch of 64.*smaller batch_size"):
        next(stream(shards, batch_size=64).iter_batches())


def test_bad_arguments(shards):
    folders, normaliser, _ = shards
    with pytest.raises(DataError, match="batch_size"):
        ShardStream(folders, normaliser, batch_size=0)
    with pytest.raises(DataError, match="rank 2 is outside world size 2"):
        ShardStream(folders, normaliser, batch_size=1, rank=2, world_size=2)


RANK_SCRIPT = """
import json, multiprocessing, sys
import torch.distributed as dist
from eoforge.datasets.reader import ShardStream
from eoforge.datasets.stats import Normaliser

if __name__ == "__main__":
    # spawn: DataLoader workers start without the parent's process group, as on macOS or with
    # Python's forkserver default; the stream must still give each rank its own shards.
    multiprocessing.set_start_method("spawn", force=True)
    rank, world_size, port, out, *folders = sys.argv[1:]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=int(rank),
                            world_size=int(world_size))
    normaliser = Normaliser.from_files([f + "/stats.json" for f in folders])
    stream = ShardStream(folders, normaliser, batch_size=1, shuffle_buffer=4, num_workers=1)
    ids = [i for batch in stream.epoch_batches(0) for i in batch["meta"]["id"]]
    with open(out, "w") as f:
        json.dump(ids, f)
    dist.barrier()
    dist.destroy_process_group()
"""


def test_two_gloo_ranks_with_spawned_workers(shards, tmp_path):
    folders, _, ids = shards
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(script),
                str(rank),
                "2",
                str(port),
                str(tmp_path / f"{rank}.json"),
                *map(str, folders),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    for proc in procs:
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, output
    per_rank = [set(json.loads((tmp_path / f"{rank}.json").read_text())) for rank in (0, 1)]
    assert not per_rank[0] & per_rank[1]
    assert per_rank[0] | per_rank[1] == ids


def test_list_shards_accepts_folder_brace_pattern_and_list(shards):
    folders, _, _ = shards
    from_folder = list_shards(folders[0])
    assert [p.rsplit("/", 1)[1] for p in from_folder] == [f"shard-{i:06d}.tar" for i in range(4)]
    assert list_shards(f"{folders[0]}/shard-{{000000..000003}}.tar") == from_folder
    assert list_shards([folders[0], from_folder[0]]) == [*from_folder, from_folder[0]]
    with pytest.raises(DataError, match="shard-000008.tar .* does not exist"):
        list_shards(f"{folders[0]}/shard-{{000008..000009}}.tar")
    with pytest.raises(DataError, match="has no index.json"):
        list_shards(folders[0].parent)


def test_encode_decode_round_trip():
    image = np.arange(2 * 3 * 4, dtype=np.float16).reshape(2, 3, 4)
    valid = np.ones(image.shape, dtype=bool)
    meta = {"id": "a-b_c", "band_ids": ["X:A", "X:B"]}
    raw = encode_sample("a-b_c", image, valid, meta)
    assert set(raw) == {"__key__", "image.npy", "json"}  # all valid: no mask stored
    image[0, 1, 2], valid[0, 1, 2] = np.nan, False
    raw = encode_sample("a-b_c", image, valid, meta)
    decoded, mask, back = decode_sample(raw)
    assert decoded.dtype == np.float16 and np.array_equal(mask, valid) and back == meta
    assert sanitise_key("S2L2A_a.b/c d") == "S2L2A_a_b_c_d"
    with pytest.raises(DataError, match="contains characters"):
        encode_sample("a.b", image, valid, meta)
    with pytest.raises(DataError, match="float64"):
        encode_sample("ab", image.astype(np.float64), valid, meta)
    with pytest.raises(DataError, match="no .image.npy member"):
        decode_sample({"__key__": "ab", "json": b"{}"})
