"""Per-patch embeddings of a (large) GeoTIFF: one georeferenced pixel per encoder patch.

The file is read tile by tile (windowed reads; never whole). Each tile is cut into square
``window`` x ``window`` pixel crops on a grid anchored at the file's top-left corner, and every crop
goes through the encoder on its own: a patch's embedding sees the crop around it, so the result
does not depend on the tile size, which only sets how much is read at a time.

Normalisation follows the release card, per band: clip to [p1, p99] where the card says ``clip``
(the default), scale [p1, p99] to [0, 1], then subtract ``mean`` and divide by ``std``.

Nodata. A pixel is invalid where it equals the file's nodata (or, if the file declares none, the
registered nodata of the band's sensor, e.g. 0 for Sentinel-2), or is NaN or infinite. Invalid
pixels enter the encoder as 0 after normalisation, as in the training data (where the normalised
value of an invalid pixel is 0). Pixels past the right and bottom edges, which fill the last
crops, are treated the same way. A patch with no valid pixel in any band is written as NaN, the
output's nodata; a patch with some valid pixels is embedded.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.transform import Affine
from rasterio.windows import Window
from tqdm.auto import tqdm

from eoforge.datasets.errors import DataError
from eoforge.datasets.sensors import get_band, get_sensor
from eoforge.finetune.features import autocast_on, resolve_device
from eoforge.models import load_release, verify_release
from eoforge.models.release import Release

WINDOW_PATCHES = 16  # default crop side, in patches
TILE_WINDOWS = 8  # default tile side, in crops


def file_band_ids(
    path: str | Path,
    count: int,
    descriptions: Sequence[str | None],
    *,
    sensor: str | None = None,
    bands: Sequence[str] | None = None,
    known: Sequence[str] = (),
) -> list[str]:
    """The band_id of each of a file's ``count`` bands, in file order.

    Args:
        path: the file (for messages).
        count, descriptions: the file's band count and band descriptions.
        sensor: a registered sensor; its band names (and aliases) name the bands in the file's
            descriptions, else, when the file holds them all, its canonical band order.
        bands: the file's bands in file order, as band_ids (``"S2L2A:B02"``) or, with
            ``sensor``, band names (``"B2"``); ids outside the registry are accepted where the
            release card (``known``) lists them.
        known: the release card's band_ids.

    Raises:
        DataError: naming the band that cannot be mapped, or the file when neither ``bands`` nor
            ``sensor`` says what its bands are.
    """
    if bands is not None:
        if len(bands) != count:
            raise DataError(
                f"{path} has {count} bands but {len(bands)} band ids were given; give one per "
                "band, in file order"
            )
        return [_resolve(band, sensor, known, path) for band in bands]
    if sensor is None:
        raise DataError(f"{path}: pass sensor= (a registered sensor) or bands= (ids in file order)")
    registered = get_sensor(sensor)
    described = [registered.find(d) if d else None for d in descriptions]
    if all(described):
        return [b.band_id for b in described]
    if count == len(registered.bands):
        return [b.band_id for b in registered.bands]
    unnamed = next(i for i, b in enumerate(described) if b is None)
    raise DataError(
        f"{path}: band {unnamed + 1} (description {descriptions[unnamed]!r}) is no band of "
        f"{registered.name}, and the file's {count} bands are not {registered.name}'s "
        f"{len(registered.bands)}; pass bands= with the file's band ids in file order"
    )


def _resolve(band: str, sensor: str | None, known: Sequence[str], path) -> str:
    band_id = band if ":" in band or sensor is None else f"{sensor}:{band}"
    if band_id in known:
        return band_id
    try:
        return get_band(band_id).band_id
    except DataError as exc:
        raise DataError(f"{path}: cannot map band {band!r} to a band id: {exc}") from exc


def normalise_tile(
    raw: np.ndarray, valid: np.ndarray, band_ids: Sequence[str], normalisation: dict
) -> np.ndarray:
    """Raw values [C, H, W] -> float32 normalised per the card, invalid pixels 0."""
    out = np.empty(raw.shape, dtype=np.float32)
    for c, band_id in enumerate(band_ids):
        row = normalisation[band_id]
        x = raw[c].astype(np.float64)
        if row.get("clip", True):
            x = np.clip(x, row["p1"], row["p99"])
        span = row["p99"] - row["p1"]
        x = (x - row["p1"]) / span if span > 0 else np.zeros_like(x)
        out[c] = (x - row["mean"]) / (row["std"] if row["std"] > 0 else 1.0)
    out[~valid] = 0.0
    return out


@torch.no_grad()
def patch_embeddings(
    encoder: torch.nn.Module, images: torch.Tensor, band_ids: Sequence[str], wavelengths
) -> torch.Tensor:
    """images [B, C, H, W] -> one embedding per patch [B, H/p, W/p, D].

    A ViT gives its patch tokens (the mean over a patch's tokens where the tokenizer makes
    several, e.g. one per channel group); LESS its per-position summaries.
    """
    grid_h, grid_w = images.shape[-2] // encoder.patch_size, images.shape[-1] // encoder.patch_size
    out = encoder.forward_features(images, band_ids, wavelengths)
    if isinstance(out, dict):  # LESS: per-position summaries [B, N, D]
        tokens = out["positions"]
    else:
        per_patch = encoder.patch_embed.tokens_per_patch
        tokens = out[:, 1:].unflatten(1, (per_patch, grid_h * grid_w)).mean(1)  # [B, N, D]
    return tokens.reshape(images.shape[0], grid_h, grid_w, -1)


def _release(release: Release | str | Path, card: dict, file_bands: list[str], path) -> Release:
    """The release serving the file's bands it knows; warns naming those it leaves out."""
    known = [b["band_id"] for b in card["bands"]]
    unused = [b for b in file_bands if b not in known]
    if unused:
        warnings.warn(
            f"{path}: band(s) {', '.join(unused)} are not in the release; they are not used",
            stacklevel=3,
        )
    if isinstance(release, Release):
        absent = [b for b in release.band_ids if b not in file_bands]
        if absent:
            raise DataError(f"{path} lacks band {absent[0]} of the loaded release")
        return release
    used = [b for b in file_bands if b in known]
    if not used:
        raise DataError(f"{path}: none of its bands ({', '.join(file_bands)}) is in the release")
    absent = [b for b in known if b not in used]
    if absent:
        warnings.warn(
            f"{path} lacks release band(s) {', '.join(absent)}; embedding with the "
            f"{len(used)} it has",
            stacklevel=3,
        )
    return load_release(release, bands=used)


