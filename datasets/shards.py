"""The eoforge shard format: sample encoding shared by the writer, statistics and the reader.

A shard folder holds ``shard-000000.tar``, ``shard-000001.tar``, ... (WebDataset tar files) and
``index.json``; ``stats.json`` is added by ``eoforge.datasets.stats``. Each sample has the members
``<key>.image.npy`` ([C, H, W]; uint8/uint16/int16 as in the source, otherwise float16 with NaN
for nodata), ``<key>.valid.npy`` (bool [C, H, W], only when some pixel is invalid) and
``<key>.json`` (metadata: id, sensor, band_ids, wavelengths, bandwidths, gsd, crs, bounds, time,
source, window, scale, offset, units, nodata). Keys contain no dots, because WebDataset splits a
member name into key and extension at the first dot.

Group samples (several co-registered sensors and/or a time axis; index.json ``version`` 2 with a
``group`` entry) hold one ``<key>.<sensor>.image.npy`` (sensor in lower case: WebDataset lower-cases
member extensions) and, when some pixel is invalid, ``<key>.<sensor>.valid.npy`` per sensor present
in the sample, each [C, H, W] or, for a time series, [T, C, H, W], all on one grid. Their
``<key>.json`` holds the shared fields (id, crs, bounds, source, window, footprint, anchor) and
``sensors``: ``{sensor: {"present", "shape", "band_ids", "wavelengths", "bandwidths", "gsd",
"time" (int, list of T ints for a series, or null), "source", "scale", "offset", "units",
"nodata"}}``; a sensor the sample lacks has ``present`` false and no image member.
"""

from __future__ import annotations

import io
import json
import logging
import math
import mmap
import os
import re
import tarfile
import time
import tokenize
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
from braceexpand import braceexpand
from webdataset.gopen import gopen

from eoforge.datasets.errors import DataError

INDEX_FILE = "index.json"
STATS_FILE = "stats.json"
SHARD_NAME = "shard-{:06d}.tar"
SHARD_GLOB = "shard-*.tar"
FORMAT = "eoforge-shards"
FORMAT_VERSION = 1
GROUP_FORMAT_VERSION = 2
STORED_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.int16), np.dtype(np.float16))
IMAGE, VALID, META = "image.npy", "valid.npy", "json"
PIPE = "pipe:"

_EMPTY_BLOCK = bytes(tarfile.BLOCKSIZE)
_GZIP_MAGIC = b"\x1f\x8b"
_NPY_HEADERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}
# MAP_POPULATE maps the whole shard up front: one call instead of a page fault per 4 KiB read.
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
_NPY_HEADER_CACHE: dict[bytes, tuple] = {}
_PIPE_PIECE = 64 * 2**20  # bytes of a tar member read from a pipe at once
# A pipe: read that fails (an object store's hiccup) is tried again this often, after a pause
# that doubles from PIPE_BACKOFF_S, before the shard counts as broken.
PIPE_RETRIES = 3
PIPE_BACKOFF_S = 2.0
LOG = logging.getLogger("eoforge")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def sanitise_key(text: str) -> str:
    """A sample key from any id: runs of characters other than letters, digits, ``_`` and ``-``
    become one ``_`` (dots would split the key, slashes would create folders in the tar)."""
    key = _UNSAFE.sub("_", text).strip("_")
    if not key:
        raise DataError(f"cannot make a sample key from {text!r}: it has no letters or digits")
    return key


