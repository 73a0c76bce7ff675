"""Streaming reader: shards -> normalised, sensor-homogeneous batches, resumable mid-epoch.

Sample contract (one sample, see ``to_sample``)::

    {sensor: {"image": float32 [C, H, W] normalised, "band_ids": list[str] (C),
              "wavelengths": float32 [C] nm, "bandwidths": float32 [C] nm,
              "valid": bool [C, H, W], "gsd": float m, "time": int64 unix seconds (absent if unknown)},
     "meta": {"id": str, "crs": str, "bounds": [4], "source": str, "shard": str}}

Batch contract (one micro-batch, see ``eoforge.datasets.batching``): one sensor, one image size::

    {sensor: {"image": float32 [B, C, H, W], "valid": bool [B, C, H, W], "band_ids": list[str] (C),
              "wavelengths": float32 [B, C], "bandwidths": float32 [B, C], "gsd": float32 [B],
              "time": int64 [B] (only when every sample has one)},
     "meta": {"id", "source", "shard", "crs", "bounds": lists of B}}

Samples of one sensor whose band sets differ (a band missing from some scenes) share a batch:
its ``band_ids`` are the union in registry order and a sample's absent bands are zeros with
``valid`` False, so the mask pads only what a sample lacks and nothing is padded across sensors.

Group shards (several co-registered sensors and/or a time axis, see ``eoforge.datasets.shards``)
give samples with one view per sensor of the build, all on one grid, each with ``"present"``
(bool; False where the sample lacks that sensor: its image is zeros and its valid mask all False);
a time series view has ``image``/``valid`` [T, C, H, W] and ``time`` int64 [T]. Their batches
stack every view (``image`` [B, (T,) C, H, W], ``present`` [B], ``time`` [B(, T)] where every
sample has one) and batch only samples of one sensor set, band sets and sizes.

Sources and the weighted sampler: the shards of each shard set (one set, or several with weights:
a mixture, see ``ShardSet``) are grouped by sensor (sensor group for group shards) into
sources. Each source has epochs of its own: epoch ``e`` shuffles the source's shards with
``random.Random((seed, source, e))``, gives shard ``i`` to rank ``i % world_size`` and then to
worker ``j % num_workers`` of the rank's ``j``-th shard. Each worker draws the source of its next
batch from a generator seeded by (seed, rank, worker, draw number), with probability
proportional to the source's weight (default: the set's weight times the sensor's share of the
set's samples; ``sensor_weights`` overrides the share), and fills the batch with that source's
next ``batch_size`` samples; the incomplete batch at the end of a source's epoch is dropped.
Within a shard, samples are shuffled by a buffer seeded by (seed, epoch, source, the shard's
index in the source: never its path, so shards may move between runs), so a position
(epoch, shard, offset) per source and worker is exact. The DataLoader takes batches from its
workers in turn.

Position: ``ShardStream.state_dict()`` holds, per worker of this rank, the draw count and each
source's (epoch, shard, offset) after the last batch handed out, and which worker is next;
``load_state_dict`` continues from there: shards before the position are not opened, samples
before the offset within its shard are read but never decoded, and the batches that follow are
those an uninterrupted stream gives, so within an epoch no sample is repeated or skipped.
``remapped_state`` continues the positions of a run with another world size or worker count.

Bad data (``eoforge.datasets.sample_checks``): every sample is checked before it joins a batch;
an undecodable one, one whose band count disagrees with its metadata, one with NaN/Inf at a valid
pixel or one without any valid pixel is skipped, counted under its reason and logged (logger
``eoforge``) with its shard and key. A shard that breaks off (truncated or corrupt tar) gives the
samples before the damage, counts once as ``truncated_shard``, is logged, and reading goes on
with the next shard; it breaks at the same place on every read, so positions stay exact. A
worker's counts, ``{"samples": read, "bad": {reason: n}}``, are cumulative and part of its
position (saved by ``state_dict``, zero for positions saved without them); ``health()`` sums
them, and more bad samples than ``max_bad_fraction`` of those read stops the stream.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import random
import re
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from eoforge.datasets.batching import BufferRing, collate, direct_batch, finish_batch
from eoforge.datasets.errors import DataError
from eoforge.datasets.sample_checks import REASONS, TRUNCATED_SHARD, sample_problem
from eoforge.datasets.shards import (
    META,
    decode_group,
    decode_sample,
    is_group,
    iter_tar_samples,
    list_shards,
    read_index,
    shard_sample_counts,
)
from eoforge.datasets.stats import Normaliser

Transform = Callable[[dict, torch.Generator], dict]
# 2: shards named by their index in the source, the in-shard shuffle seeded by it (not the path).
STATE_VERSION = 2
PREFETCH = 2  # batches a DataLoader worker may run ahead of the consumer
RING = PREFETCH + 2  # a worker's reused buffers per batch shape (see BufferRing)
MAX_BAD_FRACTION_KEY = "data.max_bad_fraction"  # the config key named when the limit stops a run
LOG = logging.getLogger("eoforge")


def distributed_rank() -> tuple[int, int]:
    """(rank, world size): from torch.distributed when it is initialised, else from the
    RANK/WORLD_SIZE environment variables (torchrun, ``eoforge launch``), else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, 1


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
        "valid": torch.from_numpy(writable(valid)),
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


