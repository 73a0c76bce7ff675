"""Tile quality at ingest: cloud fraction from a product's own quality layers, nodata fraction.

``eoforge data build`` can drop tiles that are mostly cloud or mostly outside the acquisition.
Cloud masks are the layers a product ships next to its bands (files of the scene's folder named
``<prefix><LAYER>...``, where ``<prefix>`` starts the name of the scene's band files):

* Sentinel-2: ``cloud_mask`` (Major TOM Core; nonzero = cloud), ``SCL`` (Sen2Cor scene
  classification; classes 8, 9 cloud of medium/high probability, 10 thin cirrus),
  ``MSK_CLDPRB``/``CLD`` (Sen2Cor cloud probability in percent; cloud from
  ``CLOUD_PROBABILITY`` on).
* Landsat: ``QA_PIXEL`` (Collection 2; bits 1 dilated cloud, 2 cirrus, 3 cloud) and ``BQA``
  (Collection 1: bit 4 cloud, bits 11-12 cirrus confidence high; pre-collection: bits 14-15
  cloud or 12-13 cirrus confidence high). Collection 1 leaves bits 13-15 unused, so a BQA with
  any of them set is read as pre-collection.
* EnMAP L2A: ``QL_QUALITY_CLOUD`` and ``QL_QUALITY_CIRRUS`` (nonzero = flagged).

Every layer found for a scene is read onto the scene's grid (nearest neighbour) and the flags
are OR-ed. Fractions are per tile: the nodata fraction counts pixels where no band is valid
(outside the footprint, fill, padding past the scene's edge) among the tile's pixels; the
cloud fraction counts flagged pixels among the tile's pixels that hold data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.errors import RasterioIOError
from rasterio.warp import reproject

from eoforge.datasets.errors import DataError
from eoforge.datasets.geotiff import EXTENSIONS, Grid, Scene, SceneSource, band_token

CLOUD_PROBABILITY = 50  # percent; Sen2Cor's own "medium probability" cloud threshold


def _nonzero(raw: np.ndarray) -> np.ndarray:
    return raw != 0


def _scl(raw: np.ndarray) -> np.ndarray:
    return np.isin(raw, (8, 9, 10))


def _probability(raw: np.ndarray) -> np.ndarray:
    return raw >= CLOUD_PROBABILITY


def _bits(raw: np.ndarray, shift: int, width: int = 1) -> np.ndarray:
    return (raw.astype(np.uint32) >> shift) & ((1 << width) - 1)


def _qa_pixel(raw: np.ndarray) -> np.ndarray:
    return (_bits(raw, 1) | _bits(raw, 2) | _bits(raw, 3)).astype(bool)


def _bqa(raw: np.ndarray) -> np.ndarray:
    if (_bits(raw, 13, 3) != 0).any():  # pre-collection: 2-bit confidences, 3 = high
        return (_bits(raw, 14, 2) == 3) | (_bits(raw, 12, 2) == 3)
    return (_bits(raw, 4) == 1) | (_bits(raw, 11, 2) == 3)


@dataclass(frozen=True)
class CloudLayer:
    """A kind of cloud/quality layer: its file-name token and how its values flag clouds."""

    token: str
    flags: Callable[[np.ndarray], np.ndarray]


# Longer tokens first: a file takes the first layer whose token starts its suffix.
CLOUD_LAYERS = (
    CloudLayer("QL_QUALITY_CLOUD", _nonzero),
    CloudLayer("QL_QUALITY_CIRRUS", _nonzero),
    CloudLayer("MSK_CLDPRB", _probability),
    CloudLayer("cloud_mask", _nonzero),
    CloudLayer("QA_PIXEL", _qa_pixel),
    CloudLayer("BQA", _bqa),
    CloudLayer("SCL", _scl),
    CloudLayer("CLD", _probability),
)


def _names(rest: str, token: str) -> bool:
    """Whether a file-name suffix is ``token`` or ``token`` followed by ``_``/``-`` and more
    (``MSK_CLDPRB_20m``), so that ``QL_QUALITY_CLOUDSHADOW`` is not a cloud layer."""
    token = token.upper()
    return rest == token or (rest.startswith(token) and rest[len(token)] in "_-")


def cloud_layers(source: SceneSource) -> list[tuple[CloudLayer, Path]]:
    """The cloud layers shipped with a scene: files of its folder named ``<prefix><TOKEN>...``
    where ``<prefix>`` (possibly empty, ending at ``_``/``-``) starts its first band file's name;
    for per-band scenes the rest of that name must be the band token."""
    first = source.members[0].path
    perband = first != source.source
    found = []
    for path in sorted(first.parent.iterdir()):
        if path.suffix.lower() not in EXTENSIONS or path == first:
            continue
        stem = path.stem
        for i in [0] + [i + 1 for i, ch in enumerate(stem) if ch in "_-"]:
            prefix, rest = stem[:i], stem[i:].upper()
            layer = next((c for c in CLOUD_LAYERS if _names(rest, c.token)), None)
            if layer is None or not first.stem.startswith(prefix):
                continue
            if perband and first.stem[len(prefix) :] != band_token(first):
                continue
            found.append((layer, path))
            break
    return found


def read_cloud_mask(source: SceneSource, grid: Grid) -> tuple[np.ndarray, list[str]] | None:
    """Cloud flags of a scene on its grid: ``(bool [H, W], layer tokens)``, or None where the
    scene ships no cloud layer. Pixels a layer does not cover count as not flagged by it."""
    layers = cloud_layers(source)
    if not layers:
        return None
    cloud = np.zeros((grid.height, grid.width), dtype=bool)
    for layer, path in layers:
        try:
            with rasterio.open(path) as ds:
                raw = ds.read(1)
                own = Grid(ds.crs, ds.transform, ds.height, ds.width)
        except RasterioIOError as exc:
            raise DataError(f"cannot read cloud layer {path}: {exc}") from exc
        flags = layer.flags(raw)
        if not own.same_as(grid):
            if own.crs is None or grid.crs is None:
                raise DataError(
                    f"cloud layer {path} is not on the grid of scene {source.name} and has no "
                    "CRS to resample it with; add georeferencing or remove the layer"
                )
            out = np.zeros((grid.height, grid.width), dtype=np.uint8)
            reproject(
                source=flags.astype(np.uint8),
                destination=out,
                src_transform=own.transform,
                src_crs=own.crs,
                dst_transform=grid.transform,
                dst_crs=grid.crs,
                dst_nodata=0,
                resampling=Resampling.nearest,
            )
            flags = out.astype(bool)
        cloud |= flags
    return cloud, [layer.token for layer, _ in layers]


class QualityFilter:
    """Per-tile cloud and nodata thresholds, with counts of the tiles kept and dropped.

    Args:
        max_cloud_fraction: drop tiles whose cloud fraction (module docstring) exceeds this;
            None keeps every tile and reads no cloud layer.
        max_nodata_fraction: drop tiles whose nodata fraction exceeds this; None keeps all.

    Raises:
        DataError: naming the option whose value is not a fraction.
    """

    def __init__(
        self, max_cloud_fraction: float | None = None, max_nodata_fraction: float | None = None
    ) -> None:
        for name, value in (
            ("max_cloud_fraction", max_cloud_fraction),
            ("max_nodata_fraction", max_nodata_fraction),
        ):
            if value is not None and not 0.0 <= value <= 1.0:
                raise DataError(f"{name} must be between 0 and 1, got {value}")
        self.max_cloud_fraction = max_cloud_fraction
        self.max_nodata_fraction = max_nodata_fraction
        self.kept = 0
        self.dropped = {"cloud": 0, "nodata": 0}
        self.layers: dict[str, int] = {}
        self._cloud: np.ndarray | None = None

    def start_scene(self, source: SceneSource, scene: Scene) -> None:
        """Read the scene's cloud layers when a cloud threshold is set.

        Raises:
            DataError: when a cloud threshold is set and the scene ships no cloud layer.
        """
        self._cloud = None
        if self.max_cloud_fraction is None:
            return
        found = read_cloud_mask(source, scene.grid)
        if found is None:
            tokens = ", ".join(layer.token for layer in CLOUD_LAYERS)
            raise DataError(
                f"scene {scene.name} ({source.source}) has no cloud layer next to its bands "
                f"(looked for files named <prefix>{{{tokens}}}), so max_cloud_fraction="
                f"{self.max_cloud_fraction} cannot be applied; drop --max-cloud-fraction or "
                "add the product's cloud mask"
            )
        self._cloud, tokens = found
        for token in tokens:
            self.layers[token] = self.layers.get(token, 0) + 1

    def keeps(self, window: tuple[int, int, int, int], valid: np.ndarray) -> bool:
        """Whether to keep a tile of the current scene (and count it).

        Args:
            window: ``(row, col, h, w)`` of the tile on the scene's grid (from ``ingest.tiles``).
            valid: bool [C, h, w] of the tile, padding past the scene's edge invalid.
        """
        data = valid.any(axis=0)  # [h, w]: pixels where some band holds data
        if self.max_nodata_fraction is not None and 1.0 - data.mean() > self.max_nodata_fraction:
            self.dropped["nodata"] += 1
            return False
        if self._cloud is not None and data.any():
            row, col, h, w = window
            cloud = np.zeros(data.shape, dtype=bool)
            part = self._cloud[row : row + h, col : col + w]  # [h', w'], cut at the scene's edge
            cloud[: part.shape[0], : part.shape[1]] = part
            if np.count_nonzero(cloud & data) / np.count_nonzero(data) > self.max_cloud_fraction:
                self.dropped["cloud"] += 1
                return False
        self.kept += 1
        return True

    def report(self) -> dict:
        """Thresholds, tiles kept and dropped per reason, and scenes per cloud layer used."""
        return {
            "max_cloud_fraction": self.max_cloud_fraction,
            "max_nodata_fraction": self.max_nodata_fraction,
            "tiles_kept": self.kept,
            "tiles_dropped": dict(self.dropped),
            "cloud_layers": dict(self.layers),
        }