def encode_sample(key: str, image: np.ndarray, valid: np.ndarray, meta: dict) -> dict:
    """One sample as the member dict that ``webdataset.TarWriter.write`` takes.

    Args:
        key: sanitised sample id (see ``sanitise_key``).
        image: [C, H, W] array in a stored dtype (uint8, uint16, int16 or float16).
        valid: bool [C, H, W]; written only when some pixel is invalid.
        meta: JSON-serialisable metadata; its ``band_ids`` must have C entries.

    Returns:
        ``{"__key__": key, "image.npy": bytes, "json": bytes}`` plus ``"valid.npy"`` when needed.
    """
    if key != sanitise_key(key):
        raise DataError(
            f"sample key {key!r} contains characters other than letters, digits, _ and -"
        )
    if image.ndim != 3 or image.dtype not in STORED_DTYPES:
        raise DataError(
            f"sample {key}: image must be [C, H, W] in one of "
            f"{', '.join(str(d) for d in STORED_DTYPES)}; got {image.dtype} {image.shape}"
        )
    if valid.shape != image.shape or valid.dtype != np.bool_:
        raise DataError(
            f"sample {key}: valid mask must be bool {image.shape}, got {valid.dtype} {valid.shape}"
        )
    if len(meta.get("band_ids", ())) != image.shape[0]:
        raise DataError(
            f"sample {key}: {image.shape[0]} channels but band_ids {meta.get('band_ids')}"
        )
    sample = {
        "__key__": key,
        IMAGE: _npy_bytes(image),
        META: json.dumps(meta, sort_keys=True).encode("utf-8"),
    }
    if not valid.all():
        sample[VALID] = _npy_bytes(valid)
    return sample


