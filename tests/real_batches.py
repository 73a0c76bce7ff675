"""Real batches through the whole data layer, for tests of objectives and models.

Each function builds shards from the real sample data (``sample_data``, see conftest.py) into
``out`` (a pytest tmp folder) in the order the tiles are read (``order_seed=None``: the first
batch holds each source's first tiles, whatever the builders' default order), computes their
statistics, reads them back with ``ShardStream`` (no shuffling, seed 0) and returns the first
batch in the batch contract. ``size`` is the tile
side: tiles are cut from the real scenes, so every batch holds real, normalised pixels.
"""

from __future__ import annotations

from pathlib import Path

from eoforge.datasets.ingest import build_shards
from eoforge.datasets.pairs import build_paired_shards
from eoforge.datasets.reader import ShardStream
from eoforge.datasets.stats import Normaliser, compute_stats

BEN = Path("bigearthnet_s1s2") / "v1_tiles_bigearthnet_encoder"
SSL4EO = Path("ssl4eo_s12_s1s2")
ENMAP = Path("hyspecnet11k_enmap")
ENMAP_PATTERN = "*SPECTRAL_IMAGE.TIF"


def first_batch(shards: Path, batch_size: int) -> dict:
    """Statistics for ``shards`` and the first batch of an unshuffled stream over them."""
    stats = compute_stats(shards, progress=False)
    stream = ShardStream(
        shards, Normaliser.from_file(stats), batch_size=batch_size, shuffle_buffer=1, seed=0
    )
    batches = stream.iter_batches()
    batch = next(batches)
    batches.close()  # closes the shard file the stream holds open
    return batch


def s2_batch(sample_data: Path, out: Path, size: int = 64, batch_size: int = 2) -> dict:
    """BigEarthNet Sentinel-2 L2A tiles (12 bands on the 10 m grid): view "S2L2A" [B, 12, s, s]."""
    shards = Path(out) / "s2"
    build_shards(
        Path(sample_data) / BEN / "s2-tiny",
        shards,
        "S2L2A",
        tile_size=size,
        progress=False,
        order_seed=None,
    )
    return first_batch(shards, batch_size)


def enmap_batch(sample_data: Path, out: Path, size: int = 64, batch_size: int = 2) -> dict:
    """HySpecNet-11k EnMAP tiles (224 bands, 30 m; water-vapour bands are nodata, so invalid):
    view "ENMAP" [B, 224, s, s]."""
    shards = Path(out) / "enmap"
    build_shards(
        Path(sample_data) / ENMAP,
        shards,
        "ENMAP",
        pattern=ENMAP_PATTERN,
        tile_size=size,
        progress=False,
        order_seed=None,
    )
    return first_batch(shards, batch_size)


def paired_s1s2_batch(
    sample_data: Path,
    out: Path,
    source: str = "bigearthnet",
    size: int = 64,
    batch_size: int = 2,
) -> dict:
    """Co-registered Sentinel-2 L2A + Sentinel-1 GRD tiles on the S2 10 m grid: views "S2L2A"
    [B, 12, s, s] and "S1GRD" [B, 2, s, s], each with ``present`` [B] (all True: partner
    products without a reference are left out here).

    Args:
        source: ``"bigearthnet"`` (the v1 patches and their S1 partners, same-day pairs) or
            ``"ssl4eo"`` (one location, S1 reprojected onto the S2 grid; 30-day window).
    """
    root = Path(sample_data)
    if source == "bigearthnet":
        src, window = root / BEN, 1.0
    elif source == "ssl4eo":
        src, window = root / SSL4EO, 30.0
    else:
        raise ValueError(f"source must be 'bigearthnet' or 'ssl4eo', got {source!r}")
    shards = Path(out) / f"s2s1_{source}"
    build_paired_shards(
        src,
        shards,
        "S2L2A",
        pair=["S1GRD"],
        layout=source,
        time_window_days=window,
        lone_partners=False,  # every sample holds both sensors
        tile_size=size,
        progress=False,
        order_seed=None,
    )
    return first_batch(shards, batch_size)


def seasonal_batch(sample_data: Path, out: Path, size: int = 64) -> dict:
    """The SSL4EO-S12 location's two Sentinel-2 L2A dates as a time series: view "S2L2A" with
    image [1, 2, 12, s, s], valid [1, 2, 12, s, s] and time [1, 2] (unix seconds, ascending)."""
    shards = Path(out) / "s2_series"
    build_paired_shards(
        Path(sample_data) / SSL4EO,
        shards,
        "S2L2A",
        layout="ssl4eo",
        series=True,
        tile_size=size,
        progress=False,
        order_seed=None,
    )
    return first_batch(shards, 1)