def writable(array: np.ndarray) -> np.ndarray:
    """``array``, or a copy where it is a read-only view of shard bytes (a tensor made from it
    must own memory it may write)."""
    return array if array.flags.writeable else array.copy()


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
            valid = torch.from_numpy(writable(pair[1]))
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


@dataclass(frozen=True)
class ShardSet:
    """One shard set of a mixture and its sampling weight.

    Attributes:
        urls: shard folder(s), brace pattern(s), ``pipe:`` command(s) or ``.tar`` paths (see
            ``shards.list_shards``).
        weight: this set's share of the batches (relative to the other sets' weights).
    """

    urls: str | Path | Sequence[str | Path]
    weight: float = 1.0


@dataclass(frozen=True)
class Source:
    """What the weighted sampler draws from: the shards of one sensor (or one sensor group) of
    one shard set, with its weight (``key`` is ``"<set index>:<sensor>"``, e.g. ``"0:S2L2A"``)."""

    key: str
    shards: tuple[str, ...]
    weight: float


def shard_name(url: str) -> str:
    """A shard's file name, wherever it lies: the last ``*.tar`` name in the URL (a path, or
    the command of a ``pipe:`` URL), else the whole URL."""
    names = re.findall(r"[^/\s]+\.tar\b", url)
    return names[-1] if names else url


def shard_sensor(url: str) -> str:
    """The sensor of a shard's samples (``"S2L2A"``; ``"S2L2A+S1GRD"`` for group shards): from
    the index.json next to a local shard, else from the shard's first sample."""
    if not url.startswith("pipe:") and "://" not in url:
        try:
            index = read_index(Path(url).parent)
        except (DataError, OSError, ValueError):
            index = {}
        if "group" in index:
            return "+".join(index["group"]["sensors"])
        if len(index.get("sensors", {})) == 1:
            return next(iter(index["sensors"]))
    for raw in iter_tar_samples(url):
        meta = json.loads(raw[META])
        return "+".join(meta["sensors"]) if is_group(meta) else meta["sensor"]
    raise DataError(f"shard {url} holds no sample; rebuild it (eoforge data build)")


