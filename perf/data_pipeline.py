"""PERFORMANCE.md target 4: data pipeline throughput, reader and ingest, as ratios to raw reads.

Input: the real Sentinel-2 L2A patches of ``../shared/data/hydro_s2l2a_patches`` (7 GeoTIFFs,
12 bands x 256 x 256 uint16, LZW), linked ``--copies`` times into a temporary folder so the
build sees enough scenes (every link is its own scene; the bytes are the same real files).

* **Ingest**: ``eoforge.datasets.ingest.build_shards`` (GeoTIFF -> 128 x 128 tiles -> WebDataset
  shards with manifest) against a plain ``rasterio`` read of every band of the same files, in
  MB/s of the GeoTIFFs' bytes on disk. Ratio = ingest MB/s / rasterio MB/s.
* **Reader**: one epoch of ``eoforge.datasets.reader.ShardStream`` with ``num_workers=1`` (one
  worker process decoding, normalising with the build's stats.json, shuffling and collating
  batches of ``--batch`` and handing them to the main process) against a raw sequential read of
  the same shards with ``tarfile`` (every member's bytes read, nothing decoded), in samples/s.
  Ratio = reader samples/s / raw samples/s. The reader figure includes starting the worker.

Each measurement runs ``--rounds`` times, alternating with its baseline, and the figure is the
median; the files are read once before timing so both sides read from the page cache. Gate
(PERFORMANCE.md): reader ratio >= 0.5.

Usage: ``python perf/data_pipeline.py [--smoke] [--out perf/results] [--copies 37]``; writes
data_pipeline.json and .md into --out.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tarfile
import tempfile
import time
import warnings
from pathlib import Path

import rasterio

from eoforge.datasets.ingest import build_shards
from eoforge.datasets.reader import ShardStream
from eoforge.datasets.shards import list_shards
from eoforge.datasets.stats import Normaliser, compute_stats

from perf_report import machine, now, write_results

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DATA = Path(os.environ.get("EOFORGE_SAMPLE_DATA", REPO_ROOT.parent / "shared" / "data"))
PATCHES = "hydro_s2l2a_patches"
GATE = 0.5
FULL = dict(copies=37, tile=128, shard_size=128, batch=32, rounds=3)  # 1036 samples, ~400 MB
SMOKE = dict(copies=1, tile=128, shard_size=8, batch=4, rounds=1)  # 28 samples


def link_sources(src: Path, folder: Path, copies: int) -> list[Path]:
    """``copies`` links to every GeoTIFF of ``src``, one sub-folder per copy."""
    files = sorted(src.glob("*.tif"))
    if not files:
        raise SystemExit(f"no GeoTIFFs in {src}; set EOFORGE_SAMPLE_DATA to the sample data")
    links = []
    for i in range(copies):
        sub = folder / f"copy{i:03d}"
        sub.mkdir(parents=True)
        for path in files:
            os.symlink(path.resolve(), sub / path.name)
            links.append(sub / path.name)
    return links


def rasterio_read(files: list[Path]) -> float:
    start = time.perf_counter()
    for path in files:
        with rasterio.open(path) as ds:
            ds.read()
    return time.perf_counter() - start


def ingest(src: Path, out: Path, cfg: dict) -> tuple[float, int]:
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DN 0 (S2 nodata) pixels over water are reported
        summary = build_shards(
            src,
            out,
            "S2L2A",
            tile_size=cfg["tile"],
            shard_size=cfg["shard_size"],
            min_valid=0.0,
            overwrite=True,
            progress=False,
        )
    return time.perf_counter() - start, summary["samples"]


def raw_tar_read(urls: list[str]) -> tuple[float, int, int]:
    """(seconds, members, bytes) of reading every member of every shard in order."""
    start = time.perf_counter()
    members = size = 0
    for url in urls:
        with tarfile.open(url, "r") as tar:
            for info in tar:
                if info.isfile():
                    size += len(tar.extractfile(info).read())
                    members += 1
    return time.perf_counter() - start, members, size


def reader_epoch(stream: ShardStream) -> tuple[float, int, float, int]:
    """(seconds, samples) of a whole epoch, worker start included, and (seconds, samples) of
    its steady state: from the first batch's arrival to the end."""
    start = time.perf_counter()
    samples, first, after_first = 0, None, 0
    for batch in stream.epoch_batches(0):
        samples += len(batch["meta"]["id"])
        if first is None:
            first = time.perf_counter()
        else:
            after_first += len(batch["meta"]["id"])
    end = time.perf_counter()
    return end - start, samples, end - (first or end), after_first