def decode_sample(raw: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    """Inverse of ``encode_sample`` for a raw WebDataset sample (member name -> bytes).

    Returns:
        ``(image [C, H, W] in its stored dtype, valid bool [C, H, W], meta dict)``; where no
        valid mask was stored every pixel is valid, and non-finite float pixels are always invalid.
        The arrays may be read-only views of the member bytes.

    Raises:
        DataError: naming the sample and shard for a missing or unreadable member, or metadata
            whose ``band_ids`` do not count the image's channels.
    """
    meta = load_meta(raw)
    image, valid = decode_arrays(raw)
    _check_band_ids(meta.get("band_ids"), image.shape[0], _where(raw))
    return image, np.ones(image.shape, dtype=bool) if valid is None else valid, meta


def load_meta(raw: dict) -> dict:
    """The ``.json`` member of a raw sample as a dict.

    Raises:
        DataError: naming the sample and shard when the member is missing, is not JSON (a
            corrupt shard) or is not a JSON object.
    """
    where = _where(raw)
    if META not in raw:
        raise DataError(f"{where} has no .{META} member; rebuild the shards (eoforge data build)")
    try:
        meta = json.loads(bytes(raw[META]))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise DataError(
            f"{where}: .{META} member is not JSON ({exc}); the shard is corrupt"
        ) from None
    if not isinstance(meta, dict):
        raise DataError(
            f"{where}: .{META} member holds a {type(meta).__name__}, not an object; "
            "the shard is corrupt"
        )
    return meta


def _check_band_ids(band_ids, channels: int, where: str) -> None:
    if not isinstance(band_ids, list) or len(band_ids) != channels:
        raise DataError(
            f"{where}: metadata band_ids {band_ids!r} do not name the image's {channels} "
            "channels; the shard is corrupt"
        )


def decode_arrays(raw: dict) -> tuple[np.ndarray, np.ndarray | None]:
    """``decode_sample``'s image and valid mask, with None for a mask that is True everywhere
    (none stored, and no float pixel non-finite)."""
    if IMAGE not in raw:
        raise DataError(
            f"{_where(raw)} has no .{IMAGE} member; rebuild the shards (eoforge data build)"
        )
    image = load_npy(raw[IMAGE], f"{_where(raw)}, .{IMAGE}")
    check_image(image, (3,), f"{_where(raw)}, .{IMAGE}")
    valid = None
    if VALID in raw:
        valid = load_npy(raw[VALID], f"{_where(raw)}, .{VALID}")
        check_mask(valid, image, f"{_where(raw)}, .{VALID}")
    if np.issubdtype(image.dtype, np.floating):
        finite = np.isfinite(image)
        valid = finite if valid is None else valid & finite
    return image, valid


def _where(raw: dict) -> str:
    return f"sample {raw.get('__key__', '?')} in {raw.get('__url__', '?')}"


def check_image(image: np.ndarray, ndims: tuple[int, ...], where: str) -> None:
    """DataError unless a decoded image has one of ``ndims`` dimensions and a stored dtype (a
    corrupt npy header can declare any shape or dtype its bytes happen to fit)."""
    if image.ndim not in ndims or image.dtype not in STORED_DTYPES:
        shape = " or ".join(("[C, H, W]", "[T, C, H, W]")[n - 3] for n in ndims)
        raise DataError(
            f"{where} holds {image.dtype} {image.shape}; expected {shape} in one of "
            f"{', '.join(str(d) for d in STORED_DTYPES)}; the shard is corrupt"
        )


def check_mask(valid: np.ndarray, image: np.ndarray, where: str) -> None:
    """DataError unless a stored valid mask is bool and of its image's shape."""
    if valid.shape != image.shape or valid.dtype != np.bool_:
        raise DataError(
            f"{where}: valid mask {valid.dtype} {valid.shape} does not match image "
            f"{image.shape} (expected bool)"
        )


def is_group(meta: dict) -> bool:
    """Whether sample metadata is a group sample's (several sensors and/or a time axis)."""
    return "sensors" in meta


def group_member(sensor: str, member: str) -> str:
    """The member name of one sensor's array in a group sample, e.g. ``s1grd.image.npy``."""
    return f"{sensor.lower()}.{member}"


def encode_group(key: str, views: dict[str, tuple[np.ndarray, np.ndarray]], meta: dict) -> dict:
    """One group sample as the member dict that ``webdataset.TarWriter.write`` takes.

    Args:
        key: sanitised sample id.
        views: ``{sensor: (image, valid)}`` for the sensors present: image [C, H, W] or
            [T, C, H, W] in a stored dtype, valid bool of the same shape; one H, W for all.
        meta: shared metadata with ``sensors`` (see the module docstring); every sensor of
            ``views`` must be there with ``present`` true and a matching ``shape``.

    Raises:
        DataError: naming the sample and sensor whose arrays disagree with each other or meta.
    """
    if key != sanitise_key(key):
        raise DataError(
            f"sample key {key!r} contains characters other than letters, digits, _ and -"
        )
    sensors = meta.get("sensors", {})
    sample = {"__key__": key, META: json.dumps(meta, sort_keys=True).encode("utf-8")}
    sizes = set()
    for sensor, row in sensors.items():
        if row.get("present") != (sensor in views):
            raise DataError(
                f"sample {key}: sensor {sensor} has present={row.get('present')} in its metadata "
                f"but {'an' if sensor in views else 'no'} image"
            )
    for sensor, (image, valid) in views.items():
        where = f"sample {key}, sensor {sensor}"
        if sensor not in sensors:
            raise DataError(f"{where}: no entry in the metadata's sensors")
        if image.ndim not in (3, 4) or image.dtype not in STORED_DTYPES:
            raise DataError(
                f"{where}: image must be [C, H, W] or [T, C, H, W] in one of "
                f"{', '.join(str(d) for d in STORED_DTYPES)}; got {image.dtype} {image.shape}"
            )
        if valid.shape != image.shape or valid.dtype != np.bool_:
            raise DataError(
                f"{where}: valid mask must be bool {image.shape}, got {valid.dtype} {valid.shape}"
            )
        if list(image.shape) != list(sensors[sensor].get("shape", ())):
            raise DataError(
                f"{where}: image {image.shape} but metadata shape {sensors[sensor].get('shape')}"
            )
        if len(sensors[sensor].get("band_ids", ())) != image.shape[-3]:
            raise DataError(
                f"{where}: {image.shape[-3]} channels but band_ids {sensors[sensor].get('band_ids')}"
            )
        sizes.add(image.shape[-2:])
        sample[group_member(sensor, IMAGE)] = _npy_bytes(image)
        if not valid.all():
            sample[group_member(sensor, VALID)] = _npy_bytes(valid)
    if len(sizes) > 1:
        raise DataError(f"sample {key}: sensors are on different grids {sorted(sizes)}")
    return sample


def decode_group(raw: dict) -> tuple[dict[str, tuple[np.ndarray, np.ndarray] | None], dict]:
    """Inverse of ``encode_group`` for a raw WebDataset sample (member name -> bytes).

    Returns:
        ``({sensor: (image in its stored dtype, valid bool) or None where absent}, meta)``;
        non-finite float pixels are always invalid. The arrays may be read-only views.

    Raises:
        DataError: naming the sample, shard and sensor for a missing or unreadable member, or
            metadata that does not describe the arrays.
    """
    where = _where(raw)
    meta = load_meta(raw)
    sensors = meta.get("sensors", {})
    if not isinstance(sensors, dict) or not all(isinstance(r, dict) for r in sensors.values()):
        raise DataError(f"{where}: metadata sensors {sensors!r} is not an object of objects")
    members = {name.lower(): value for name, value in raw.items()}
    views: dict[str, tuple[np.ndarray, np.ndarray] | None] = {}
    for sensor, row in sensors.items():
        if not row.get("present"):
            views[sensor] = None
            continue
        name = group_member(sensor, IMAGE)
        if name not in members:
            raise DataError(f"{where}: sensor {sensor} is present but has no .{name} member")
        image = load_npy(members[name], f"{where}, .{name}")
        check_image(image, (3, 4), f"{where}, .{name}")
        _check_band_ids(row.get("band_ids"), image.shape[-3], f"{where}, sensor {sensor}")
        mask = members.get(group_member(sensor, VALID))
        if mask is None:
            valid = np.ones(image.shape, dtype=bool)
        else:
            valid = load_npy(mask, f"{where}, .{group_member(sensor, VALID)}")
            check_mask(valid, image, f"{where}, sensor {sensor}")
        if np.issubdtype(image.dtype, np.floating):
            valid = valid & np.isfinite(image)
        views[sensor] = (image, valid)
    return views, meta


def sample_views(raw: dict) -> list[tuple[str, np.ndarray, np.ndarray, list[str]]]:
    """``(sensor, image, valid, band_ids)`` of every sensor present in a raw sample, single-sensor
    or group: what statistics need from either format."""
    if not is_group(load_meta(raw)):
        image, valid, meta = decode_sample(raw)
        if not isinstance(meta.get("sensor"), str):
            raise DataError(f"{_where(raw)}: metadata sensor {meta.get('sensor')!r} is not a name")
        return [(meta["sensor"], image, valid, list(meta["band_ids"]))]
    views, meta = decode_group(raw)
    return [
        (sensor, *pair, list(meta["sensors"][sensor]["band_ids"]))
        for sensor, pair in views.items()
        if pair is not None
    ]


def load_npy(data: bytes, where: str) -> np.ndarray:
    """The array of one ``.npy`` member, a read-only view of ``data`` (no copy: the reader
    decodes every sample, and ``np.load`` would copy each one). Object arrays are refused.

    Raises:
        DataError: naming ``where`` when the bytes are not a plain-dtype npy array.
    """
    try:
        shape, fortran, dtype, offset = _npy_header(data)
        if any(n < 0 for n in shape):
            raise ValueError(f"negative dimension in shape {shape}")
        # Python ints: a corrupt header's huge dimensions would overflow an int64 product.
        count = math.prod(shape)
        if count * dtype.itemsize > len(data) - offset:
            raise ValueError(
                f"shape {shape} of {dtype} needs {count * dtype.itemsize} bytes, "
                f"{len(data) - offset} are stored"
            )
        array = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    except (ValueError, SyntaxError, tokenize.TokenError) as exc:  # numpy parses with literal_eval
        raise DataError(f"{where} is not a readable npy array: {exc}") from None
    return array.reshape(shape[::-1]).T if fortran else array.reshape(shape)


def _npy_header(data: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran order, dtype, data offset) of npy bytes. Parsed headers are cached by
    their bytes: numpy parses each with ``ast.literal_eval``, which costs more than reading
    the array, and the samples of a shard share a handful of headers."""
    head = bytes(data[:12])
    length = {b"\x01\x00": 10 + int.from_bytes(head[8:10], "little")}.get(head[6:8])
    if length is None and head[6:8] in (b"\x02\x00", b"\x03\x00"):
        length = 12 + int.from_bytes(head[8:12], "little")
    key = bytes(data[: length or 0])
    parsed = _NPY_HEADER_CACHE.get(key)
    if parsed is None:
        buffer = io.BytesIO(bytes(data[: length or 4096]))
        version = np.lib.format.read_magic(buffer)
        if version not in _NPY_HEADERS:
            raise ValueError(f"npy format version {version} is not supported")
        shape, fortran, dtype = _NPY_HEADERS[version](buffer)
        if dtype.hasobject:
            raise ValueError("object arrays are not allowed")
        parsed = (shape, fortran, dtype, buffer.tell())
        if length == buffer.tell() and len(_NPY_HEADER_CACHE) < 1024:
            _NPY_HEADER_CACHE[key] = parsed
    return parsed


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def read_index(folder: str | Path) -> dict:
    """The ``index.json`` of a shard folder; DataError when it is missing or not eoforge's."""
    path = Path(folder) / INDEX_FILE
    if not path.is_file():
        raise DataError(
            f"{folder} has no {INDEX_FILE}; build shards there first: eoforge data build SRC {folder}"
        )
    try:
        index = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise DataError(f"{path} is not JSON ({exc}); rebuild the shards") from None
    kind = index.get("format") if isinstance(index, dict) else type(index).__name__
    if kind != FORMAT:
        raise DataError(f"{path} is not an eoforge shard index (format {kind!r})")
    return index


def list_shards(spec: str | Path | Sequence[str | Path]) -> list[str]:
    """Shard URLs from a shard folder (via its index.json), a brace pattern
    (``out/shard-{000000..000003}.tar``), a ``pipe:`` command that writes one shard to stdout
    (``pipe:aws s3 cp s3://bucket/shard-{000000..000003}.tar -``; braces expand to one command
    per shard, run when the shard is read), a single ``.tar`` path, or a list of any of these."""
    if isinstance(spec, (list, tuple)):
        return [url for item in spec for url in list_shards(item)]
    text = str(spec)
    if not text.startswith(PIPE) and Path(text).is_dir():
        folder = Path(text)
        return [str(folder / row["name"]) for row in read_index(folder)["shards"]]
    urls = list(braceexpand(text))
    missing = [
        u for u in urls if not u.startswith(PIPE) and "://" not in u and not Path(u).is_file()
    ]
    if missing:
        raise DataError(
            f"shard {missing[0]} (from {text!r}) does not exist; pass a shard folder, "
            "a brace pattern such as out/shard-{000000..000003}.tar, a pipe: command, "
            "or a list of .tar files"
        )
    return urls


def shard_sample_counts(urls: Sequence[str]) -> dict[str, int | None]:
    """Samples per shard as recorded in the index.json next to each shard (None where unknown)."""
    counts: dict[str, int | None] = {}
    indexes: dict[Path, dict[str, int]] = {}
    for url in urls:
        folder = Path(url).parent
        if folder not in indexes:
            try:
                rows = read_index(folder)["shards"]
            except (DataError, OSError, ValueError):
                rows = []
            indexes[folder] = {row["name"]: row["samples"] for row in rows}
        counts[url] = indexes[folder].get(Path(url).name)
    return counts


def iter_tar_samples(url: str | Path) -> Iterator[dict]:
    """Raw samples of one shard in file order (``__key__``, ``__url__`` and member bytes): a
    local path, or a ``pipe:`` command whose stdout is the (uncompressed) tar.

    A local shard is memory-mapped, and its ``.npy`` members are read-only memoryviews of the
    map rather than bytes: decoding then copies an array once, from the page cache to where it
    goes, and samples skipped or dropped are never copied at all. Other members are bytes.

    A ``pipe:`` read that fails (the command exits non-zero, or its tar breaks off) is run
    again up to ``PIPE_RETRIES`` times, with pauses doubling from ``PIPE_BACKOFF_S``; a retry
    skips the samples already handed out, so none is given twice.

    Raises:
        DataError: naming the shard, when it is corrupt or truncated, or when its command still
            fails after the retries.
    """
    if os.path.isfile(url):
        yield from _tar_samples(url)
        return
    handed_out = 0
    for attempt in range(PIPE_RETRIES + 1):
        try:
            for n, sample in enumerate(_tar_samples(url)):
                if n >= handed_out:
                    handed_out += 1
                    yield sample
            return
        except (OSError, DataError) as err:
            if attempt == PIPE_RETRIES:
                raise DataError(
                    f"{url}: failed after {PIPE_RETRIES + 1} tries ({_pipe_error(err)})"
                ) from None
            pause = PIPE_BACKOFF_S * 2**attempt
            LOG.warning(f"{url}: {_pipe_error(err)}; trying again in {pause:g} s")
            time.sleep(pause)


def _pipe_error(err: Exception) -> str:
    """A pipe failure in words (webdataset's OSError reads "((cmd,), {...}): exit N (read) {}")."""
    found = re.search(r": exit (-?\d+)", str(err))
    return f"its command exited with status {found.group(1)}" if found else str(err)


def _tar_samples(url: str | Path) -> Iterator[dict]:
    """One read of a shard (``iter_tar_samples`` without the retries)."""
    current: dict | None = None
    if os.path.isfile(url):
        stream: BinaryIO | _MappedFile = _MappedFile(url)
    else:
        stream = gopen(str(url), "rb")
    try:
        for name, data in iter_tar_members(stream, str(url)):
            key, dot, member = name.partition(".")
            if not dot:
                raise DataError(f"{url}: member {name!r} has no extension; not an eoforge shard")
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key, "__url__": str(url)}
            if member in current:
                raise DataError(f"{url}: sample {key} has two {member} members")
            current[member] = data if member.endswith(".npy") else bytes(data)
    finally:
        stream.close()  # a pipe: command stopped early ends with SIGPIPE, which gopen accepts
    if current is not None:
        yield current


