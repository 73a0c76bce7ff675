"""Per-band statistics of a shard folder (``stats.json``) and the normalisation they define.

A multi-sensor shard folder gets one ``stats.json`` covering every sensor's bands (band ids are
unique across sensors); time series contribute every date's values.

``stats.json`` (next to the shards)::

    {"version": 1, "clip_percentiles": [1, 99],
     "bands": {band_id: {"count", "mean", "std", "p1", "p99", "norm_mean", "norm_std"}},
     "skipped": {reason: n}}

Bad samples and broken shards (``eoforge.datasets.sample_checks``) are left out, as the reader
leaves them out of training, and counted under ``skipped``; each is logged with shard and key, so
one NaN in a corrupt sample cannot turn a band's statistics into NaN.

``count``, ``mean`` and ``std`` (population) are exact over every valid raw value (merged per
sample with Chan's parallel update, which stays accurate for large counts). ``p1``/``p99`` and
``norm_mean``/``norm_std`` (mean/std of the values clipped to [p1, p99] and scaled to [0, 1]) come
from a uniform random subsample of at most ``max_values_per_band`` values per band (reservoir
sampling, seeded); below that size they are exact. A band with no valid value has nulls.

Normalisation of one band: clip to [p1, p99] (percentile clipping; ``Normaliser(clip=False)``
skips it), scale by (x - p1) / (p99 - p1), z-score with norm_mean/norm_std; invalid pixels
become 0. Statistics are looked up by band id, and band ids name their sensor ("S2L2A:B02",
"S1GRD:VV"), so every sensor of a multi-sensor sample is normalised with its own statistics.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from eoforge.datasets.errors import DataError
from eoforge.datasets.sample_checks import REASONS, TRUNCATED_SHARD, sample_problem
from eoforge.datasets.shards import STATS_FILE, iter_tar_samples, read_index, sample_views

STATS_VERSION = 1
CLIP_PERCENTILES = (1, 99)
FIELDS = ("count", "mean", "std", "p1", "p99", "norm_mean", "norm_std")
LOG = logging.getLogger("eoforge")


class _BandAccumulator:
    """Exact moments plus a uniform reservoir sample of one band's valid values."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.reservoir = np.empty(0, dtype=np.float32)

    def add(self, values: np.ndarray, rng: np.random.Generator) -> None:
        n = values.size
        if n == 0:
            return
        values64 = values.astype(np.float64)
        mean = float(values64.mean())
        m2 = float(((values64 - mean) ** 2).sum())
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.count * n / total
        self._sample(values.astype(np.float32), rng)
        self.count = total

    def _sample(self, values: np.ndarray, rng: np.random.Generator) -> None:
        # Algorithm R, vectorised: item number i (1-based over the whole stream) replaces slot
        # j ~ U{0..i-1} when j < capacity. ``self.count`` is still the number seen before ``values``.
        seen = self.count
        room = min(self.capacity - self.reservoir.size, values.size)
        if room > 0:
            self.reservoir = np.concatenate([self.reservoir, values[:room]])
            values, seen = values[room:], seen + room
        if values.size == 0:
            return
        positions = seen + 1 + np.arange(values.size, dtype=np.int64)
        slots = rng.integers(0, positions)
        keep = slots < self.capacity
        slots, values = slots[keep], values[keep]
        # Later items overwrite earlier ones in the same slot, as the sequential algorithm does.
        unique, last = np.unique(slots[::-1], return_index=True)
        self.reservoir[unique] = values[::-1][last]

    def result(self) -> dict:
        if self.count == 0:
            return dict.fromkeys(FIELDS, None) | {"count": 0}
        p1, p99 = (
            float(v) for v in np.percentile(self.reservoir.astype(np.float64), CLIP_PERCENTILES)
        )
        scaled = _clip_scale(self.reservoir.astype(np.float64), p1, p99)
        return {
            "count": self.count,
            "mean": self.mean,
            "std": float(np.sqrt(self.m2 / self.count)),
            "p1": p1,
            "p99": p99,
            "norm_mean": float(scaled.mean()),
            "norm_std": float(scaled.std()),
        }


def _clip_scale(values: np.ndarray, p1: float, p99: float) -> np.ndarray:
    if p99 <= p1:  # a constant band carries no contrast: every value maps to 0
        return np.zeros_like(values)
    return (np.clip(values, p1, p99) - p1) / (p99 - p1)