def sample_seed(seed: int, epoch: int, sample_id: str) -> int:
    """Seed of one sample's random transform: a pure function of (seed, epoch, sample id), so an
    augmentation is the same whichever worker, rank or resume reads the sample."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class ShardStream:
    """Deterministic, resumable stream of normalised sensor-homogeneous batches (module docstring).

    Args:
        urls: shard folder(s), brace pattern(s), ``pipe:`` command(s) or ``.tar`` paths (see
            ``shards.list_shards``), or a list of ``ShardSet`` (a weighted mixture); resolved
            when iteration starts.
        normaliser: per-band normalisation covering every band in the shards.
        batch_size: samples per micro-batch (per rank).
        seed: seed of the shard order, the sample shuffles, the sensor draws and the transforms.
        shuffle_buffer: samples held by the within-shard shuffle buffer (1 = file order).
        num_workers: DataLoader worker processes (0 = read in this process).
        rank, world_size: this process's share of the shards; default ``distributed_rank()``.
        sensor_weights: weight of each sensor within a shard set (default: its sample count).
        transform: ``transform(sample, generator) -> sample`` applied to each sample after
            normalisation, with a ``torch.Generator`` seeded by ``sample_seed``.
        device: where batches are finished (``batching.finish_batch``): a worker hands plain
            batches over in their stored dtype, and they are moved here and normalised here
            (the training device: half the bytes to copy, and no normalisation on CPU cores).
            Default: normalised on the CPU of the consuming process.
        max_bad_fraction: the stream raises DataError once more than this fraction of the
            samples read on this rank were bad (``health()``; ``truncated_shard`` counts as one
            bad sample), but only from ``max_bad_fraction * samples >= 1`` on, so that one bad
            sample among the first few read does not stop a run; 0 stops at the first bad
            sample.

    Example:
        >>> stream = ShardStream(["shards/s2", "shards/s1"], Normaliser.from_files(
        ...     ["shards/s2/stats.json", "shards/s1/stats.json"]), batch_size=8)
        >>> batches = stream.iter_batches()
        >>> batch = next(batches)
        >>> position = stream.state_dict()  # save with the checkpoint; load_state_dict resumes
    """

    def __init__(
        self,
        urls: str | Path | Sequence[str | Path] | Sequence[ShardSet],
        normaliser: Normaliser,
        *,
        batch_size: int,
        seed: int = 0,
        shuffle_buffer: int = 256,
        num_workers: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        sensor_weights: Mapping[str, float] | None = None,
        transform: Transform | None = None,
        device: torch.device | str | None = None,
        max_bad_fraction: float = 0.01,
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
        for name, weight in (sensor_weights or {}).items():
            if not weight >= 0:
                raise DataError(f"sensor_weights[{name}]={weight}: must be >= 0")
        if not 0 <= max_bad_fraction <= 1:
            raise DataError(f"max_bad_fraction={max_bad_fraction}: must be between 0 and 1")
        self.urls = urls
        self.normaliser = normaliser
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.num_workers = num_workers
        self.rank = rank
        self.world_size = world_size
        self.sensor_weights = dict(sensor_weights) if sensor_weights else None
        self.transform = transform
        self.device = device
        self.max_bad_fraction = max_bad_fraction
        self._sources: list[Source] | None = None
        self._shard_lists: dict[str, dict] | None = None
        self._workers = [_start_position() for _ in range(max(1, num_workers))]
        self._next_worker = 0
        self._epoch_counts = _no_counts()  # of epoch_batches passes, which move no position

    def shard_sets(self) -> list[ShardSet]:
        """The shard sets read (one unless ``urls`` is a mixture)."""
        urls = self.urls
        if isinstance(urls, list | tuple) and urls and all(isinstance(u, ShardSet) for u in urls):
            return list(urls)
        return [ShardSet(urls)]

    def sources(self) -> list[Source]:
        """The sources the sampler draws from, found once (lists shards, reads index files)."""
        if self._sources is None:
            self._sources = self._find_sources()
        return self._sources

    def _find_sources(self) -> list[Source]:
        sources = []
        for i, shard_set in enumerate(self.shard_sets()):
            if not shard_set.weight > 0:
                raise DataError(f"shard set {i} ({shard_set.urls}) has weight {shard_set.weight}")
            by_sensor: dict[str, list[str]] = {}
            for url in list_shards(shard_set.urls):
                by_sensor.setdefault(shard_sensor(url), []).append(url)
            if self.sensor_weights is None:
                shares = {sensor: _sample_count(urls) for sensor, urls in by_sensor.items()}
            else:
                missing = sorted(set(by_sensor) - set(self.sensor_weights))
                if missing:
                    raise DataError(
                        f"sensor_weights has no weight for sensor {missing[0]} of shard set {i} "
                        f"({shard_set.urls}); give every sensor read a weight (0 leaves it out)"
                    )
                shares = {sensor: self.sensor_weights[sensor] for sensor in by_sensor}
            total = sum(shares.values())
            for sensor, urls in by_sensor.items():
                weight = shard_set.weight * shares[sensor] / total if total > 0 else 0.0
                sources.append(Source(f"{i}:{sensor}", tuple(urls), weight))
        return sources

    def _rank(self) -> tuple[int, int]:
        return (self.rank, self.world_size) if self.world_size is not None else distributed_rank()

    def worker_shards(
        self, source: Source, epoch: int, rank: int, world_size: int, worker: int, workers: int
    ) -> list[int]:
        """One worker's shards of a source in one epoch, in reading order, as indices into
        ``source.shards``: positions name shards so, never by path, and stay valid when the
        shards are read from another place (staged to a node's local disk, say)."""
        order = list(range(len(source.shards)))
        random.Random(f"{self.seed}:{source.key}:{epoch}").shuffle(order)
        return order[rank::world_size][worker::workers]

    def state_dict(self) -> dict:
        """This rank's position: per worker, the draws made, each source's next
        (epoch, shard, offset) and the samples read and bad (module docstring) after the last
        batch handed out by ``iter_batches``."""
        return {
            **self._settings(),
            "next_worker": self._next_worker,
            "workers": copy.deepcopy(self._workers),
        }

    def _settings(self) -> dict:
        """What a saved position must agree with to be continued (``_check_saved``)."""
        rank, world_size = self._rank()
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "rank": rank,
            "world_size": world_size,
            "num_workers": self.num_workers,
            "batch_size": self.batch_size,
            "shuffle_buffer": self.shuffle_buffer,
            "shard_lists": self.shard_lists(),
        }

    def shard_lists(self) -> dict[str, dict]:
        """Per source, its shard count and a digest of the shards' file names in order: what a
        position's shard indices refer to, checked on resume (folders may differ, names not)."""
        if self._shard_lists is None:
            self._shard_lists = {}
            for source in self.sources():
                names = "\n".join(shard_name(url) for url in source.shards)
                digest = hashlib.sha256(names.encode()).hexdigest()[:16]
                self._shard_lists[source.key] = {"shards": len(source.shards), "names": digest}
        return copy.deepcopy(self._shard_lists)

    def _check_saved(self, state: dict, keys: Sequence[str]) -> None:
        """Refuse a saved position of another format, other ``keys`` or other shard lists."""
        mine = self._settings()
        if state.get("version") != STATE_VERSION:
            raise DataError(
                f"the saved data position is of format {state.get('version')}, written by another "
                f"eoforge; this one reads format {STATE_VERSION} (in-shard order and shard names "
                "differ between them): resume with the eoforge that wrote it"
            )
        for key in keys:
            if state.get(key) != mine[key]:
                raise DataError(
                    f"the saved data position has {key}={state.get(key)} but this stream has "
                    f"{key}={mine[key]}; resume with the data settings and world size of the run "
                    "that saved it"
                )
        for key, saved in state.get("shard_lists", {}).items():
            found = mine["shard_lists"].get(key)
            if found != saved:
                have = f"{found['shards']} shards" if found else "no such source"
                raise DataError(
                    f"source {key} of the saved data position had {saved['shards']} shards "
                    f"(names digest {saved['names']}) but this stream has {have}"
                    + (f" (digest {found['names']})" if found else "")
                    + "; resume on the same shard sets, in the same order"
                )

    def load_state_dict(self, state: dict) -> None:
        """Continue from a ``state_dict`` of a stream with the same settings (the next
        ``iter_batches`` starts there).

        Raises:
            DataError: naming the setting that differs from the saved one.
        """
        self._check_saved(
            state,
            ("seed", "rank", "world_size", "num_workers", "batch_size", "shuffle_buffer"),
        )
        self._workers = copy.deepcopy(state["workers"])
        self._next_worker = int(state["next_worker"])

    def remapped_state(self, saved: Sequence[dict]) -> dict:
        """A ``state_dict`` for this rank that continues the positions ``saved`` by every rank
        of a run with another world size or worker count (one ``state_dict`` per old rank).

        Per source, from the earliest epoch any old worker was in to the latest: what the old
        workers had not read of each epoch (each one's current shard from its offset, then its
        later shards; all its shards of an epoch it had not begun) is dealt out anew over this
        run's ranks and workers, as explicit plans of (shard, offset); the epochs after follow
        the usual layout. No sample of those epochs is read twice or skipped, apart from each
        new worker's incomplete last batch of a plan, which is dropped as at any epoch's end.
        The bad-data counts of every old worker are carried by rank 0's first worker.

        Raises:
            DataError: when the saved positions do not come from one run with this stream's
                seed, batch size and shuffle buffer.
        """
        for state in saved:
            self._check_saved(state, ("seed", "batch_size", "shuffle_buffer"))
        rank, world_size = self._rank()
        workers = [_start_position() for _ in range(max(1, self.num_workers))]
        for source in self.sources():
            first, remaining = _unread(self, source, saved)  # one list per epoch from first
            for w, position in enumerate(workers):
                plans = [left[rank::world_size][w :: len(workers)] for left in remaining]
                position["sources"][source.key] = next_planned(first, plans)
        if rank == 0:
            for state in saved:
                for old in state["workers"]:
                    workers[0]["samples"] += old.get("samples", 0)
                    for reason, n in old.get("bad", {}).items():
                        workers[0]["bad"][reason] = workers[0]["bad"].get(reason, 0) + n
        return {**self._settings(), "next_worker": 0, "workers": workers}

    def health(self) -> dict:
        """The bad data met on this rank: the samples read and those skipped as bad by the
        batches handed out, cumulative over the run (``iter_batches``, kept in the position) and
        over the ``epoch_batches`` passes of this object.

        Returns:
            ``{"samples": read, "bad": {reason: n} for every reason of
            ``sample_checks.REASONS``, "bad_fraction": total bad / samples (0 before any)}``.
        """
        tallies = [self._epoch_counts, *self._workers]
        samples = sum(t.get("samples", 0) for t in tallies)
        bad = {r: sum(t.get("bad", {}).get(r, 0) for t in tallies) for r in REASONS}
        fraction = sum(bad.values()) / samples if samples else 0.0
        return {"samples": samples, "bad": bad, "bad_fraction": fraction}

    def _check_health(self) -> None:
        """DataError when bad samples exceed ``max_bad_fraction`` (the rule in the class
        docstring)."""
        health = self.health()
        samples, bad, limit = health["samples"], sum(health["bad"].values()), self.max_bad_fraction
        if bad > limit * samples and (limit == 0 or limit * samples >= 1):
            rank, world_size = self._rank()
            reasons = ", ".join(f"{r} {n}" for r, n in health["bad"].items() if n)
            raise DataError(
                f"{bad} of {samples} samples read on rank {rank} of {world_size} were bad "
                f"({reasons}): more than {MAX_BAD_FRACTION_KEY}={limit} allows; see the rank logs "
                "for each shard and key. Repair or rebuild those shards (eoforge data verify "
                f"finds them), or raise {MAX_BAD_FRACTION_KEY}."
            )

    def epoch_batches(self, epoch: int, finish: bool = True) -> Iterator[dict]:
        """The batches of one epoch of every source on this rank (finite; may be empty); the
        stream's position is neither used nor moved. ``finish=False`` gives them as workers hand
        them over, for a consumer that runs ``batching.finish_batch`` itself on each before it
        takes the next (their tensors may be buffers a worker reuses: see ``BufferRing``).
        Bad samples are skipped and counted in ``health()`` as ``iter_batches`` does.

        Raises:
            DataError: when the bad samples exceed ``max_bad_fraction``.
        """
        keep = self._keep()
        seen: dict[int, dict] = {}  # each worker's counts of this pass so far
        for batch in self._loader(epoch):
            stream = batch["meta"].pop("stream")
            before = seen.get(stream["worker"], _no_counts())
            self._epoch_counts["samples"] += stream["samples"] - before["samples"]
            bad = self._epoch_counts["bad"]
            for reason, n in stream["bad"].items():
                bad[reason] = bad.get(reason, 0) + n - before["bad"].get(reason, 0)
            seen[stream["worker"]] = stream
            self._check_health()
            if len(batch) > 1:  # not a worker's closing counts
                yield finish_batch(batch, self.device, keep) if finish else batch

    def iter_batches(self) -> Iterator[dict]:
        """Batches forever from the current position (the start, or what ``load_state_dict``
        set), moving the position with every batch handed out.

        Raises:
            DataError: when this rank has no shard, a source's epoch yields no batch on a
                worker, or the bad samples exceed ``max_bad_fraction``.
        """
        self._check_rank_has_shards()
        keep = self._keep()
        for batch in self._loader(None):
            stream = batch["meta"].pop("stream")
            worker = stream.pop("worker")
            self._workers[worker] = stream
            self._next_worker = (worker + 1) % len(self._workers)
            self._check_health()
            yield finish_batch(batch, self.device, keep)

    def _keep(self) -> deque:
        """Room for the stored tensors of every worker's buffers (``finish_batch``'s ``keep``),
        for up to two batch shapes per worker."""
        return deque(maxlen=2 * RING * max(1, self.num_workers))

    def _loader(self, epoch: int | None) -> DataLoader:
        self.sources()  # found here, once, rather than in every worker
        # A private generator: the DataLoader draws its worker base seed from it, which would
        # otherwise advance the caller's global torch RNG.
        generator = torch.Generator().manual_seed(self.seed)
        # The rank is fixed here: a worker started with spawn or forkserver has no process group.
        rank, world_size = self._rank()
        return DataLoader(
            _Batches(self, epoch, rank, world_size),
            batch_size=None,
            num_workers=self.num_workers,
            prefetch_factor=PREFETCH if self.num_workers else None,
            generator=generator,
            collate_fn=_as_is,
        )

    def worker_batches(self, epoch: int | None, rank: int, world_size: int) -> Iterator[dict]:
        """One worker's batches (run inside the worker): of one epoch, or forever from the
        position; each batch's meta carries the worker's position after it under ``"stream"``
        (for one epoch: its counts of this pass). One epoch ends with ``{"meta": {"stream"}}``
        alone: the counts of the samples read after the last batch."""
        info = get_worker_info()
        workers = info.num_workers if info else 1
        # A new DataLoader starts its round robin at worker 0: rotating the ids makes worker 0
        # play the worker whose turn was next when the position was saved.
        start = 0 if epoch is not None else self._next_worker
        worker = ((info.id if info else 0) + start) % workers
        saved = self._workers[worker]
        buffers = BufferRing(RING)
        counts = _no_counts()
        if epoch is None:  # positions saved before counts existed have none: they start at 0
            counts = {"samples": saved.get("samples", 0), "bad": dict(saved.get("bad", {}))}
        readers = {}
        for source in self.sources():
            layout = (rank, world_size, worker, workers)
            if source.weight > 0 and self.worker_shards(source, 0, *layout):
                position = saved["sources"].get(source.key, {"epoch": 0, "shard": 0, "offset": 0})
                if epoch is not None:
                    position = {"epoch": epoch, "shard": 0, "offset": 0}
                readers[source.key] = _SourceReader(self, source, layout, position, buffers, counts)
        draws = saved["draws"] if epoch is None else 0
        while readers:
            keys = list(readers)
            rng = random.Random(f"{self.seed}:draw:{rank}:{worker}:{draws}")
            key = rng.choices(keys, [readers[k].source.weight for k in keys])[0]
            draws += 1
            batch = readers[key].next_batch(strict=epoch is None)
            if batch is None:
                if epoch is not None:
                    del readers[key]  # this source's epoch is done; the others go on
                continue
            batch["meta"]["stream"] = {
                "worker": worker,
                "draws": draws,
                "sources": {k: r.position() for k, r in readers.items()},
                "samples": counts["samples"],
                "bad": dict(counts["bad"]),
            }
            yield batch
        if epoch is not None:
            # The epoch's tail (an incomplete batch, bad samples, a broken shard) was read after
            # the last batch; a stream that goes on counts it with its next batch instead.
            stream = {"worker": worker, "samples": counts["samples"], "bad": dict(counts["bad"])}
            yield {"meta": {"stream": stream}}

    def make_batch(
        self, raws: Sequence[dict], epoch: int, buffers: BufferRing | None = None
    ) -> dict:
        """Raw samples -> one batch as a worker hands it over: ``direct_batch`` (stored dtype,
        normalised by ``finish_batch`` in the consuming process) where no transform is set and
        the samples are plain ones of one sensor, band set and size (the common case),
        otherwise ``collate`` of ``prepare``d samples."""
        if self.transform is None:
            batch = direct_batch(raws, self.normaliser, buffers)
            if batch is not None:
                return batch
        return collate([self.prepare(raw, epoch) for raw in raws])

    def prepare(self, raw: dict, epoch: int) -> dict:
        """A raw sample -> the sample contract, normalised, then transformed."""
        sample = to_sample(raw, self.normaliser)
        if self.transform is not None:
            seed = sample_seed(self.seed, epoch, sample["meta"]["id"])
            sample = self.transform(sample, torch.Generator().manual_seed(seed))
        return sample

    def shard_samples(self, source: Source, shard: int, epoch: int) -> Iterator[dict]:
        """Raw samples of shard ``shard`` of ``source``, shuffled within the shard by a buffer
        seeded by (seed, epoch, source, shard index): the same order whenever the shard is read
        again, wherever it lies.

        Raises:
            DataError: where the shard breaks off (truncated, corrupt), after the samples read
                before the damage, those in the buffer included.
        """
        rng = random.Random(f"{self.seed}:{epoch}:{source.key}:{shard}")
        buffer: list[dict] = []
        try:
            for raw in iter_tar_samples(source.shards[shard]):
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(raw)
                    continue
                i = rng.randrange(len(buffer))
                buffer[i], raw = raw, buffer[i]
                yield raw
        except DataError:
            # The samples read before the damage are good: hand them over, then the error.
            rng.shuffle(buffer)
            yield from buffer
            raise
        rng.shuffle(buffer)
        yield from buffer

    def _check_rank_has_shards(self) -> None:
        rank, world_size = self._rank()
        sources = self.sources()
        if any(s.weight > 0 and len(s.shards) > rank for s in sources):
            return
        shards = [url for s in sources for url in s.shards]
        counts = shard_sample_counts(shards)
        known = all(v is not None for v in counts.values())
        total = f"{sum(counts.values())} samples" if known else "an unknown number of samples"
        raise DataError(
            f"rank {rank} of {world_size} gets no shard: {len(shards)} shards ({total}) in all, "
            f"0 shards of them on this rank. Use fewer ranks, or rebuild with a smaller "
            "--shard-size so that every rank gets shards."
        )

    def empty_epoch_error(self, source: Source, epoch: int, layout: tuple) -> DataError:
        """The error for a source whose epoch gives a worker no full batch."""
        rank, world_size, worker, workers = layout
        shards = [source.shards[i] for i in self.worker_shards(source, epoch, *layout)]
        counts = shard_sample_counts(shards)
        known = all(v is not None for v in counts.values())
        held = f"{sum(counts.values())} samples" if known else "an unknown number of samples"
        return DataError(
            f"source {source.key}, epoch {epoch}, yields no batch of {self.batch_size} on rank "
            f"{rank} of {world_size}, worker {worker} of {workers}: its {len(shards)} shard(s) "
            f"there hold {held}, and a batch needs {self.batch_size} samples of one sensor and "
            "size within one worker. Use a smaller batch_size, fewer ranks or num_workers, or "
            "rebuild with a smaller --shard-size so every rank and worker gets enough samples."
        )


