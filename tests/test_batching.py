"""Batches built straight from raw samples, finished where they are used, and the tar and npy
readers under them: the fast path must equal ``collate`` of ``to_sample`` exactly."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
import warnings

import numpy as np
import pytest
import torch

from eoforge.datasets.batching import BufferRing, collate, direct_batch, finish_batch, sensor_of
from eoforge.datasets.errors import DataError
from eoforge.datasets.ingest import build_shards
from eoforge.datasets.reader import RING, ShardStream, to_sample
from eoforge.datasets.shards import (
    encode_sample,
    iter_tar_samples,
    list_shards,
    load_npy,
)
from eoforge.datasets.stats import Normaliser, compute_stats
from eoforge.datasets.synthetic import write_demo_scenes

FIELDS = ("image", "valid", "wavelengths", "bandwidths", "gsd", "time")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """S2 (uint16, nodata masks), S1 and EnMAP shard folders of 32 x 32 tiles, and a normaliser."""
    root = tmp_path_factory.mktemp("batching")
    folders = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nodata corners are reported, and expected
        for sensor, src in write_demo_scenes(root / "raw", n_scenes=6).items():
            out = root / "shards" / sensor
            build_shards(src, out, sensor, tile_size=32, shard_size=4, progress=False)
            compute_stats(out, progress=False)
            folders.append(out)
    normaliser = Normaliser.from_files([f / "stats.json" for f in folders])
    raws = {raw["__key__"]: raw for url in list_shards(folders) for raw in iter_tar_samples(url)}
    return folders, normaliser, raws


def expected_batch(raws: dict, ids: list[str], normaliser: Normaliser) -> dict:
    return collate([to_sample(raws[i], normaliser) for i in ids])


def assert_equal_batches(got: dict, want: dict) -> None:
    sensor = sensor_of(want)
    assert sensor_of(got) == sensor
    assert got[sensor]["band_ids"] == want[sensor]["band_ids"]
    assert set(got[sensor]) == set(want[sensor])
    for field in FIELDS:
        if field in want[sensor]:
            assert got[sensor][field].dtype == want[sensor][field].dtype, field
            assert torch.equal(got[sensor][field], want[sensor][field]), field
    assert got["meta"] == want["meta"]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_stream_batches_equal_collated_samples(demo, num_workers):
    """Every batch of an epoch, kept while later batches reuse the worker's buffers, equals
    collate(to_sample) of its samples; the epoch has masked pixels and more batches per sensor
    than a worker has buffers."""
    folders, normaliser, raws = demo
    stream = ShardStream(folders, normaliser, batch_size=4, num_workers=num_workers, seed=3)
    batches = list(stream.epoch_batches(0))
    per_sensor = {}
    for batch in batches:
        per_sensor[sensor_of(batch)] = per_sensor.get(sensor_of(batch), 0) + 1
    assert min(per_sensor.values()) > RING
    assert any(not b[sensor_of(b)]["valid"].all() for b in batches)
    for batch in batches:
        assert_equal_batches(batch, expected_batch(raws, batch["meta"]["id"], normaliser))


def test_handed_over_batches_finish_on_a_device(demo):
    """finish=False gives the stored dtype and the affine maps; finish_batch on a device gives
    the same batch as finishing in the stream."""
    folders, normaliser, raws = demo
    stream = ShardStream(folders[0], normaliser, batch_size=4, seed=1)
    for batch in stream.epoch_batches(0, finish=False):
        view = batch[sensor_of(batch)]
        assert view["image"].dtype == torch.uint16
        assert view["affine"].shape == (4, len(view["band_ids"]))
        assert view["partial"].shape == (4,)
        finished = finish_batch(batch, device="cpu")
        assert "affine" not in finished[sensor_of(finished)]
        assert_equal_batches(finished, expected_batch(raws, batch["meta"]["id"], normaliser))


def test_float16_nan_pixels_are_invalid_and_zero():
    """A float16 sample stored without a mask: NaN and inf pixels are invalid and 0 after
    normalisation, exactly as in to_sample; unclipped normalisation as well."""
    rng = np.random.default_rng(0)
    raws = []
    for i in range(3):
        image = rng.normal(0.1, 0.05, (2, 8, 8)).astype(np.float16)
        image[0, i, :3] = np.nan
        image[1, 0, i] = np.inf
        meta = {
            "id": f"s{i}",
            "sensor": "S1GRD",
            "band_ids": ["VV", "VH"],
            "wavelengths": [5.5e7, 5.5e7],
            "bandwidths": [0.0, 0.0],
            "gsd": 10.0,
            "crs": "EPSG:32632",
            "bounds": [0, 0, 80, 80],
            "source": "test",
            "time": None,
        }
        raws.append(encode_sample(f"s{i}", image, np.ones(image.shape, bool), meta))
    row = {"count": 64, "p1": 0.0, "p99": 0.2, "norm_mean": 0.5, "norm_std": 0.25}
    for clip in (True, False):
        normaliser = Normaliser({"bands": {"VV": row, "VH": row}}, clip=clip)
        got = finish_batch(direct_batch(raws, normaliser))
        want = collate([to_sample(raw, normaliser) for raw in raws])
        assert_equal_batches(got, want)
        valid = got["S1GRD"]["valid"]
        for i in range(3):
            assert not valid[i, 0, i, :3].any() and not valid[i, 1, 0, i]
        assert valid.sum() == valid.numel() - 3 * 4
        assert torch.isfinite(got["S1GRD"]["image"]).all()


def test_mixed_band_sets_fall_back_to_collate(demo):
    """Samples that do not share one band set are not built directly."""
    _, normaliser, raws = demo
    s2 = [raw for raw in raws.values() if json.loads(raw["json"])["sensor"] == "S2L2A"][:2]
    s1 = [raw for raw in raws.values() if json.loads(raw["json"])["sensor"] == "S1GRD"][:2]
    assert direct_batch(s2 + s1, normaliser) is None
    assert direct_batch(s2, normaliser) is not None


def test_buffer_ring_hands_each_buffer_out_again_after_the_others():
    ring = BufferRing(3)
    first = [ring.take((2, 3), torch.uint16) for _ in range(3)]
    again = [ring.take((2, 3), torch.uint16) for _ in range(3)]
    assert all(a is b for a, b in zip(first, again, strict=True))
    assert len({id(t) for t in first}) == 3
    assert ring.take((4,), torch.bool) is not first[0]


def write_tar(path, members: dict[str, bytes], format=tarfile.PAX_FORMAT) -> None:
    with tarfile.open(path, "w", format=format) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1.5  # a fractional mtime: a pax header per member
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("format", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_tar_reader_matches_tarfile_local_and_piped(tmp_path, format):
    """Long names (pax path records, GNU long names, ustar prefixes), local (memory-mapped) and
    piped reads give the members tarfile gives."""
    long_key = "k" + "x" * 120 if format != tarfile.USTAR_FORMAT else "d" * 90 + "/" + "k" * 60
    members = {
        f"{long_key}.json": b'{"a": 1}',
        f"{long_key}.image.npy": bytes(range(256)) * 5,
        "short.json": b"{}",
    }
    path = tmp_path / "shard.tar"
    write_tar(path, members, format)
    for url in (str(path), f"pipe:cat {path}"):
        samples = list(iter_tar_samples(url))
        got = {
            f"{s['__key__']}.{m}": bytes(v) for s in samples for m, v in s.items() if "__" not in m
        }
        assert got == members
        assert isinstance(samples[0]["json"], bytes)


def test_tar_reader_errors_name_the_shard(tmp_path):
    path = tmp_path / "shard.tar"
    write_tar(path, {"a.json": b"{}", "a.image.npy": bytes(5000)})
    data = path.read_bytes()
    cases = {
        "truncated.tar": (data[:1800], "truncated"),
        "corrupt.tar": (data[:148] + b"9999999\0" + data[156:], "bad tar header"),
        "zipped.tar": (b"\x1f\x8b" + data[2:], "gzip-compressed"),
    }
    for name, (content, message) in cases.items():
        bad = tmp_path / name
        bad.write_bytes(content)
        with pytest.raises(DataError, match=message) as error:
            list(iter_tar_samples(bad))
        assert name in str(error.value)
    piped = subprocess.run(["head", "-c", "1800", str(path)], capture_output=True).stdout
    (tmp_path / "cut.tar").write_bytes(piped)
    with pytest.raises(DataError, match="truncated"):
        list(iter_tar_samples(f"pipe:cat {tmp_path / 'cut.tar'}"))


def test_failing_pipe_reads_are_retried_without_repeating_samples(tmp_path, caplog):
    path = tmp_path / "shard.tar"
    members = {f"s{i}.{m}": bytes(range(200)) * 10 for i in range(6) for m in ("json", "image.npy")}
    write_tar(path, members)
    whole = [s["__key__"] for s in iter_tar_samples(path)]
    flag = tmp_path / "failed-once"
    # The first run sends half the shard, then fails, as a dropped connection would.
    flaky = (
        f"pipe:if [ -e {flag} ]; then cat {path}; else touch {flag}; "
        f"head -c {path.stat().st_size // 2} {path}; exit 3; fi"
    )
    with caplog.at_level("WARNING", logger="eoforge"):
        keys = [s["__key__"] for s in iter_tar_samples(flaky)]
    assert keys == whole  # the samples of the first run are not handed out again
    assert "trying again" in caplog.text
    with pytest.raises(DataError, match=r"pipe:false: failed after 4 tries .*status 1"):
        list(iter_tar_samples("pipe:false"))


def test_load_npy_is_a_view_and_refuses_object_arrays():
    for array in (
        np.arange(24, dtype=np.uint16).reshape(2, 3, 4),
        np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        np.ones((2, 2), dtype=bool),
    ):
        buffer = io.BytesIO()
        np.save(buffer, array)
        loaded = load_npy(buffer.getvalue(), "member")
        assert loaded.dtype == array.dtype and np.array_equal(loaded, array)
        assert not loaded.flags.writeable
    buffer = io.BytesIO()
    np.save(buffer, np.array([1, "a"], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="pickled.npy is not a readable npy array"):
        load_npy(buffer.getvalue(), "pickled.npy")
    with pytest.raises(DataError, match="short.npy"):
        load_npy(b"\x93NUMPY", "short.npy")
