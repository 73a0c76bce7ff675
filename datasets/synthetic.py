"""Synthetic multi-sensor scenes for the embedded demo, written as real GeoTIFFs.

Every scene is a landscape of vegetation, bare soil and water: parcels (Voronoi cells, sharp
edges) with one dominant cover, smooth within-parcel variation, and a meandering river. Optical
pixels are linear mixtures of three endmember reflectance spectra interpolated to each band's
centre wavelength (from the sensor registry); SAR pixels mix per-cover backscatter and carry
multiplicative speckle. Everything is a deterministic function of ``seed``.

Layout written under ``root`` (one folder per sensor, ready for ``build_shards``):

* ``S2L2A/<scene>/<scene>_<band>.tif``: 12 single-band uint16 files at their native 10/20/60 m
  (reflectance x 10000, nodata 0, a small nodata patch per scene), EPSG:32633.
* ``S1GRD/<scene>/<scene>_{VV,VH}.tif``: float32 sigma0 in dB at 10 m, co-located with the S2
  scene of the same number.
* ``ENMAP/<scene>/<scene>-SPECTRAL_IMAGE.TIF``: one 224-band int16 file at 30 m (reflectance
  x 10000, nodata -32768 in one corner), EPSG:32618.

Scene folder names carry an acquisition stamp (``YYYYMMDDTHHMMSS``) that ingestion parses.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine

from eoforge.datasets.errors import DataError
from eoforge.datasets.sensors import get_sensor

DEMO_SENSORS = ("S2L2A", "S1GRD", "ENMAP")
COVERS = ("vegetation", "soil", "water")

# Endmember reflectance (0-1) at anchor wavelengths: green vegetation with its red edge and
# leaf-water absorptions, a bright dry soil, clear water absorbing beyond the red. Shapes follow
# typical library spectra; the numbers are rounded illustrations, not measurements.
# fmt: off
ANCHORS_NM = (400, 450, 500, 550, 600, 650, 680, 700, 720, 750, 800, 900, 1000, 1100, 1200, 1350,
              1450, 1550, 1650, 1800, 1950, 2100, 2200, 2350, 2500)
ENDMEMBERS = (  # vegetation, soil, water
    (.03, .035, .045, .10, .07, .045, .035, .08, .20, .38, .45, .47, .46, .44, .40, .30, .14, .26,
     .30, .24, .07, .12, .16, .11, .06),
    (.07, .09, .12, .15, .19, .22, .235, .245, .255, .265, .28, .30, .31, .32, .33, .32, .27, .35,
     .37, .36, .25, .33, .31, .29, .26),
    (.07, .07, .06, .05, .03, .02, .018, .015, .012, .01, .008, .005, .004, .003, .003, .002, .002,
     .002, .002, .002, .002, .002, .002, .002, .002),
)
# fmt: on
SAR_DB = (("VV", (-9.0, -13.0, -22.0)), ("VH", (-15.0, -20.0, -28.0)))  # per cover, typical C band
SPECKLE_LOOKS = 4.0
S2_RESOLUTIONS = (10.0, 20.0, 60.0)
ENMAP_GSD = 30.0
S2_START = datetime(2023, 5, 1, 10, 30, 21, tzinfo=UTC)
ENMAP_START = datetime(2023, 6, 1, 16, 24, 38, tzinfo=UTC)


def write_demo_scenes(
    root: str | Path, *, n_scenes: int = 6, size: int = 64, seed: int = 0
) -> dict[str, Path]:
    """Write ``n_scenes`` scenes per demo sensor (S2L2A, S1GRD, ENMAP) under ``root``.

    Args:
        root: output folder (created; existing files of the same names are replaced).
        n_scenes: scenes per sensor.
        size: scene side in pixels at the scene's finest resolution (10 m for S2/S1, 30 m for
            EnMAP); even sizes keep the 20 m bands exactly aligned.
        seed: everything written is a function of it.

    Returns:
        ``{sensor name: folder}`` to hand to ``build_shards`` with that sensor.
    """
    if n_scenes < 1 or size < 8:
        raise DataError(f"need n_scenes >= 1 and size >= 8 pixels, got {n_scenes} and {size}")
    root = Path(root)
    folders = {name: root / name for name in DEMO_SENSORS}
    for i in range(n_scenes):
        rng = np.random.default_rng([seed, i])
        _write_s2_s1(folders["S2L2A"], folders["S1GRD"], i, size, rng)
        _write_enmap(folders["ENMAP"], i, size, rng)
    return folders


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Gaussian random field with correlation length ``scale`` pixels, zero mean, unit std."""
    noise = rng.standard_normal(shape)
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    kernel = np.exp(-2.0 * (math.pi * scale) ** 2 * (fy**2 + fx**2))
    field = np.fft.irfft2(np.fft.rfft2(noise) * kernel, s=shape)
    return (field - field.mean()) / (field.std() + 1e-12)