class _MappedFile:
    """``read(n)`` over a memory-mapped file, returning memoryviews of the map (no copy). The
    map is released when the last view of it is dropped, so ``close`` only drops this handle."""

    def __init__(self, path: str | Path) -> None:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            self._view = memoryview(
                mmap.mmap(file.fileno(), size, flags=_MAP_FLAGS, prot=mmap.PROT_READ)
                if size
                else b""
            )
        self._pos = 0

    def read(self, n: int) -> memoryview:
        data = self._view[self._pos : self._pos + n]
        self._pos += len(data)
        return data

    def close(self) -> None:
        self._view = memoryview(b"")


def iter_tar_members(stream: BinaryIO, where: str) -> Iterator[tuple[str, bytes]]:
    """``(name, data)`` of each regular file of an uncompressed tar read from ``stream``, in
    file order; ``data`` is what ``stream.read`` returns (bytes, or a memoryview). Headers are parsed by ``tarfile.TarInfo.frombuf`` (checksums checked); pax
    ``path``/``size`` records and GNU long names apply to the member after them. Each payload is
    read with one call: tarfile's stream mode copies it in 10 KiB pieces, about 5x slower.

    Raises:
        DataError: naming ``where`` for a corrupt header, a compressed or truncated tar (one
            that ends without its end-of-archive block, even between members: it would
            otherwise pass for a shard holding fewer samples, or a sample missing members).
    """
    override: dict[str, str] = {}
    while True:
        header = bytes(stream.read(tarfile.BLOCKSIZE))
        if header == _EMPTY_BLOCK:
            return  # the end-of-archive blocks
        if not header:
            raise DataError(
                f"{where} is truncated: it ends without the end-of-archive block of a tar"
            )
        if header[:2] == _GZIP_MAGIC:
            raise DataError(
                f"{where} is gzip-compressed; shards are plain tar: decompress it, or read it "
                f"through a pipe (pipe:gunzip -c {where})"
            )
        if len(header) < tarfile.BLOCKSIZE:
            raise DataError(f"{where} is truncated: it ends inside a tar header")
        name, size, kind = _ustar_header(header) or _any_header(header, where)
        size = int(override.get("size", size))  # _pax_records checked it is a decimal number
        if size < 0:  # a base-256 size field can be negative
            raise DataError(f"{where}: member {name!r} has size {size}; the shard is corrupt")
        data = _read_payload(stream, size) if size else b""
        padding = -size % tarfile.BLOCKSIZE
        if len(data) < size or len(stream.read(padding)) < padding:
            raise DataError(f"{where} is truncated inside member {name!r}")
        if kind == tarfile.XHDTYPE:
            # Python's tarfile writes one per member for its float mtime; only path and size
            # matter here, so records without them are not parsed.
            records = bytes(data)
            override = (
                _pax_records(records, where) if b"path=" in records or b"size=" in records else {}
            )
        elif kind == tarfile.GNUTYPE_LONGNAME:
            override = {"path": bytes(data).rstrip(b"\0").decode("utf-8", "surrogateescape")}
        elif kind == tarfile.XGLTYPE:
            continue  # global pax header: nothing in it concerns member names or sizes
        else:
            name = override.get("path", name)
            override = {}
            if kind in tarfile.REGULAR_TYPES:
                yield name, data


