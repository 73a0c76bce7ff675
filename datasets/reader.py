"""Streaming reader: shards -> normalised, sensor-homogeneous batches (WebDataset + DataLoader).

Sample contract (one sample, see ``to_sample``)::

    {sensor: {"image": float32 [C, H, W] normalised, "band_ids": list[str] (C),
              "wavelengths": float32 [C] nm, "bandwidths": float32 [C] nm,
              "valid": bool [C, H, W], "gsd": float m, "time": int64 unix seconds (absent if unknown)},
     "meta": {"id": str, "crs": str, "bounds": [4], "source": str, "shard": str}}

Batch contract (one micro-batch, see ``collate``): one sensor, one band set, one image size::

    {sensor: {"image": float32 [B, C, H, W], "valid": bool [B, C, H, W], "band_ids": list[str] (C),
              "wavelengths": float32 [B, C], "bandwidths": float32 [B, C], "gsd": float32 [B],
              "time": int64 [B] (only when every sample has one)},
     "meta": {"id", "source", "shard", "crs", "bounds": lists of B}}

Group shards (several co-registered sensors and/or a time axis, see ``eoforge.datasets.shards``)
give samples with one view per sensor of the build, all on one grid, each with ``"present"``
(bool; False where the sample lacks that sensor: its image is zeros and its valid mask all False);
a time series view has ``image``/``valid`` [T, C, H, W] and ``time`` int64 [T]. Their batches
stack every view (``image`` [B, (T,) C, H, W], ``present`` [B], ``time`` [B(, T)] where every
sample has one) and batch only samples of one sensor set, band sets and sizes.

Order of one epoch on one rank: the shard list is shuffled with ``random.Random(seed + epoch)``,
split across ranks (shard ``i`` goes to rank ``i % world_size``) and then across DataLoader
workers (``i % num_workers`` of the rank's shards); each worker shuffles its samples in a buffer
seeded by (seed, epoch, rank, worker), normalises them and fills one buffer per
(sensor, band_ids, H, W), emitting a batch whenever a buffer holds ``batch_size`` samples.
Incomplete buffers are dropped at the end of the epoch. The DataLoader takes batches from its
workers in turn, so the stream is a pure function of (shards, seed, rank, world size,
num_workers, batch_size, shuffle_buffer): a resumed run that skips ``k`` batches sees exactly
the batches an uninterrupted run sees after its first ``k``.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator, Sequence
from functools import partial
from itertools import islice
from pathlib import Path

import torch
import webdataset as wds
from torch.utils.data import DataLoader, get_worker_info

from eoforge.datasets.errors import DataError
from eoforge.datasets.shards import (
    META,
    decode_group,
    decode_sample,
    is_group,
    list_shards,
    shard_sample_counts,
)
from eoforge.datasets.stats import Normaliser


def distributed_rank() -> tuple[int, int]:
    """(rank, world size): from torch.distributed when it is initialised, else from the
    RANK/WORLD_SIZE environment variables (torchrun, ``eoforge launch``), else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, 1


def split_by_rank(src: Iterator, *, rank: int, world_size: int) -> Iterator:
    """Every ``world_size``-th shard from ``rank`` on: ``webdataset.split_by_node``'s split, with
    the rank fixed in the main process.

    ``webdataset.split_by_node`` (1.0.2) looks the rank up when the DataLoader worker starts,
    RANK/WORLD_SIZE first, torch.distributed second. Inside a worker started with ``spawn`` or
    ``forkserver`` torch.distributed is not initialised, so a process group set up without those
    variables would give every rank the rank-0 shards; fixing the rank beforehand avoids that.
    """
    yield from islice(src, rank, None, world_size)


def to_sample(raw: dict, normaliser: Normaliser) -> dict:
    """One raw WebDataset sample -> the sample contract (module docstring), normalised."""
    if META in raw and is_group(json.loads(raw[META])):
        return _group_sample(raw, normaliser)
    image, valid, meta = decode_sample(raw)
    band_ids = list(meta["band_ids"])
    normalised = normaliser(image, valid, band_ids)
    view = {
        "image": torch.from_numpy(normalised),
        "band_ids": band_ids,
        "wavelengths": torch.tensor(meta["wavelengths"], dtype=torch.float32),
        "bandwidths": torch.tensor(meta["bandwidths"], dtype=torch.float32),
        "valid": torch.from_numpy(valid),
        "gsd": float(meta["gsd"]),
    }
    if meta.get("time") is not None:
        view["time"] = torch.tensor(int(meta["time"]), dtype=torch.int64)
    return {
        meta["sensor"]: view,
        "meta": {
            "id": meta["id"],
            "crs": meta["crs"],
            "bounds": list(meta["bounds"]),
            "source": meta["source"],
            "shard": raw.get("__url__", ""),
        },
    }