def _nodata(ds, band_ids: Sequence[str]) -> float | None:
    if ds.nodata is not None:
        return ds.nodata
    try:
        return get_sensor(band_ids[0].partition(":")[0]).nodata
    except DataError:  # a band outside the registry (accepted from the card): no default
        return None


def embed_geotiff(
    release: Release | str | Path,
    src: str | Path,
    out: str | Path,
    *,
    sensor: str | None = None,
    bands: Sequence[str] | None = None,
    window: int | None = None,
    tile: int | None = None,
    batch_size: int = 16,
    device: str | None = None,
    progress: bool = True,
) -> Path:
    """Write a GeoTIFF of per-patch embeddings of ``src``.

    Args:
        release: a release folder, or a loaded ``Release`` (its bands must all be in the file).
            From a folder, the encoder is loaded with the file's bands that its card lists.
        src: a multi-band GeoTIFF.
        out: the embeddings GeoTIFF to write: float32, D bands, ceil(H/p) x ceil(W/p) pixels
            (p the patch size), the source transform scaled by p, the source CRS, nodata NaN.
        sensor, bands: how the file's bands map to band_ids (see ``file_band_ids``).
        window: side in pixels of the crops the encoder sees (a multiple of p; default 16 p).
        tile: side in pixels of each windowed read (a multiple of ``window``; default
            8 windows); it does not change the result.
        batch_size: crops per forward pass.
        device: where the encoder runs (``features.resolve_device``: default CUDA when present;
            bf16 autocast on CUDA, fp32 on the CPU).
        progress: show a tqdm bar over tiles.

    Returns:
        ``out``.

    Raises:
        DataError: naming a band of the file that cannot be mapped, or the file.
        ValueError: naming ``window`` or ``tile`` when they do not fit the patch size.
    """
    src, out = Path(src), Path(out)
    with rasterio.open(src) as ds:
        card = release.card if isinstance(release, Release) else verify_release(release)
        file_bands = file_band_ids(
            src,
            ds.count,
            ds.descriptions,
            sensor=sensor,
            bands=bands,
            known=[b["band_id"] for b in card["bands"]],
        )
        if len(set(file_bands)) != len(file_bands):
            raise DataError(f"{src}: a band id appears twice among {file_bands}")
        loaded = _release(release, card, file_bands, src)
        encoder, p = loaded.encoder.eval(), loaded.encoder.patch_size
        encoder.to(resolve_device(device))
        window = window or WINDOW_PATCHES * p
        tile = tile or TILE_WINDOWS * window
        if window % p:
            raise ValueError(f"window={window} is not a multiple of the patch size {p}")
        if tile % window:
            raise ValueError(f"tile={tile} is not a multiple of window={window}")
        indexes = [file_bands.index(b) + 1 for b in loaded.band_ids]  # 1-based, release order
        nodata = _nodata(ds, loaded.band_ids)
        profile = {
            "driver": "GTiff",
            "height": math.ceil(ds.height / p),
            "width": math.ceil(ds.width / p),
            "count": encoder.embed_dim,
            "dtype": "float32",
            "crs": ds.crs,
            "transform": ds.transform @ Affine.scale(p),
            "nodata": float("nan"),
            "compress": "deflate",
            "BIGTIFF": "IF_SAFER",
        }
        device = next(encoder.parameters()).device
        wavelengths = loaded.wavelengths.to(device)
        tiles = [(r, c) for r in range(0, ds.height, tile) for c in range(0, ds.width, tile)]
        out.parent.mkdir(parents=True, exist_ok=True)
        with rasterio.open(out, "w", **profile) as dst:
            dst.update_tags(
                release=str(loaded.path), bands=",".join(loaded.band_ids), window=str(window)
            )
            for row, col in tqdm(tiles, desc=f"embed {src.name}", disable=not progress):
                h, w = min(tile, ds.height - row), min(tile, ds.width - col)
                raw = ds.read(indexes, window=Window(col, row, w, h))  # [C, h, w]
                valid = np.isfinite(raw) if raw.dtype.kind == "f" else np.ones(raw.shape, bool)
                if nodata is not None and not math.isnan(nodata):
                    valid &= raw != nodata
                image = normalise_tile(raw, valid, loaded.band_ids, loaded.normalisation)
                emb = _embed_tile(encoder, image, valid, loaded, wavelengths, window, batch_size)
                dst.write(emb, window=Window(col // p, row // p, emb.shape[2], emb.shape[1]))
    return out


def _embed_tile(encoder, image, valid, loaded, wavelengths, window, batch_size) -> np.ndarray:
    """A normalised tile [C, h, w] -> embeddings [D, ceil(h/p), ceil(w/p)], NaN where no pixel
    of a patch is valid."""
    p, (channels, h, w) = encoder.patch_size, image.shape
    rows, cols = math.ceil(h / window), math.ceil(w / window)
    padded = np.zeros((channels, rows * window, cols * window), dtype=np.float32)
    padded[:, :h, :w] = image
    crops = torch.from_numpy(padded).unflatten(1, (rows, window)).unflatten(3, (cols, window))
    crops = crops.permute(1, 3, 0, 2, 4).reshape(rows * cols, channels, window, window)
    device = next(encoder.parameters()).device
    with autocast_on(device):
        parts = [
            patch_embeddings(
                encoder, crops[i : i + batch_size].to(device), loaded.band_ids, wavelengths
            )
            for i in range(0, len(crops), batch_size)
        ]  # each [b, window/p, window/p, D]
    grid = window // p
    emb = torch.cat(parts).float().cpu().reshape(rows, cols, grid, grid, -1)
    emb = emb.permute(4, 0, 2, 1, 3).reshape(-1, rows * grid, cols * grid)  # [D, H/p, W/p]
    out_h, out_w = math.ceil(h / p), math.ceil(w / p)
    emb = emb[:, :out_h, :out_w].numpy()
    any_valid = np.zeros((channels, out_h * p, out_w * p), dtype=bool)
    any_valid[:, :h, :w] = valid
    any_valid = any_valid.reshape(channels, out_h, p, out_w, p).any(axis=(0, 2, 4))
    emb[:, ~any_valid] = np.nan
    return emb
