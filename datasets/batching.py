"""Batches of the reader's sample contract (see ``eoforge.datasets.reader``): ``collate`` of
decoded samples, and ``direct_batch``, which decodes a run of plain single-sensor raw samples
straight into their batch tensors.

Inside a DataLoader worker the batch tensors are allocated in shared memory, as torch's own
``default_collate`` does: the worker hands a batch to the main process through shared memory,
and a tensor already there is passed by handle instead of being copied once more.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import get_worker_info

from eoforge.datasets.errors import DataError
from eoforge.datasets.sensors import SENSORS
from eoforge.datasets.shards import IMAGE, META, decode_arrays, is_group
from eoforge.datasets.stats import Normaliser


def direct_batch(
    raws: Sequence[dict], normaliser: Normaliser, buffers: BufferRing | None = None
) -> dict | None:
    """The batch of raw single-sensor samples (member name -> bytes) that share one sensor, band
    set and size, built without building the samples, and not yet normalised: its view holds
    ``image`` in the stored dtype, ``affine`` ([4, C], ``Normaliser.affine``) and ``partial``
    ([B] bool: the samples with invalid pixels), and ``finish_batch`` turns it into ``collate`` of the samples' ``to_sample``. The worker thus
    hands over half the bytes of float32 and leaves the arithmetic to where the batch is used
    (on a GPU it costs nothing; on a CPU it runs in the training process).

    Args:
        raws: the samples.
        normaliser: gives the bands' affine maps.
        buffers: where the image and mask tensors come from (default: fresh tensors).

    Returns:
        The unfinished batch, or None when the samples do not qualify (group samples, several
        sensors, band sets, sizes or stored dtypes): ``collate`` handles those.
    """
    decoded = []
    for raw in raws:
        if IMAGE not in raw or META not in raw:
            return None
        meta = json.loads(raw[META])
        if is_group(meta):
            return None
        # valid is None where True everywhere: its slot of the mask is then filled, not copied.
        decoded.append((*decode_arrays(raw), meta))
    image0, _, first = decoded[0]
    band_ids = list(first["band_ids"])
    for image, _, meta in decoded[1:]:
        if (image.shape, image.dtype, meta["sensor"], meta["band_ids"]) != (
            image0.shape,
            image0.dtype,
            first["sensor"],
            band_ids,
        ):
            return None
    shape = (len(raws), *image0.shape)  # [B, C, H, W]
    dtype = torch.from_numpy(np.empty(0, image0.dtype)).dtype
    take = buffers.take if buffers is not None else shared_empty
    images, valids = take(shape, dtype), take(shape, torch.bool)
    out, mask = images.numpy(), valids.numpy()
    partial = []
    for i, (image, valid, _) in enumerate(decoded):
        out[i] = image
        mask[i] = True if valid is None else valid
        partial.append(valid is not None and not valid.all())
    metas = [meta for _, _, meta in decoded]
    # Small fields travel as numpy arrays, pickled inline: a DataLoader worker hands every
    # tensor over through a shared-memory segment of its own, which costs more than the data.
    # finish_batch makes them tensors.
    view = {
        "image": images,
        "valid": valids,
        "affine": normaliser.affine(band_ids),  # [4, C]
        "partial": np.array(partial),  # [B] samples with invalid pixels
        "band_ids": band_ids,
        "wavelengths": np.array([m["wavelengths"] for m in metas], dtype=np.float32),  # [B, C]
        "bandwidths": np.array([m["bandwidths"] for m in metas], dtype=np.float32),  # [B, C]
        "gsd": np.array([float(m["gsd"]) for m in metas], dtype=np.float32),  # [B]
    }
    if all(m.get("time") is not None for m in metas):
        view["time"] = np.array([int(m["time"]) for m in metas], dtype=np.int64)  # [B]
    return {
        first["sensor"]: view,
        "meta": {
            "id": [m["id"] for m in metas],
            "source": [m["source"] for m in metas],
            "shard": [raw.get("__url__", "") for raw in raws],
            "crs": [m["crs"] for m in metas],
            "bounds": [list(m["bounds"]) for m in metas],
        },
    }


SMALL_FIELDS = ("wavelengths", "bandwidths", "gsd", "time")


def finish_batch(
    batch: dict, device: torch.device | str | None = None, keep: deque | None = None
) -> dict:
    """Normalise the views ``direct_batch`` left in their stored dtype (in place), after moving
    their image and mask to ``device`` when one is given; other views are left as they are.
    The arithmetic is ``Normaliser.normalise_into``'s, in the same order, so the result equals
    ``collate`` of ``to_sample``.

    ``keep`` (a bounded deque) receives the stored tensors after the copy: holding them keeps a
    worker's reused shared buffers mapped in this process, and torch then hands the same mapping
    back with the next batch in that buffer; mapped anew, every 4 KiB page faults in again,
    which costs several times the normalisation.
    """
    for sensor in sensors_of(batch):
        view = batch[sensor]
        affine, partial = view.pop("affine", None), view.pop("partial", None)
        if affine is None:
            continue
        for field in SMALL_FIELDS:
            if field in view:
                view[field] = torch.from_numpy(view[field])
        affine = torch.from_numpy(affine)
        image, valid = view["image"], view["valid"]
        if keep is not None:
            keep.append((image, valid))
        # Copies (to the device, or a clone): the stored tensors may be a worker's reused buffers.
        if device is not None:
            image = image.to(device, non_blocking=True)
            valid = valid.to(device, non_blocking=True, copy=True)
        else:
            valid = valid.clone()
        low, high, gain, offset = affine.to(image.device)[:, :, None, None]  # each [C, 1, 1]
        normalised = torch.empty(image.shape, dtype=torch.float32, device=image.device)
        # On a CPU one sample at a time, so that the passes after the first find it in cache;
        # on a GPU the whole batch at once.
        rows = range(len(image)) if image.device.type == "cpu" else [slice(None)]
        zero = normalised.new_zeros(())
        for i in rows:
            out = normalised[i]  # [(B,) C, H, W]
            out.copy_(image[i])
            # maximum/minimum rather than clamp_: clamp_ with tensor bounds is ~10x slower on CPU.
            torch.maximum(out, low, out=out)
            torch.minimum(out, high, out=out)
            out.mul_(gain).sub_(offset)
            if partial[i].any():  # a host tensor: no device sync
                torch.where(valid[i], out, zero, out=out)
        view["image"], view["valid"] = normalised, valid
    return batch


class BufferRing:
    """Batch tensors reused in turn by one process: ``take`` hands out, per shape and dtype, each
    of ``size`` tensors again after ``size - 1`` others of that shape and dtype.

    A DataLoader worker hands a batch to the main process through shared memory, and a fresh
    shared tensor costs a page fault per 4 KiB page on both sides, several times the cost of
    decoding into it. Reuse is safe when every consumer copies out of a batch (``finish_batch``
    does) before asking for ``size - 1`` further ones: a worker is at most ``prefetch_factor``
    batches ahead of the consumer.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._rings: dict[tuple, deque[torch.Tensor]] = {}

    def take(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        ring = self._rings.setdefault((tuple(shape), dtype), deque())
        if len(ring) < self.size:
            ring.append(shared_empty(shape, dtype))
        else:
            ring.rotate(-1)
        return ring[-1]


def shared_empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor, in shared memory when called inside a DataLoader worker."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(math.prod(shape))
    return torch.empty(0, dtype=dtype).new(storage).view(*shape)


def _stacked(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.stack`` into a ``shared_empty`` tensor."""
    out = shared_empty((len(tensors), *tensors[0].shape), tensors[0].dtype)
    return torch.stack(list(tensors), out=out)


def sensors_of(sample: dict) -> list[str]:
    """The sensor entries of a sample or batch, in their order."""
    return [k for k in sample if k != "meta"]


def sensor_of(sample: dict) -> str:
    """The sensor entry of a single-sensor sample or batch."""
    (sensor,) = sensors_of(sample)
    return sensor


def batch_key(sample: dict) -> tuple:
    """What a batch must share: (sensor, H, W) for a single-sensor sample (its band set may
    differ, see ``collate``); for a time series (sensor, band_ids, T, H, W); for several
    sensors, one such tuple per sensor with its band_ids."""
    sensors = sensors_of(sample)
    view = sample[sensors[0]]
    if len(sensors) == 1 and view["image"].ndim == 3:
        return (sensors[0], *view["image"].shape[-2:])
    keys = tuple(
        (sensor, tuple(view["band_ids"]), *view["image"].shape[:-3], *view["image"].shape[-2:])
        for sensor, view in ((s, sample[s]) for s in sensors)
    )
    return keys[0] if len(keys) == 1 else keys


def collate(samples: Sequence[dict]) -> dict:
    """Samples sharing a ``batch_key`` -> the batch contract (module docstring); single-sensor
    samples with different band sets are put on the union of their bands (``pad_bands``)."""
    keys = {batch_key(s) for s in samples}
    if len(keys) != 1:
        raise DataError(f"cannot batch samples of different sensors/bands/sizes: {sorted(keys)}")
    sensors = sensors_of(samples[0])
    views = {sensor: [s[sensor] for s in samples] for sensor in sensors}
    if len(sensors) == 1 and len({tuple(v["band_ids"]) for v in views[sensors[0]]}) > 1:
        views[sensors[0]] = pad_bands(sensors[0], views[sensors[0]])
    batch = {sensor: _stack(views[sensor]) for sensor in sensors}
    batch["meta"] = {
        field: [s["meta"][field] for s in samples]
        for field in ("id", "source", "shard", "crs", "bounds")
    }
    return batch


def pad_bands(sensor: str, views: Sequence[dict]) -> list[dict]:
    """Single-sensor views ([C, H, W]) on the union of their band sets, in the sensor's registry
    order (bands unknown to the registry after, in order of appearance): a view's absent bands
    are zeros with ``valid`` False and carry the wavelength/bandwidth of the views that have them.
    """
    rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for view in views:
        for c, band_id in enumerate(view["band_ids"]):
            rows.setdefault(band_id, (view["wavelengths"][c], view["bandwidths"][c]))
    registry = [b.band_id for b in SENSORS[sensor].bands] if sensor in SENSORS else []
    known = [b for b in registry if b in rows]
    union = known + [b for b in rows if b not in known]
    wavelengths = torch.stack([rows[b][0] for b in union])  # [C]
    bandwidths = torch.stack([rows[b][1] for b in union])  # [C]
    padded = []
    for view in views:
        index = torch.tensor([union.index(b) for b in view["band_ids"]])
        image = view["image"].new_zeros((len(union), *view["image"].shape[-2:]))  # [C, H, W]
        valid = torch.zeros(image.shape, dtype=torch.bool)
        image[index], valid[index] = view["image"], view["valid"]
        padded.append(
            view
            | {
                "image": image,
                "valid": valid,
                "band_ids": list(union),
                "wavelengths": wavelengths,
                "bandwidths": bandwidths,
            }
        )
    return padded


def _stack(views: Sequence[dict]) -> dict:
    """One sensor's views of B samples -> its batch view."""
    batch = {
        "image": _stacked([v["image"] for v in views]),
        "valid": _stacked([v["valid"] for v in views]),
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