def _read_payload(stream: BinaryIO | _MappedFile, size: int) -> bytes | memoryview:
    """``size`` bytes of ``stream`` (fewer at its end). A pipe's ``read(n)`` allocates ``n``
    bytes first, so a corrupt size field (up to 8 GiB in a ustar header, any number in a pax
    record) would raise MemoryError: large payloads of pipes are read in pieces, and a wrong
    size ends as a truncation error. A mapped file's read allocates nothing."""
    if size <= _PIPE_PIECE or isinstance(stream, _MappedFile):
        return stream.read(size)
    pieces, left = [], size
    while left and (piece := stream.read(min(left, _PIPE_PIECE))):
        pieces.append(piece)
        left -= len(piece)
    return b"".join(pieces)


def _ustar_header(block: bytes) -> tuple[str, int, bytes] | None:
    """(name, size, type) of a POSIX ustar header block with an octal size and a valid unsigned
    checksum (what Python's tarfile, and so WebDataset, writes), parsed directly: ~10x faster
    than ``TarInfo.frombuf``, which costs as much as reading a sample's bytes. None for anything
    else (GNU or v7 headers, base-256 numbers, a bad checksum), which ``_any_header`` handles."""
    if block[257:265] != b"ustar\x0000" or block[124] & 0x80:
        return None
    try:
        checksum = int(block[148:156].strip(b" \0") or b"0", 8)
        size = int(block[124:136].strip(b" \0") or b"0", 8)
    except ValueError:
        return None
    if checksum != sum(block) - sum(block[148:156]) + 8 * 0x20:  # the field counts as spaces
        return None
    name = block[:100].split(b"\0", 1)[0]
    prefix = block[345:500].split(b"\0", 1)[0]
    if prefix:
        name = prefix + b"/" + name
    kind = block[156:157]
    if kind == tarfile.AREGTYPE and name.endswith(b"/"):
        kind = tarfile.DIRTYPE  # tarfile's reading of an old-style directory
    return name.decode("utf-8", "surrogateescape"), size, kind