def measure(cfg: dict, work: Path) -> dict:
    files = link_sources(SAMPLE_DATA / PATCHES, work / "src", cfg["copies"])
    source_mb = sum(f.stat().st_size for f in files) / 1e6
    out = work / "shards"
    rasterio_read(files)  # warm the page cache for both sides
    ingest_s, raster_s, samples = [], [], 0
    for _ in range(cfg["rounds"]):
        seconds, samples = ingest(work / "src", out, cfg)
        ingest_s.append(seconds)
        raster_s.append(rasterio_read(files))
    normaliser = Normaliser.from_file(compute_stats(out, progress=False))
    urls = list_shards(out)
    stream = ShardStream(
        out, normaliser, batch_size=cfg["batch"], num_workers=1, rank=0, world_size=1
    )
    raw_tar_read(urls)
    raw_s, reader_s, steady_rates, read = [], [], [], 0
    for _ in range(cfg["rounds"]):
        seconds, members, size = raw_tar_read(urls)
        raw_s.append(seconds)
        seconds, read, steady_s, steady_n = reader_epoch(stream)
        reader_s.append(seconds)
        steady_rates.append(steady_n / steady_s if steady_s > 0 else 0.0)
    raw_rate = samples / statistics.median(raw_s)
    reader_rate = read / statistics.median(reader_s)
    return {
        "samples": samples,
        "samples_per_epoch_read": read,
        "shards": len(urls),
        "shard_mb": size / 1e6,
        "members": members,
        "source_files": len(files),
        "source_mb": source_mb,
        "ingest": {
            "seconds": ingest_s,
            "rasterio_seconds": raster_s,
            "mb_per_s": source_mb / statistics.median(ingest_s),
            "rasterio_mb_per_s": source_mb / statistics.median(raster_s),
        },
        "reader": {
            "seconds": reader_s,
            "raw_tar_seconds": raw_s,
            "samples_per_s": reader_rate,
            "steady_samples_per_s": statistics.median(steady_rates),
            "raw_tar_samples_per_s": raw_rate,
        },
    }


def markdown(result: dict) -> str:
    machine, cfg, m = result["machine"], result["config"], result["measured"]
    ing, rd, gate = m["ingest"], m["reader"], result["gate"]
    lines = [
        "# Data pipeline throughput (reader and ingest), CPU",
        "",
        f"Machine: {machine['processor'] or machine['machine']}, {machine['cpu_count']} CPUs, "
        f"torch {machine['torch']}, {result['date']}. {m['source_files']} links to the 7 real "
        f"S2 L2A GeoTIFFs of {PATCHES} ({m['source_mb']:.0f} MB LZW on disk) -> "
        f"{m['samples']} samples of 12 x {cfg['tile']} x {cfg['tile']} uint16 in {m['shards']} "
        f"shards ({m['shard_mb']:.0f} MB). Reader: ShardStream, num_workers=1, batch "
        f"{cfg['batch']}, default shuffle buffer, worker start included. Median of "
        f"{cfg['rounds']} alternating rounds, page cache warm.",
        "",
        "| stage | eoforge | baseline | ratio |",
        "|---|---:|---:|---:|",
        f"| reader, epoch incl. worker start (samples/s per worker) | {rd['samples_per_s']:.0f} "
        f"| {rd['raw_tar_samples_per_s']:.0f} (raw tar read) | {gate['reader_ratio']:.2f} |",
        f"| reader, steady state after the first batch | {rd['steady_samples_per_s']:.0f} "
        f"| {rd['raw_tar_samples_per_s']:.0f} (raw tar read) | {gate['steady_ratio']:.2f} |",
        f"| ingest (MB/s of GeoTIFF) | {ing['mb_per_s']:.1f} | "
        f"{ing['rasterio_mb_per_s']:.1f} (rasterio read) | {gate['ingest_ratio']:.2f} |",
        "",
        f"**Gate**: reader ratio {gate['reader_ratio']:.2f} over the whole epoch (needs {GATE}): "
        f"{'PASS' if gate['pass'] else 'FAIL'}. The ingest ratio is reported, not gated.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, runs in seconds")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--copies", type=int, help="links per source GeoTIFF (default 37)")
    args = parser.parse_args(argv)
    cfg = dict(SMOKE if args.smoke else FULL)
    if args.copies:
        cfg["copies"] = args.copies
    with tempfile.TemporaryDirectory(prefix="eoforge-data-bench-") as work:
        measured = measure(cfg, Path(work))
    reader_ratio = measured["reader"]["samples_per_s"] / measured["reader"]["raw_tar_samples_per_s"]
    result = {
        "benchmark": "data_pipeline",
        "smoke": args.smoke,
        "date": now(),
        "machine": machine(),
        "config": cfg,
        "measured": measured,
        "gate": {
            "reader_ratio": reader_ratio,
            "steady_ratio": measured["reader"]["steady_samples_per_s"]
            / measured["reader"]["raw_tar_samples_per_s"],
            "ingest_ratio": measured["ingest"]["mb_per_s"]
            / measured["ingest"]["rasterio_mb_per_s"],
            "gate": GATE,
            "pass": reader_ratio >= GATE,
        },
    }
    write_results(args.out, "data_pipeline", result, markdown)
    return result


if __name__ == "__main__":
    main()