class _Batches(IterableDataset):
    """The DataLoader's view of a stream: each worker runs ``worker_batches``."""

    def __init__(self, stream: ShardStream, epoch: int | None, rank: int, world_size: int):
        self.stream, self.epoch, self.rank, self.world_size = stream, epoch, rank, world_size

    def __iter__(self) -> Iterator[dict]:
        return self.stream.worker_batches(self.epoch, self.rank, self.world_size)


class _SourceReader:
    """One worker's share of one source, read batch by batch from a position, epoch after epoch.
    Bad samples and broken shards are skipped, logged and added to ``counts`` (the worker's
    ``{"samples", "bad"}``, shared by its sources)."""

    def __init__(
        self,
        stream: ShardStream,
        source: Source,
        layout: tuple,
        position: dict,
        buffers: BufferRing,
        counts: dict,
    ):
        self.stream, self.source, self.layout, self.buffers = stream, source, layout, buffers
        self.counts = counts
        self.epoch, self.shard, self.offset = (position[k] for k in ("epoch", "shard", "offset"))
        # [[shard index, first offset], ...]: this epoch's shards when a position was remapped
        # to another world size (ShardStream.remapped_state); None: the usual layout. ``later``:
        # the plans of the epochs after it that old workers had already begun.
        self.plan = position.get("plan")
        self.later = [list(plan) for plan in position.get("later", [])]
        self._samples: Iterator | None = None
        self._from_start = False
        self._produced = False

    def position(self) -> dict:
        position = {"epoch": self.epoch, "shard": self.shard, "offset": self.offset}
        if self.plan is not None:
            position["plan"] = self.plan
        if self.later:
            position["later"] = self.later
        return position

    def _raw(self) -> Iterator[tuple[int, int, dict]]:
        if self.plan is None:
            shards = self.stream.worker_shards(self.source, self.epoch, *self.layout)
            starts = [0] * len(shards)
        else:
            shards, starts = [i for i, _ in self.plan], [offset for _, offset in self.plan]
        for j in range(self.shard, len(shards)):  # shards before the position are not opened
            skip = self.offset if j == self.shard else starts[j]
            try:
                samples = self.stream.shard_samples(self.source, shards[j], self.epoch)
                for n, raw in enumerate(samples):
                    if n >= skip:  # samples before the offset are read, never decoded
                        yield j, n + 1, raw
            except DataError as err:
                # The samples before the damage were used; it breaks there on every read.
                self._count_bad(TRUNCATED_SHARD)
                LOG.warning(
                    "skipped the rest of shard %s (%s): %s; reading goes on with the next shard",
                    self.source.shards[shards[j]],
                    TRUNCATED_SHARD,
                    err,
                )

    def _count_bad(self, reason: str) -> None:
        bad = self.counts["bad"]
        bad[reason] = bad.get(reason, 0) + 1

    def next_batch(self, strict: bool) -> dict | None:
        """The next batch of the current epoch; None at the epoch's end (the position then moves
        to the next epoch). ``strict``: raise when a whole epoch gives no batch."""
        if self._samples is None:
            self._samples = self._raw()
            # A remapped plan may hold fewer samples than a batch: only the usual layout's
            # epochs must give one.
            self._from_start = self.plan is None and self.shard == 0 and self.offset == 0
            self._produced = False
        raws = []
        for j, n, raw in self._samples:
            # Counts move with the position, both taken at batch boundaries: a bad sample after
            # the last batch handed out is read and counted again on resume, as it would be
            # without the interruption.
            self.counts["samples"] += 1
            problem = sample_problem(raw)
            if problem is not None:
                self._count_bad(problem.reason)
                LOG.warning(
                    "skipped sample %s of shard %s (%s): %s",
                    raw.get("__key__"),
                    raw.get("__url__"),
                    problem.reason,
                    problem.detail,
                )
                continue
            raws.append(raw)
            if len(raws) == self.stream.batch_size:
                self.shard, self.offset, self._produced = j, n, True
                return self.stream.make_batch(raws, self.epoch, self.buffers)
        if strict and self._from_start and not self._produced:
            raise self.stream.empty_epoch_error(self.source, self.epoch, self.layout)
        self._samples = None
        position = next_planned(self.epoch + 1, self.later)
        self.epoch, self.shard, self.offset = position["epoch"], 0, position["offset"]
        self.plan, self.later = position.get("plan"), position.get("later", [])
        return None