def _group_sample(raw: dict, normaliser: Normaliser) -> dict:
    """A group sample (several sensors and/or a time axis) -> one view per sensor of the build."""
    arrays, meta = decode_group(raw)
    sample = {}
    for sensor, row in meta["sensors"].items():
        band_ids = list(row["band_ids"])
        pair = arrays[sensor]
        if pair is None:
            # Absent sensor: zeros, nothing valid; objectives see present=False and decide.
            image = torch.zeros(row["shape"], dtype=torch.float32)
            valid = torch.zeros(row["shape"], dtype=torch.bool)
        else:
            image = torch.from_numpy(normaliser(pair[0], pair[1], band_ids))
            valid = torch.from_numpy(pair[1])
        view = {
            "image": image,
            "band_ids": band_ids,
            "wavelengths": torch.tensor(row["wavelengths"], dtype=torch.float32),
            "bandwidths": torch.tensor(row["bandwidths"], dtype=torch.float32),
            "valid": valid,
            "gsd": float(row["gsd"]),
            "present": torch.tensor(pair is not None),
        }
        if row.get("time") is not None:
            view["time"] = torch.tensor(row["time"], dtype=torch.int64)
        sample[sensor] = view
    sample["meta"] = {
        "id": meta["id"],
        "crs": meta["crs"],
        "bounds": list(meta["bounds"]),
        "source": meta["source"],
        "shard": raw.get("__url__", ""),
    }
    return sample


def sensors_of(sample: dict) -> list[str]:
    """The sensor entries of a sample or batch, in their order."""
    return [k for k in sample if k != "meta"]


def sensor_of(sample: dict) -> str:
    """The sensor entry of a single-sensor sample or batch."""
    (sensor,) = sensors_of(sample)
    return sensor


def batch_key(sample: dict) -> tuple:
    """What a batch must share: (sensor, band_ids, H, W) for a single-sensor sample; for a time
    series (sensor, band_ids, T, H, W); for several sensors, one such tuple per sensor."""
    keys = tuple(
        (sensor, tuple(view["band_ids"]), *view["image"].shape[:-3], *view["image"].shape[-2:])
        for sensor, view in ((s, sample[s]) for s in sensors_of(sample))
    )
    return keys[0] if len(keys) == 1 else keys


def collate(samples: Sequence[dict]) -> dict:
    """Samples sharing a ``batch_key`` -> the batch contract (module docstring)."""
    keys = {batch_key(s) for s in samples}
    if len(keys) != 1:
        raise DataError(f"cannot batch samples of different sensors/bands/sizes: {sorted(keys)}")
    batch = {sensor: _stack([s[sensor] for s in samples]) for sensor in sensors_of(samples[0])}
    batch["meta"] = {
        field: [s["meta"][field] for s in samples]
        for field in ("id", "source", "shard", "crs", "bounds")
    }
    return batch


def _stack(views: Sequence[dict]) -> dict:
    """One sensor's views of B samples -> its batch view."""
    batch = {
        "image": torch.stack([v["image"] for v in views]),
        "valid": torch.stack([v["valid"] for v in views]),
        "band_ids": list(views[0]["band_ids"]),
        "wavelengths": torch.stack([v["wavelengths"] for v in views]),
        "bandwidths": torch.stack([v["bandwidths"] for v in views]),
        "gsd": torch.tensor([v["gsd"] for v in views], dtype=torch.float32),
    }
    if all("time" in v for v in views):
        batch["time"] = torch.stack([v["time"] for v in views])
    if any("present" in v for v in views):
        batch["present"] = torch.stack([v.get("present", torch.tensor(True)) for v in views])
    return batch


def _shuffle_samples(src: Iterator[dict], *, bufsize: int, seed: str) -> Iterator[dict]:
    # The worker id is only known inside the worker process, so the rng is seeded here.
    worker = get_worker_info()
    rng = random.Random(f"{seed}:{worker.id if worker else 0}")
    buffer: list[dict] = []
    for sample in src:
        if len(buffer) < bufsize:
            buffer.append(sample)
            continue
        i = rng.randrange(len(buffer))
        buffer[i], sample = sample, buffer[i]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


def _normalise(src: Iterator[dict], *, normaliser: Normaliser) -> Iterator[dict]:
    for raw in src:
        yield to_sample(raw, normaliser)


def _batch_by_key(src: Iterator[dict], *, batch_size: int) -> Iterator[dict]:
    buffers: dict[tuple, list[dict]] = {}
    for sample in src:
        buffer = buffers.setdefault(batch_key(sample), [])
        buffer.append(sample)
        if len(buffer) == batch_size:
            yield collate(buffer)
            buffer.clear()


