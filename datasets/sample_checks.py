"""Why a raw shard sample cannot be trained on: the reader skips such a sample, counts it under
its reason and logs its shard and key (``eoforge.datasets.reader``).

The checks are cheap: arrays are read-only views of the shard bytes (``shards.load_npy``), and
integer data is never converted (it cannot hold NaN/Inf). Reasons (the first that applies):

* ``undecodable``: a member is missing or unreadable (bad npy bytes, bad JSON, metadata without
  a field the batch needs, an image dtype the format does not store, a valid mask that is not
  bool or not the image's shape): what the shard decoders would refuse while building a batch.
* ``band_count``: an array's band count differs from its metadata's ``band_ids`` (or
  ``wavelengths``, ``bandwidths``); in a group sample also a view whose shape differs from the
  ``shape`` its metadata records (the shape an absent view takes, so the group's views would not
  batch) or whose grid differs from the other views'.
* ``non_finite``: NaN or +-Inf at a pixel marked valid, that is, where the stored mask is True,
  or anywhere when no mask is stored (``shards.encode_sample`` stores none when every pixel is
  valid). eoforge's writers put NaN only where they mark a pixel invalid, so such a value means
  the bytes are not what was written. Float arrays only.
* ``all_nodata``: no valid pixel at all (every view absent or fully masked).

``truncated_shard`` is the reason of a whole shard that breaks off (truncated or corrupt tar);
the reader counts it once per read of that shard.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from eoforge.datasets.errors import DataError
from eoforge.datasets.shards import (
    IMAGE,
    VALID,
    check_image,
    check_mask,
    group_member,
    is_group,
    load_meta,
    load_npy,
)

UNDECODABLE = "undecodable"
BAND_COUNT = "band_count"
NON_FINITE = "non_finite"
ALL_NODATA = "all_nodata"
TRUNCATED_SHARD = "truncated_shard"
REASONS = (UNDECODABLE, BAND_COUNT, NON_FINITE, ALL_NODATA, TRUNCATED_SHARD)

# Metadata fields that building a batch reads (reader.to_sample, batching.direct_batch).
SAMPLE_FIELDS = (
    "id",
    "sensor",
    "band_ids",
    "wavelengths",
    "bandwidths",
    "gsd",
    "crs",
    "bounds",
    "source",
)
GROUP_FIELDS = ("id", "crs", "bounds", "source", "sensors")
VIEW_FIELDS = ("present", "shape", "band_ids", "wavelengths", "bandwidths", "gsd")
BAND_FIELDS = ("band_ids", "wavelengths", "bandwidths")
# DataError: what the shard decoders refuse; ValueError: bad JSON or UTF-8; the others: metadata
# of the wrong JSON type (a list where an object belongs, a number for band_ids) or nested
# beyond the parser's depth, and npy headers that are no Python literal.
DECODE_ERRORS = (
    DataError,
    ValueError,
    KeyError,
    TypeError,
    AttributeError,
    RecursionError,
    SyntaxError,
)


class Problem(NamedTuple):
    """Why a sample is skipped: one of ``REASONS`` and a sentence for the log."""

    reason: str
    detail: str


class _View(NamedTuple):
    name: str  # for messages: "sensor S1GRD" in a group sample, "image" otherwise
    image: np.ndarray  # [C, H, W] or [T, C, H, W], stored dtype
    mask: np.ndarray | None  # the stored valid mask; None where none is stored
    row: dict  # the metadata holding its band_ids, wavelengths and bandwidths
    shape: list | None  # the shape a group view's metadata records; None for a plain sample


def sample_problem(raw: dict) -> Problem | None:
    """What makes a raw sample (member name -> bytes) unusable, or None for a good sample.

    Args:
        raw: one sample as ``shards.iter_tar_samples`` gives it, single-sensor or group.

    Returns:
        ``Problem(reason, detail)`` with the first reason that applies (module docstring).
    """
    try:
        views, problem = _views(raw)
        for view in views if problem is None else ():
            problem = problem or _band_count(view)
    except DECODE_ERRORS as err:
        return Problem(UNDECODABLE, f"cannot decode it: {type(err).__name__}: {err}")
    if problem is not None:
        return problem
    grids = {view.image.shape[-2:] for view in views}
    if len(grids) > 1:
        return Problem(BAND_COUNT, f"its views lie on different grids {sorted(grids)}")
    for view in views:
        problem = _non_finite(view)
        if problem is not None:
            return problem
    if not any(view.image.size and (view.mask is None or view.mask.any()) for view in views):
        return Problem(ALL_NODATA, "it has no valid pixel")
    return None


def bad_reason(raw: dict) -> str | None:
    """The reason (one of ``REASONS``) a raw sample is unusable, or None (``sample_problem``)."""
    problem = sample_problem(raw)
    return None if problem is None else problem.reason


def _views(raw: dict) -> tuple[list[_View], Problem | None]:
    """The arrays of every view present, or the problem found while decoding them (the shard
    decoders' own checks raise DataError: an undecodable sample)."""
    meta = load_meta(raw)
    if not is_group(meta):
        missing = [f for f in SAMPLE_FIELDS if f not in meta]
        if missing:
            return [], Problem(UNDECODABLE, f"its metadata lacks {', '.join(missing)}")
        if IMAGE not in raw:
            return [], Problem(UNDECODABLE, f"it has no .{IMAGE} member")
        image = load_npy(raw[IMAGE], f".{IMAGE}")
        check_image(image, (3,), f".{IMAGE}")
        mask = load_npy(raw[VALID], f".{VALID}") if VALID in raw else None
        if mask is not None:
            check_mask(mask, image, f".{VALID}")
        return [_View("image", image, mask, meta, None)], None
    missing = [f for f in GROUP_FIELDS if f not in meta]
    if missing:
        return [], Problem(UNDECODABLE, f"its metadata lacks {', '.join(missing)}")
    members = {name.lower(): value for name, value in raw.items()}  # WebDataset lower-cases
    views = []
    for sensor, row in meta["sensors"].items():
        missing = [f for f in VIEW_FIELDS if f not in row]
        if missing:
            return [], Problem(UNDECODABLE, f"sensor {sensor}'s metadata lacks {missing}")
        if not row["present"]:
            continue
        name, mask_name = group_member(sensor, IMAGE), group_member(sensor, VALID)
        if name not in members:
            return [], Problem(UNDECODABLE, f"sensor {sensor} is present but has no .{name}")
        image = load_npy(members[name], f".{name}")
        check_image(image, (3, 4), f"sensor {sensor}")
        mask = load_npy(members[mask_name], f".{mask_name}") if mask_name in members else None
        if mask is not None:
            check_mask(mask, image, f"sensor {sensor}")
        views.append(_View(f"sensor {sensor}", image, mask, row, list(row["shape"])))
    return views, None


def _band_count(view: _View) -> Problem | None:
    channels = view.image.shape[-3]
    if not isinstance(view.row["band_ids"], list):
        return Problem(UNDECODABLE, f"{view.name}'s band_ids {view.row['band_ids']!r} is no list")
    for field in BAND_FIELDS:
        if len(view.row[field]) != channels:
            return Problem(
                BAND_COUNT,
                f"{view.name} has {channels} bands but its metadata {len(view.row[field])} {field}",
            )
    if view.shape is not None and list(view.image.shape) != view.shape:
        return Problem(
            BAND_COUNT, f"{view.name} has shape {view.image.shape} but its metadata {view.shape}"
        )
    return None


def _non_finite(view: _View) -> Problem | None:
    if view.image.dtype.kind != "f":
        return None  # integers hold no NaN/Inf: no pass over the data
    bad = ~np.isfinite(view.image)
    if view.mask is not None:
        bad &= view.mask
    count = int(np.count_nonzero(bad))
    if not count:
        return None
    return Problem(NON_FINITE, f"{view.name} has {count} NaN/Inf values at pixels marked valid")