def _unread(stream: ShardStream, source: Source, saved: Sequence[dict]) -> tuple[int, list]:
    """(the earliest epoch of ``source`` any saved worker was in, then per epoch from it to the
    latest one any was in: what the old workers had left of it, as [[shard index, offset], ...])
    from the positions of every old rank (``remapped_state``)."""
    positions = []
    for state in saved:
        workers = max(1, state["num_workers"])
        for w, worker in enumerate(state["workers"]):
            layout = (state["rank"], state["world_size"], w, workers)
            if not stream.worker_shards(source, 0, *layout):
                continue  # that worker never read this source
            start = {"epoch": 0, "shard": 0, "offset": 0}
            positions.append((layout, worker["sources"].get(source.key, start)))
    if not positions:
        return 0, []
    first = min(position["epoch"] for _, position in positions)
    last = max(position["epoch"] for _, position in positions)
    remaining = []
    for epoch in range(first, last + 1):
        left = []
        for layout, position in positions:
            ahead = epoch - position["epoch"]
            if ahead < 0:
                continue  # done with this epoch
            plans = [position.get("plan"), *position.get("later", [])]
            plan = plans[ahead] if ahead < len(plans) and plans[ahead] is not None else None
            if plan is None:
                plan = [[shard, 0] for shard in stream.worker_shards(source, epoch, *layout)]
            if ahead > 0:
                left += plan  # an epoch the worker had not begun: all of it
                continue
            j = position["shard"]
            if j < len(plan):
                left += [[plan[j][0], position["offset"]], *plan[j + 1 :]]
        remaining.append(left)
    return first, remaining


def next_planned(epoch: int, plans: list) -> dict:
    """The position at the first non-empty plan of ``plans`` (the plans of ``epoch`` and the
    epochs after it), or at the usual layout after them all."""
    for i, plan in enumerate(plans):
        if plan:
            position = {"epoch": epoch + i, "shard": 0, "offset": plan[0][1], "plan": plan}
            later = [list(p) for p in plans[i + 1 :]]
            return position | ({"later": later} if later else {})
    return {"epoch": epoch + len(plans), "shard": 0, "offset": 0}


def _no_counts() -> dict:
    """Counts of bad data before any sample is read."""
    return {"samples": 0, "bad": {}}


def _start_position() -> dict:
    """A worker's position before its first batch."""
    return {"draws": 0, "sources": {}, **_no_counts()}


def _as_is(batch: dict) -> dict:
    """The DataLoader's collate function: batches are built already, and its default walks
    every list of every batch converting nothing."""
    return batch


def _sample_count(urls: Sequence[str]) -> float:
    """Samples in ``urls`` from their index files; shards without one count as the known mean."""
    counts = [c for c in shard_sample_counts(urls).values() if c is not None]
    mean = sum(counts) / len(counts) if counts else 1.0
    return sum(counts) + mean * (len(urls) - len(counts))