def landscape(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Cover fractions [3 (vegetation, soil, water), H, W], summing to 1 per pixel."""
    yy, xx = np.mgrid[0:height, 0:width].astype(float)
    n_parcels = int(rng.integers(8, 16))
    centres = rng.uniform((0, 0), (height, width), size=(n_parcels, 2))
    parcel = (
        (yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None, None]) ** 2
    ).argmin(axis=0)  # [H, W]
    dominant = rng.choice(2, size=n_parcels, p=(0.6, 0.4))  # vegetation or soil per parcel
    logits = 3.0 * np.eye(3)[dominant[parcel]].transpose(2, 0, 1)  # [3, H, W]
    logits += np.stack([smooth_noise(rng, (height, width), height / 10) for _ in COVERS])
    centre = height * rng.uniform(0.25, 0.75) + height / 8 * np.sin(
        2 * math.pi * xx / (width * rng.uniform(0.6, 1.2)) + rng.uniform(0, 2 * math.pi)
    )
    river = np.exp(-(((yy - centre) / max(1.5, height / 40)) ** 2))
    logits[2] += 9.0 * river - 3.0
    weights = np.exp(1.5 * (logits - logits.max(axis=0)))
    return weights / weights.sum(axis=0)


def reflectance(fractions: np.ndarray, wavelengths_nm: np.ndarray) -> np.ndarray:
    """Linear mixture [C, H, W] of the endmembers at the given band centres."""
    spectra = np.stack(
        [np.interp(wavelengths_nm, ANCHORS_NM, e) for e in ENDMEMBERS], axis=1
    )  # [C, 3]
    return np.einsum("ck,khw->chw", spectra, fractions)


def _block_mean(array: np.ndarray, factor: int) -> np.ndarray:
    h, w = array.shape[-2] // factor, array.shape[-1] // factor
    return (
        array[..., : h * factor, : w * factor]
        .reshape(*array.shape[:-2], h, factor, w, factor)
        .mean(axis=(-3, -1))
    )


def _write_s2_s1(s2_root: Path, s1_root: Path, i: int, size: int, rng: np.random.Generator) -> None:
    coarsest = int(S2_RESOLUTIONS[-1] // S2_RESOLUTIONS[0])
    fine = math.ceil(size / coarsest) * coarsest  # 10 m grid covering every coarser band's pixels
    fractions = landscape(rng, fine, fine)
    brightness = 1.0 + 0.08 * smooth_noise(rng, (fine, fine), fine / 6)
    nodata = np.zeros((fine, fine), dtype=bool)
    side = max(2, size // 8)
    r0, c0 = (int(v) for v in rng.integers(0, size - side, size=2))
    nodata[r0 : r0 + side, c0 : c0 + side] = True
    origin = (400_000.0 + 5_000.0 * i, 5_500_000.0)

    sensor = get_sensor("S2L2A")
    stamp = S2_START + timedelta(days=7 * i)
    name = f"S2L2A_{stamp:%Y%m%dT%H%M%S}_{i:03d}"
    folder = s2_root / name
    folder.mkdir(parents=True, exist_ok=True)
    wavelengths = np.array([b.wavelength for b in sensor.bands])
    bands = reflectance(fractions, wavelengths) * brightness  # [C, fine, fine]
    bands += rng.normal(0.0, 0.003, size=bands.shape)
    for band, values in zip(sensor.bands, bands, strict=True):
        factor = int(band.gsd // S2_RESOLUTIONS[0])
        n = math.ceil(size / factor)
        coarse = _block_mean(values, factor)[:n, :n]
        missing = _block_mean(nodata.astype(float), factor)[:n, :n] > 0
        dn = np.clip(np.rint(coarse * 10_000), 1, 65_535).astype(np.uint16)
        dn[missing] = 0
        _write(folder / f"{name}_{band.name}.tif", dn[None], origin, band.gsd, "EPSG:32633", 0)

    stamp = stamp + timedelta(days=1, hours=-5, minutes=12)
    name = f"S1GRD_{stamp:%Y%m%dT%H%M%S}_{i:03d}"
    folder = s1_root / name
    folder.mkdir(parents=True, exist_ok=True)
    cover = fractions[:, :size, :size]
    texture = 10 ** (0.1 * 1.5 * smooth_noise(rng, (size, size), size / 12))
    for pol, levels in SAR_DB:
        sigma0 = np.einsum("k,khw->hw", 10 ** (np.array(levels) / 10), cover) * texture
        speckle = rng.gamma(SPECKLE_LOOKS, 1.0 / SPECKLE_LOOKS, size=sigma0.shape)
        db = (10 * np.log10(sigma0 * speckle)).astype(np.float32)
        _write(
            folder / f"{name}_{pol}.tif", db[None], origin, S2_RESOLUTIONS[0], "EPSG:32633", None
        )


def _write_enmap(root: Path, i: int, size: int, rng: np.random.Generator) -> None:
    sensor = get_sensor("ENMAP")
    stamp = ENMAP_START + timedelta(days=9 * i)
    name = f"ENMAP_{stamp:%Y%m%dT%H%M%S}_{i:03d}"
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    fractions = landscape(rng, size, size)
    brightness = 1.0 + 0.08 * smooth_noise(rng, (size, size), size / 6)
    wavelengths = np.array([b.wavelength for b in sensor.bands])
    values = reflectance(fractions, wavelengths) * brightness
    values += rng.normal(0.0, 0.002, size=values.shape)
    dn = np.clip(np.rint(values * 10_000), -32_767, 32_767).astype(np.int16)
    # A swath edge cuts one corner off, as in real EnMAP tiles.
    yy, xx = np.mgrid[0:size, 0:size]
    corner = i % 4
    rows = yy if corner < 2 else size - 1 - yy
    cols = xx if corner % 2 == 0 else size - 1 - xx
    dn[:, rows + cols < size // 4] = sensor.nodata
    origin = (600_000.0 + 10_000.0 * i, 4_500_000.0)
    _write(
        folder / f"{name}-SPECTRAL_IMAGE.TIF", dn, origin, ENMAP_GSD, "EPSG:32618", sensor.nodata
    )


def _write(
    path: Path,
    data: np.ndarray,
    origin: tuple[float, float],
    gsd: float,
    crs: str,
    nodata: float | None,
) -> None:
    transform = Affine(gsd, 0.0, origin[0], 0.0, -gsd, origin[1])
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        height=data.shape[1],
        width=data.shape[2],
        count=data.shape[0],
        dtype=data.dtype,
        crs=crs,
        transform=transform,
        nodata=nodata,
        interleave="band",
    ) as ds:
        ds.write(data)