def compute_stats(
    shard_dir: str | Path,
    *,
    max_values_per_band: int = 200_000,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Compute ``stats.json`` for a shard folder (see the module docstring for its contents).

    Args:
        shard_dir: folder with index.json and shards.
        max_values_per_band: size of the per-band subsample behind percentiles and norm_mean/std.
        seed: seed of the subsample.
        progress: show a progress bar over samples.

    Returns:
        The path of the written ``stats.json``.
    """
    if max_values_per_band < 1:
        raise DataError(f"max_values_per_band must be positive, got {max_values_per_band}")
    folder = Path(shard_dir)
    index = read_index(folder)
    rng = np.random.default_rng(seed)
    bands: dict[str, _BandAccumulator] = {
        row["band_id"]: _BandAccumulator(max_values_per_band) for row in index["bands"]
    }
    skipped = dict.fromkeys(REASONS, 0)
    with tqdm(
        total=index["samples"], desc=f"stats {folder.name}", unit="sample", disable=not progress
    ) as bar:
        for row in index["shards"]:
            for raw in _good_samples(folder / row["name"], skipped):
                # Every sensor of a multi-sensor sample adds to its own bands' statistics; a
                # time series adds every date's values.
                for _, image, valid, band_ids in sample_views(raw):
                    for channel, band_id in enumerate(band_ids):
                        accumulator = bands.setdefault(
                            band_id, _BandAccumulator(max_values_per_band)
                        )
                        accumulator.add(image[..., channel, :, :][valid[..., channel, :, :]], rng)
                bar.update()
    stats = {
        "version": STATS_VERSION,
        "clip_percentiles": list(CLIP_PERCENTILES),
        "bands": {band_id: acc.result() for band_id, acc in bands.items()},
        "skipped": skipped,
    }
    path = folder / STATS_FILE
    tmp = path.with_name(f".{STATS_FILE}.{os.getpid()}")
    tmp.write_text(json.dumps(stats, indent=1))
    os.replace(tmp, path)
    return path


def _good_samples(shard: Path, skipped: dict[str, int]):
    """The raw samples of ``shard`` that pass ``sample_checks``; the others, and a break in the
    shard, are counted in ``skipped`` and logged."""
    try:
        for raw in iter_tar_samples(shard):
            problem = sample_problem(raw)
            if problem is None:
                yield raw
                continue
            skipped[problem.reason] += 1
            LOG.warning(
                f"stats: skipped sample {raw.get('__key__')} of shard {shard} "
                f"({problem.reason}): {problem.detail}"
            )
    except DataError as err:
        skipped[TRUNCATED_SHARD] += 1
        LOG.warning(f"stats: skipped the rest of shard {shard} ({TRUNCATED_SHARD}): {err}")


class Normaliser:
    """Per-band normalisation from ``stats.json`` contents: clip to [p1, p99], scale to [0, 1],
    z-score with norm_mean/norm_std; invalid pixels become 0.

    With ``clip=True`` (percentile clipping, the preprocessing the statistics and release cards
    describe) every valid output of a band lies in [(0 - norm_mean) / norm_std,
    (1 - norm_mean) / norm_std], the normalised p1 and p99. With ``clip=False`` the same affine
    map is applied unclipped, so values beyond the band's p1/p99 extend past that range.

    Args:
        stats: a stats dict (``{"bands": {band_id: {...}}, ...}``).
        source: where the stats come from, for error messages.
        clip: clip each band to its [p1, p99] before scaling.
    """

    def __init__(self, stats: dict, source: str = "stats dict", *, clip: bool = True) -> None:
        self.source = source
        self.stats = stats
        self.clip = clip
        self.bands: dict[str, dict] = dict(stats.get("bands", {}))
        self._affines: dict[tuple[str, ...], np.ndarray] = {}

    @classmethod
    def from_file(cls, path: str | Path, *, clip: bool = True) -> Normaliser:
        """The normaliser of one ``stats.json`` (``clip`` as in the class)."""
        path = Path(path)
        if not path.is_file():
            raise DataError(
                f"{path} does not exist; compute it with: eoforge data stats {path.parent}"
            )
        return cls(json.loads(path.read_text()), source=str(path), clip=clip)

    @classmethod
    def from_files(cls, paths: Sequence[str | Path], *, clip: bool = True) -> Normaliser:
        """One normaliser over several shard folders' ``stats.json`` (e.g. one per sensor;
        ``clip`` as in the class).

        Raises:
            DataError: when two files hold different statistics for the same band.
        """
        merged: dict[str, dict] = {}
        origin: dict[str, str] = {}
        for path in paths:
            part = cls.from_file(path)
            for band_id, row in part.bands.items():
                if band_id in merged and merged[band_id] != row:
                    raise DataError(
                        f"band {band_id} has different statistics in {origin[band_id]} and {path}; "
                        "build the shards of one sensor into one folder (one SRC holding all its "
                        "scenes) so that a single stats.json covers them"
                    )
                merged[band_id], origin[band_id] = row, str(path)
        sources = ", ".join(str(p) for p in paths)
        return cls(
            {"version": STATS_VERSION, "clip_percentiles": list(CLIP_PERCENTILES), "bands": merged},
            source=sources,
            clip=clip,
        )

    @property
    def band_ids(self) -> list[str]:
        return list(self.bands)

    def coefficients(
        self, band_ids: Sequence[str]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(low, high, gain, shift) per band, each [C] float32, with
        ``normalised = (clip(x, low, high) - low) * gain - shift``."""
        low, high, gain, shift = (np.zeros(len(band_ids), dtype=np.float64) for _ in range(4))
        for c, band_id in enumerate(band_ids):
            row = self.bands.get(band_id)
            if row is None:
                raise DataError(
                    f"band {band_id} has no statistics in {self.source}; recompute them over shards "
                    "that contain it: eoforge data stats SHARDS"
                )
            if not row.get("count"):
                continue  # never valid anywhere: every pixel of it is invalid and becomes 0
            p1, p99 = row["p1"], row["p99"]
            std = row["norm_std"] if row["norm_std"] > 0 else 1.0
            low[c], high[c] = p1, p99
            gain[c] = 1.0 / ((p99 - p1) * std) if p99 > p1 else 0.0
            shift[c] = row["norm_mean"] / std
        return tuple(a.astype(np.float32) for a in (low, high, gain, shift))

    def __call__(self, array: np.ndarray, valid: np.ndarray, band_ids: Sequence[str]) -> np.ndarray:
        """Normalise ``array`` [C, H, W] or [T, C, H, W] (any real dtype) with ``valid`` bool of
        the same shape whose channels are ``band_ids``; returns float32 of that shape with invalid
        pixels 0."""
        out = np.empty(array.shape, dtype=np.float32)
        self.normalise_into(out, array, valid, band_ids)
        return out

    def normalise_into(
        self,
        out: np.ndarray,
        array: np.ndarray,
        valid: np.ndarray | None,
        band_ids: Sequence[str],
    ) -> None:
        """``__call__`` writing into ``out`` (float32, the shape of ``array``), e.g. a sample's
        slot of a batch; ``valid=None`` means every pixel is valid."""
        if array.ndim < 3 or array.shape[-3] != len(band_ids) or out.shape != array.shape:
            raise DataError(
                f"normalising {array.shape} into {out.shape} with {len(band_ids)} band ids; "
                "the shapes and channel counts must agree"
            )
        if valid is not None and valid.shape != array.shape:
            raise DataError(f"normalising {array.shape} with valid mask {valid.shape}")
        low, high, gain, offset = self.affine(band_ids)[:, :, None, None]  # each [C, 1, 1]
        # Three passes in place over ``out`` (clip converts while it copies): fresh temporaries
        # per operation cost far more (page faults on every large allocation), and this runs
        # once per sample in the reader. ``finish_batch`` does the same on whole batches.
        np.clip(array, low, high, out=out)
        out *= gain
        out -= offset
        if valid is not None and not valid.all():
            out[~valid] = 0.0

    def affine(self, band_ids: Sequence[str]) -> np.ndarray:
        """[4, C] float32 rows (low, high, gain, offset) with ``normalised = clip(x, low, high)
        * gain - offset`` (low/high infinite when ``clip`` is off); cached per band set."""
        key = tuple(band_ids)
        cached = self._affines.get(key)
        if cached is None:
            low, high, gain, shift = (v.astype(np.float64) for v in self.coefficients(key))
            offset = low * gain + shift
            if not self.clip:
                low, high = np.full_like(low, -np.inf), np.full_like(high, np.inf)
            cached = np.stack([low, high, gain, offset]).astype(np.float32)
            self._affines[key] = cached
        return cached
