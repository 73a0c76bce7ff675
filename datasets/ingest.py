"""GeoTIFF folders -> WebDataset shards (``eoforge data build``) and shard verification.

Each scene is read onto one grid (``eoforge.datasets.geotiff``) and cut into non-overlapping
``tile_size`` x ``tile_size`` tiles from its top-left corner; tiles reaching past the scene's
right or bottom edge (and whole scenes smaller than a tile) are padded with invalid pixels. A tile
whose valid fraction is below ``min_valid`` is skipped. Writing is atomic: shards go into
``OUT/.tmp-<pid>/`` and are renamed into ``OUT`` at the end; on any error the temporary folder
is removed and ``OUT`` is left as it was (``write_shard_folder``, shared with the multi-sensor
and time-series builds of ``eoforge.datasets.pairs``). index.json is the build's manifest: each
shard's sample count and sha256. ``verify_shards`` checks either kind of folder against it.

Samples are written in a seeded random order over the whole build, not in the order of the input
files: the reader shuffles only within a shard and fills a batch from one shard, so shards
written in file order (a class folder after another, a scene's tiles one after the other) gave
batches of one class or one scene, on which contrastive objectives see no negative of another
class and masked autoencoders stall. The samples are staged in input order, then copied byte for
byte into the shards in the permuted order: the same input and seed give the same shards.
Optional quality thresholds (``eoforge.datasets.quality``) drop cloudy or mostly-empty tiles.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm import tqdm

from eoforge.datasets.errors import DataError
from eoforge.datasets.geotiff import (
    EXTENSIONS,
    INTEGER_DTYPES,
    Scene,
    discover_scenes,
    read_scene,
)
from eoforge.datasets.quality import QualityFilter
from eoforge.datasets.sensors import Sensor, band_table, get_sensor
from eoforge.datasets.shards import (
    FORMAT,
    FORMAT_VERSION,
    INDEX_FILE,
    SHARD_GLOB,
    SHARD_NAME,
    STATS_FILE,
    STORED_DTYPES,
    decode_group,
    decode_sample,
    encode_sample,
    group_member,
    iter_tar_samples,
    read_index,
    sanitise_key,
)

FLOAT16_MAX = float(np.finfo(np.float16).max)
MAX_NAMED_SCENES = 20  # scenes listed by name in a summary; counts cover the rest
WRITE_ORDER_SEED = 0  # the samples' order in the shards (module docstring)
STAGED_NAME = "staged.tar"  # the samples in input order, before they are permuted into shards


def build_shards(
    src: str | Path,
    out: str | Path,
    sensor: str | Sensor,
    *,
    bands: Sequence[str] | None = None,
    pattern: str | None = None,
    extensions: Sequence[str] = EXTENSIONS,
    tile_size: int = 128,
    shard_size: int = 256,
    gsd: float | None = None,
    min_valid: float = 0.5,
    max_cloud_fraction: float | None = None,
    max_nodata_fraction: float | None = None,
    overwrite: bool = False,
    progress: bool = True,
    order_seed: int | None = WRITE_ORDER_SEED,
) -> dict:
    """Turn a folder of GeoTIFFs into a shard folder (see ``eoforge.datasets.shards``).

    Args:
        src: folder searched recursively for scenes (see ``eoforge.datasets.geotiff``).
        out: shard folder to create.
        sensor: registry sensor of every scene in ``src``.
        bands: band names to keep (per-band files), or the bands of multi-band files in file order.
        pattern: glob restricting the files considered, e.g. ``*SPECTRAL_IMAGE.TIF``.
        extensions: file extensions read (GeoTIFF/JP2 by default).
        tile_size: side of the square tiles in pixels.
        shard_size: samples per shard.
        gsd: target pixel size in metres (default: the finest band's grid).
        min_valid: tiles with a smaller fraction of valid pixels are skipped.
        max_cloud_fraction: drop tiles whose fraction of cloudy pixels, from the cloud layers
            shipped with each scene, exceeds this (see ``eoforge.datasets.quality``).
        max_nodata_fraction: drop tiles whose fraction of pixels without any valid band
            exceeds this.
        overwrite: replace shards (and the now stale stats.json) already in ``out``.
        progress: show a progress bar over scenes.
        order_seed: seed of the order the samples are written in (``write_shard_folder``);
            None keeps the order they are read in.

    Returns:
        A summary: output folder, scene/sample/shard counts, skipped tiles and scenes, the
        invalid (nodata/NaN) pixels found, and ``quality`` (thresholds, tiles kept and dropped
        per reason, scenes per cloud layer; also stored in index.json).

    Raises:
        DataError: empty input, unknown band names, band-count mismatches, existing shards
            without ``overwrite``, a cloud threshold for a scene without a cloud layer, or no
            tile kept.
    """
    check_build_options(tile_size, shard_size, min_valid)
    quality = QualityFilter(max_cloud_fraction, max_nodata_fraction)
    src, out = Path(src), Path(out)
    sensor = get_sensor(sensor) if isinstance(sensor, str) else sensor
    scenes = discover_scenes(src, sensor, bands=bands, pattern=pattern, extensions=extensions)
    summary = {
        "out": str(out),
        "sensor": sensor.name,
        "scenes": len(scenes),
        "scenes_skipped": 0,
        "samples": 0,
        "shards": 0,
        "tiles_skipped": 0,
        "invalid_pixels": 0,
        "scenes_with_invalid": 0,
        "invalid_examples": [],
    }
    bands_seen: dict[str, dict] = {}

    def samples() -> Iterator[dict]:
        keys: set[str] = set()
        for source in tqdm(
            scenes, desc=f"shards {sensor.name}", unit="scene", disable=not progress
        ):
            scene = read_scene(source, gsd=gsd)
            if not keep_scene(scene, summary):
                continue
            for row in band_table(scene.bands):
                bands_seen.setdefault(row["band_id"], row)
            quality.start_scene(source, scene)
            for window, image, valid in tiles(scene, tile_size):
                if valid.mean() < min_valid:
                    summary["tiles_skipped"] += 1
                    continue
                if not quality.keeps(window, valid):
                    continue
                key = unique_key(f"{scene.sensor}_{scene.name}_r{window[0]}_c{window[1]}", keys)
                stored = stored_array(image, valid, scene.source)
                yield encode_sample(key, stored, valid, _tile_meta(key, scene, window))

    def index(counts: list[int]) -> dict:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "shards": [{"name": SHARD_NAME.format(i), "samples": n} for i, n in enumerate(counts)],
            "samples": sum(counts),
            "sensors": {sensor.name: sum(counts)},
            "bands": list(bands_seen.values()),
            "source": str(src.resolve()),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "quality": quality.report(),
        }

    def nothing_kept() -> DataError:
        dropped = quality.report()["tiles_dropped"]
        return DataError(
            f"no tile of {src} was kept: {summary['tiles_skipped']} tiles had less than "
            f"min_valid={min_valid} valid pixels, {dropped['nodata']} more nodata than "
            f"max_nodata_fraction={max_nodata_fraction}, {dropped['cloud']} more cloud than "
            f"max_cloud_fraction={max_cloud_fraction}, and {summary['scenes_skipped']} scenes had "
            "no valid pixel; relax those thresholds or --tile-size, or check the nodata of the inputs"
        )

    counts = write_shard_folder(
        out,
        samples(),
        index,
        shard_size=shard_size,
        overwrite=overwrite,
        empty=nothing_kept,
        order_seed=order_seed,
    )
    summary.update(samples=sum(counts), shards=len(counts), quality=quality.report())
    return summary


def write_shard_folder(
    out: Path,
    samples: Iterable[dict],
    index: Callable[[list[int]], dict],
    *,
    shard_size: int,
    overwrite: bool,
    empty: Callable[[], DataError],
    order_seed: int | None = WRITE_ORDER_SEED,
) -> list[int]:
    """Write encoded samples into a shard folder atomically, in a seeded random order (see the
    module docstring).

    Args:
        out: shard folder to create or, with ``overwrite``, replace.
        samples: encoded samples (``encode_sample``/``encode_group``), consumed once.
        index: builds index.json's contents from the samples per shard, once all are written.
        shard_size: samples per shard.
        overwrite: replace shards (and the now stale stats.json) already in ``out``.
        empty: the error to raise when ``samples`` yields nothing.
        order_seed: seed of the order the samples are written in; None writes them in their
            order in ``samples`` (for layouts made on purpose, such as test fixtures).

    Returns:
        Samples per shard; index.json's ``shards`` rows also get each shard's ``sha256``.
    """
    existing = _existing_outputs(out)
    if any(p.name != STATS_FILE for p in existing) and not overwrite:
        raise DataError(
            f"{out} already holds shards; pass overwrite=True (--overwrite) to replace them"
        )
    created = not out.exists()
    tmp = out / f".tmp-{os.getpid()}"
    writer = _ShardWriter(tmp, shard_size)
    try:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed build that had this pid
        tmp.mkdir(parents=True)
        if order_seed is None:
            for sample in samples:
                writer.write(sample)
        else:
            staged = tmp / STAGED_NAME
            members = _stage(staged, samples)
            for sample in _permuted(staged, members, order_seed):
                writer.write(sample)
            staged.unlink()
        writer.close()
        if not writer.counts:
            raise empty()
        contents = index(writer.counts)
        for row in contents["shards"]:  # the manifest ``verify_shards`` checks shards against
            row["sha256"] = file_sha256(tmp / row["name"])
        (tmp / INDEX_FILE).write_text(json.dumps(contents, indent=1))
        for path in existing:
            path.unlink()
        for i in range(len(writer.counts)):
            os.replace(tmp / SHARD_NAME.format(i), out / SHARD_NAME.format(i))
        os.replace(tmp / INDEX_FILE, out / INDEX_FILE)  # last: a folder with an index is complete
        tmp.rmdir()
    except BaseException:
        writer.close()
        shutil.rmtree(tmp, ignore_errors=True)
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    return writer.counts


def _stage(path: Path, samples: Iterable[dict]) -> list[int]:
    """Write ``samples`` in their order into one tar at ``path``; the member count of each."""
    members = []
    with wds.TarWriter(str(path), format="PAX_FORMAT", mtime=0.0) as tar:
        for sample in samples:
            tar.write(sample)
            members.append(len(sample) - 1)  # every entry but __key__ is a member
    return members


def _permuted(path: Path, members: list[int], seed: int) -> Iterator[dict]:
    """The samples staged at ``path`` (``members`` per sample) as member dicts for
    ``TarWriter.write``, in the order of a permutation seeded by ``seed``, their bytes unchanged."""
    with tarfile.open(path) as tar, open(path, "rb") as f:
        infos = tar.getmembers()
        starts = np.concatenate([[0], np.cumsum(members)]).astype(int)
        for i in np.random.default_rng(seed).permutation(len(members)):
            sample: dict = {}
            for info in infos[starts[i] : starts[i + 1]]:
                key, extension = info.name.split(".", 1)  # keys hold no dot (sanitise_key)
                f.seek(info.offset_data)
                sample["__key__"] = key
                sample[extension] = f.read(info.size)
            yield sample


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_build_options(tile_size: int, shard_size: int, min_valid: float) -> None:
    """DataError unless tile and shard sizes are positive and min_valid is a fraction."""
    if tile_size < 1 or shard_size < 1:
        raise DataError(
            f"tile_size and shard_size must be positive, got {tile_size} and {shard_size}"
        )
    if not 0.0 <= min_valid <= 1.0:
        raise DataError(f"min_valid must be between 0 and 1, got {min_valid}")


def _existing_outputs(out: Path) -> list[Path]:
    if not out.is_dir():
        return []
    return sorted(out.glob(SHARD_GLOB)) + [
        p for p in (out / INDEX_FILE, out / STATS_FILE) if p.is_file()
    ]


def keep_scene(scene: Scene, summary: dict) -> bool:
    """Whether to keep ``scene``: False when it has no valid pixel at all. Its invalid pixels are
    counted in ``summary`` and reported either way."""
    invalid = int(scene.valid.size - np.count_nonzero(scene.valid))
    if invalid == scene.valid.size:
        summary["scenes_skipped"] += 1
        files = ", ".join(sorted(set(scene.files)))
        warnings.warn(
            f"{files}: every pixel of scene {scene.name} is nodata/NaN; scene skipped", stacklevel=3
        )
        return False
    if invalid:
        summary["invalid_pixels"] += invalid
        summary["scenes_with_invalid"] += 1
        if len(summary["invalid_examples"]) < MAX_NAMED_SCENES:
            summary["invalid_examples"].append(scene.source)
        per_band = (~scene.valid).any(axis=(1, 2))
        files = sorted({f for f, bad in zip(scene.files, per_band, strict=True) if bad})
        names = [b.name for b, bad in zip(scene.bands, per_band, strict=True) if bad]
        warnings.warn(
            f"{', '.join(files[:3])}{' ...' if len(files) > 3 else ''}: {invalid} of "
            f"{scene.valid.size} band-pixels of scene {scene.name} are nodata, NaN or outside a "
            f"band's footprint (bands {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}); "
            "marked invalid",
            stacklevel=3,
        )
    return True


def tiles(
    scene: Scene, tile_size: int
) -> Iterator[tuple[tuple[int, int, int, int], np.ndarray, np.ndarray]]:
    """Non-overlapping ``tile_size`` tiles of a scene, row by row from the top-left corner.

    Yields:
        ``(window [row, col, h, w], image [C, t, t], valid [C, t, t])``; pixels past the scene's
        edge are invalid and hold the scene's nodata (integers) or NaN (floats).
    """
    channels, height, width = scene.image.shape
    fill = scene.nodata if scene.nodata is not None else np.nan
    for row in range(0, height, tile_size):
        for col in range(0, width, tile_size):
            h, w = min(tile_size, height - row), min(tile_size, width - col)
            image = np.full((channels, tile_size, tile_size), fill, dtype=scene.image.dtype)
            valid = np.zeros((channels, tile_size, tile_size), dtype=bool)
            image[:, :h, :w] = scene.image[:, row : row + h, col : col + w]
            valid[:, :h, :w] = scene.valid[:, row : row + h, col : col + w]
            yield (row, col, tile_size, tile_size), image, valid


def stored_array(image: np.ndarray, valid: np.ndarray, source: str) -> np.ndarray:
    """The shard dtype: the source integer dtype if uint8/uint16/int16, else float16 with NaN."""
    if image.dtype in INTEGER_DTYPES:
        return image
    values = image[valid]
    if values.size and float(np.abs(values).max()) > FLOAT16_MAX:
        raise DataError(
            f"{source}: values up to {float(np.abs(values).max()):.4g} do not fit the float16 shard "
            f"format (max {FLOAT16_MAX:.0f}); rescale the source to smaller units first"
        )
    return np.where(valid, image, np.nan).astype(np.float16)


def unique_key(text: str, keys: set[str]) -> str:
    """``text`` as a sample key, made unique among ``keys`` (and added to them)."""
    base = key = sanitise_key(text)
    n = 1
    while key in keys:  # ids of different scenes can coincide once sanitised
        n += 1
        key = f"{base}-{n}"
    keys.add(key)
    return key


def _tile_meta(key: str, scene: Scene, window: tuple[int, int, int, int]) -> dict:
    sensor = get_sensor(scene.sensor)
    return {
        "id": key,
        "sensor": scene.sensor,
        "band_ids": [b.band_id for b in scene.bands],
        "wavelengths": [b.wavelength for b in scene.bands],
        "bandwidths": [b.bandwidth for b in scene.bands],
        "gsd": scene.gsd,
        "crs": scene.crs,
        "bounds": list(scene.window_bounds(*window)),
        "time": scene.time,
        "source": scene.source,
        "window": list(window),
        "scale": sensor.scale,
        "offset": sensor.offset,
        "units": sensor.units,
        "nodata": scene.nodata,
    }


class _ShardWriter:
    """Rotates ``shard-NNNNNN.tar`` files every ``shard_size`` samples and counts them."""

    def __init__(self, folder: Path, shard_size: int) -> None:
        self.folder = folder
        self.shard_size = shard_size
        self.counts: list[int] = []
        self._tar: wds.TarWriter | None = None

    def write(self, sample: dict) -> None:
        if self._tar is None or self.counts[-1] == self.shard_size:
            self.close()
            path = self.folder / SHARD_NAME.format(len(self.counts))
            # PAX headers: ids of long product names exceed ustar's 100-character member names.
            # A fixed mtime makes the same input give byte-identical shards.
            self._tar = wds.TarWriter(str(path), format="PAX_FORMAT", mtime=0.0)
            self.counts.append(0)
        self._tar.write(sample)
        self.counts[-1] += 1

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None


def verify_shards(folder: str | Path) -> dict:
    """Read every sample of a shard folder back and check it against its index.json.

    Checks per shard the sha256 recorded at build time (folders built before the manifest
    existed have none: a warning says so) and the sample count, and per sample: the members, a stored dtype, [C, H, W]
    shapes ([T, C, H, W] for time series, with T timestamps), the valid mask's shape,
    ``band_ids``/``wavelengths``/``bandwidths`` of length C, the id matching the key, unique keys,
    and finally the per-sensor totals. In group folders every sensor of a sample must be on one
    grid, and a sensor counts where the sample holds it (``present``).

    Returns:
        ``{"folder", "shards", "samples", "sha256_checked" (shards), "sensors", "shapes",
        "dtypes"}``, plus ``"missing"`` (samples lacking each sensor) for group folders.

    Raises:
        DataError: naming the shard, sample key and sensor at fault.
    """
    folder = Path(folder)
    index = read_index(folder)
    grouped = "group" in index
    tally = {"samples": 0, "sensors": {}, "missing": {}, "shapes": {}, "dtypes": {}}
    keys: set[str] = set()
    unchecked = []
    for row in index["shards"]:
        path = folder / row["name"]
        if not path.is_file():
            raise DataError(
                f"{path} is listed in {folder / INDEX_FILE} but missing; rebuild the shards"
            )
        if "sha256" not in row:
            unchecked.append(row["name"])
        elif (digest := file_sha256(path)) != row["sha256"]:
            raise DataError(
                f"{path}: sha256 {digest} differs from {row['sha256']} recorded in "
                f"{folder / INDEX_FILE} at build time ({_count_note(path, row['samples'])}); "
                "the shard changed after it was built: rebuild it or restore it from a copy"
            )
        count = 0
        for raw in iter_tar_samples(path):
            where = f"{path}: sample {raw['__key__']}"
            if raw["__key__"] in keys:
                raise DataError(f"{where} appears twice in {folder}")
            keys.add(raw["__key__"])
            if grouped:
                _verify_group(raw, where, tally)
            else:
                _verify_single(raw, where, tally)
            count += 1
        if count != row["samples"]:
            raise DataError(
                f"{path} holds {count} samples but {folder / INDEX_FILE} says {row['samples']}"
            )
    sensors = tally["sensors"]
    total = tally["samples"] if grouped else sum(sensors.values())
    if total != index["samples"] or sensors != index["sensors"]:
        raise DataError(
            f"{folder}: samples per sensor {sensors} differ from {INDEX_FILE}'s "
            f"{index['sensors']} (total {total} samples, {INDEX_FILE} says {index['samples']})"
        )
    if unchecked:
        warnings.warn(
            f"{folder / INDEX_FILE} records no sha256 for {len(unchecked)} shard(s) "
            f"({', '.join(unchecked[:3])}{' ...' if len(unchecked) > 3 else ''}); their bytes "
            "were not checked: rebuild with this version to get a manifest",
            stacklevel=2,
        )
    result = {
        "folder": str(folder),
        "shards": len(index["shards"]),
        "samples": total,
        "sha256_checked": len(index["shards"]) - len(unchecked),
        "sensors": sensors,
        "shapes": tally["shapes"],
        "dtypes": tally["dtypes"],
    }
    if grouped:
        missing = {s: tally["missing"].get(s, 0) for s in index["group"]["sensors"]}
        if missing != index.get("missing"):
            raise DataError(
                f"{folder}: samples lacking each sensor {missing} differ from {INDEX_FILE}'s "
                f"{index.get('missing')}"
            )
        result["missing"] = missing
    return result


def _count_note(path: Path, expected: int) -> str:
    """What a changed shard still holds, for the error that reports it."""
    try:
        count = sum(1 for _ in iter_tar_samples(path))
    except (tarfile.TarError, DataError, OSError) as exc:
        return f"it no longer reads as a tar: {exc}"
    return f"it holds {count} samples, {INDEX_FILE} says {expected}"


def _count(counter: dict, key: str) -> None:
    counter[key] = counter.get(key, 0) + 1


def _check_view(where: str, image: np.ndarray, fields: dict, ndims: tuple[int, ...]) -> None:
    shape = "[C, H, W]" if ndims == (3,) else "[C, H, W] or [T, C, H, W]"
    if image.ndim not in ndims or image.dtype not in STORED_DTYPES:
        raise DataError(
            f"{where} has image {image.dtype} {image.shape}; expected {shape} "
            f"in {', '.join(str(d) for d in STORED_DTYPES)}"
        )
    for field in ("band_ids", "wavelengths", "bandwidths"):
        if len(fields.get(field, ())) != image.shape[-3]:
            raise DataError(
                f"{where}: {field} has {len(fields.get(field, ()))} entries for "
                f"{image.shape[-3]} channels"
            )


def _verify_single(raw: dict, where: str, tally: dict) -> None:
    unexpected = set(raw) - {"__key__", "__url__", "image.npy", "valid.npy", "json"}
    if unexpected:
        raise DataError(f"{where} has unexpected members {sorted(unexpected)}")
    image, _, meta = decode_sample(raw)
    _check_view(where, image, meta, (3,))
    if meta.get("id") != raw["__key__"]:
        raise DataError(f"{where} has metadata id {meta.get('id')!r}")
    tally["samples"] += 1
    _count(tally["sensors"], meta["sensor"])
    _count(tally["shapes"], "x".join(str(n) for n in image.shape))
    _count(tally["dtypes"], str(image.dtype))


def _verify_group(raw: dict, where: str, tally: dict) -> None:
    views, meta = decode_group(raw)
    if meta.get("id") != raw["__key__"]:
        raise DataError(f"{where} has metadata id {meta.get('id')!r}")
    allowed = {"__key__", "__url__", "json"} | {
        group_member(sensor, member)
        for sensor, pair in views.items()
        if pair is not None
        for member in ("image.npy", "valid.npy")
    }
    unexpected = {name.lower() for name in raw} - allowed
    if unexpected:
        raise DataError(f"{where} has unexpected members {sorted(unexpected)}")
    if not any(pair is not None for pair in views.values()):
        raise DataError(f"{where} holds no sensor at all")
    sizes = set()
    for sensor, pair in views.items():
        row = meta["sensors"][sensor]
        if pair is None:
            _count(tally["missing"], sensor)
            continue
        image = pair[0]
        _check_view(f"{where}, sensor {sensor}", image, row, (3, 4))
        if image.ndim == 4 and len(row.get("time") or ()) != image.shape[0]:
            raise DataError(
                f"{where}, sensor {sensor}: {image.shape[0]} dates but time {row.get('time')}"
            )
        sizes.add(image.shape[-2:])
        _count(tally["sensors"], sensor)
        _count(tally["shapes"], f"{sensor}:" + "x".join(str(n) for n in image.shape))
        _count(tally["dtypes"], str(image.dtype))
    if len(sizes) > 1:
        raise DataError(f"{where}: sensors are on different grids {sorted(sizes)}")
    tally["samples"] += 1