class ShardStream:
    """Infinite, deterministic stream of normalised sensor-homogeneous batches.

    Args:
        urls: shard folder(s), brace pattern(s) or ``.tar`` paths (see ``shards.list_shards``);
            resolved when iteration starts.
        normaliser: per-band normalisation covering every band in the shards.
        batch_size: samples per micro-batch (per rank).
        seed: seed of the shard and sample shuffles.
        shuffle_buffer: samples held by each worker's shuffle buffer (1 = no sample shuffle).
        num_workers: DataLoader worker processes (0 = read in this process).
        rank, world_size: this process's share of the shards; default ``distributed_rank()``.

    Example:
        >>> stream = ShardStream(["shards/s2", "shards/s1"], Normaliser.from_files(
        ...     ["shards/s2/stats.json", "shards/s1/stats.json"]), batch_size=8)
        >>> batch = next(stream.iter_batches())
    """

    def __init__(
        self,
        urls: str | Path | Sequence[str | Path],
        normaliser: Normaliser,
        *,
        batch_size: int,
        seed: int = 0,
        shuffle_buffer: int = 256,
        num_workers: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if batch_size < 1 or shuffle_buffer < 1 or num_workers < 0:
            raise DataError(
                f"batch_size and shuffle_buffer must be >= 1 and num_workers >= 0; got {batch_size}, "
                f"{shuffle_buffer}, {num_workers}"
            )
        if (rank is None) != (world_size is None):
            raise DataError("pass both rank and world_size, or neither")
        if world_size is not None and not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world size {world_size}")
        self.urls = urls
        self.normaliser = normaliser
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.num_workers = num_workers
        self.rank = rank
        self.world_size = world_size

    def shard_order(self, epoch: int) -> list[str]:
        """All shards in this epoch's order (before splitting across ranks and workers)."""
        shards = list_shards(self.urls)
        random.Random(self.seed + epoch).shuffle(shards)
        return shards

    def _rank(self) -> tuple[int, int]:
        return (self.rank, self.world_size) if self.world_size is not None else distributed_rank()

    def dataset(self, epoch: int) -> wds.WebDataset:
        """The WebDataset pipeline of one epoch on this rank, yielding batches."""
        rank, world_size = self._rank()
        pipeline = wds.WebDataset(
            self.shard_order(epoch),
            shardshuffle=False,  # shuffled above, identically on every rank and worker
            nodesplitter=partial(split_by_rank, rank=rank, world_size=world_size),
            workersplitter=wds.split_by_worker,
            empty_check=False,
        )
        return pipeline.compose(
            partial(
                _shuffle_samples, bufsize=self.shuffle_buffer, seed=f"{self.seed}:{epoch}:{rank}"
            ),
            partial(_normalise, normaliser=self.normaliser),
            partial(_batch_by_key, batch_size=self.batch_size),
        )

    def epoch_batches(self, epoch: int) -> Iterator[dict]:
        """The batches of one epoch on this rank (finite; may be empty)."""
        # A private generator: the DataLoader draws its worker base seed from it, which would
        # otherwise advance the caller's global torch RNG every epoch.
        generator = torch.Generator().manual_seed(self.seed + epoch)
        loader = DataLoader(
            self.dataset(epoch), batch_size=None, num_workers=self.num_workers, generator=generator
        )
        yield from loader

    def iter_batches(self, start_epoch: int = 0, skip_batches: int = 0) -> Iterator[dict]:
        """Batches forever, epoch after epoch, starting at ``start_epoch``.

        Args:
            start_epoch: first epoch to read.
            skip_batches: batches to read and drop first (counted from the start of
                ``start_epoch``, across epoch ends), to resume where a run stopped.

        Raises:
            DataError: when an epoch yields no batch on this rank.
        """
        epoch, to_skip = start_epoch, skip_batches
        while True:
            produced = 0
            for batch in self.epoch_batches(epoch):
                produced += 1
                if to_skip:
                    to_skip -= 1
                    continue
                yield batch
            if produced == 0:
                raise self._empty_epoch_error(epoch)
            epoch += 1

    def _empty_epoch_error(self, epoch: int) -> DataError:
        rank, world_size = self._rank()
        shards = self.shard_order(epoch)
        counts = shard_sample_counts(shards)
        mine = shards[rank::world_size]
        known = all(v is not None for v in counts.values())
        total = f"{sum(counts.values())} samples" if known else "an unknown number of samples"
        on_rank = f"{sum(counts[s] for s in mine)} samples" if known else "their samples"
        workers = max(1, self.num_workers)
        return DataError(
            f"epoch {epoch} yields no batch of {self.batch_size} on rank {rank} of {world_size}: "
            f"{len(shards)} shards ({total}) in all, {len(mine)} shards ({on_rank}) on this rank, read by "
            f"{workers} worker(s), and a batch needs {self.batch_size} samples of one sensor/band "
            "set/size within one worker. Use a smaller batch_size, fewer ranks or num_workers, "
            "or rebuild with a smaller --shard-size so every rank and worker gets shards."
        )