def _any_header(block: bytes, where: str) -> tuple[str, int, bytes]:
    """(name, size, type) of any tar header block, by ``tarfile``."""
    try:
        info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.HeaderError as exc:
        raise DataError(f"{where}: bad tar header ({exc}); the shard is corrupt") from None
    return info.name, info.size, info.type


def _pax_records(data: bytes, where: str) -> dict[str, str]:
    """The ``key=value`` records of a pax extended header (``"%d %s=%s\\n"``, the length first)."""
    records, pos = {}, 0
    try:
        while pos < len(data) and data[pos] != 0:
            length, _, _ = data[pos : pos + 20].partition(b" ")
            end = pos + int(length)
            # A record holds its length, a space and a newline: a shorter one (0, negative)
            # would never advance ``pos``.
            if not pos + len(length) + 2 <= end <= len(data):
                raise ValueError(f"record length {int(length)} at offset {pos}")
            key, _, value = data[pos + len(length) + 1 : end - 1].partition(b"=")
            records[key.decode("utf-8")] = value.decode("utf-8", "surrogateescape")
            pos = end
        if "size" in records and not re.fullmatch(r"[0-9]+", records["size"]):
            raise ValueError(f"size {records['size']!r}")
    except ValueError as exc:  # UnicodeDecodeError included
        raise DataError(f"{where}: bad pax header ({exc}); the shard is corrupt") from None
    return records
