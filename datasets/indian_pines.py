"""Indian Pines (AVIRIS, 1992): a pixel-classification scene cut into a spatially blocked split.

Files read from ``ROOT`` (see ``shared/data/indian_pines_aviris/README.txt``):
``Indian_pines_corrected.npy`` (145, 145, 200) uint16 DN and ``Indian_pines_gt.npy`` (145, 145)
uint8 with 0 = unlabelled and 1..16 the classes in ``CLASS_NAMES`` order (label ``k`` becomes
class index ``k - 1``).

Band order: the file's 200 bands in file order are the registry bands ``AVIRIS:B001`` ..
``AVIRIS:B200`` (sensor ``AVIRIS`` of ``eoforge.datasets.sensors``, the corrected cube with the
20 water-absorption bands already removed); their wavelengths come from that registry.

Split rule: the scene is cut into square blocks of ``block_size`` pixels (the last row and column
of blocks absorb the remainder), and a seeded rng assigns ``train_fraction`` of the blocks to
train and the rest to test. Of ``SPLIT_DRAWS`` such draws, the one whose kept train and test
pixels have the most similar class mix (least total variation distance) is used, and both splits
always keep labelled pixels; the draw looks at labels only, never at the image. Every labelled
pixel becomes one sample: the ``window`` x ``window`` neighbourhood around it (rows
``r - window // 2 .. r + (window - 1) // 2``, likewise columns; reflect-padded at the scene
border). A pixel is kept only when every scene pixel its window reads lies in a block of its own
split, so no test window overlaps a training window or pixel, nor the other way round.

Normalisation follows the ``stats.json`` convention (clip to [p1, p99], scale to [0, 1], then
z-score) with statistics computed on the pixels of the TRAIN blocks only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eoforge.datasets.errors import DataError
from eoforge.datasets.labelled import (
    TEST,
    TRAIN,
    LabelledSplit,
    Windows,
    blocked_split,
    blocked_tiles,
    check_tiling,
    ids_split_hash,
    normalise,
    stratified_subset,
    train_stats,
)
from eoforge.datasets.sensors import get_sensor

IMAGE_FILE = "Indian_pines_corrected.npy"
LABEL_FILE = "Indian_pines_gt.npy"
SENSOR = "AVIRIS"
CLASS_NAMES = (
    "Alfalfa",
    "Corn-notill",
    "Corn-mintill",
    "Corn",
    "Grass-pasture",
    "Grass-trees",
    "Grass-pasture-mowed",
    "Hay-windrowed",
    "Oats",
    "Soybean-notill",
    "Soybean-mintill",
    "Soybean-clean",
    "Wheat",
    "Woods",
    "Buildings-Grass-Trees-Drives",
    "Stone-Steel-Towers",
)


@dataclass
class PixelSplit:
    """A spatially blocked train/test split of one labelled scene.

    Attributes:
        x_train, x_test: normalised windows [N, C, w, w] float32 (array-like, see ``Windows``).
        y_train, y_test: class indices [N] int64 into ``class_names``.
        band_ids: registry keys of the C bands, in the channel order of ``x``.
        wavelengths: [C] float32 band-centre wavelengths in nm.
        class_names: names of the class indices.
        split_hash: sha256 of the train and test pixel index lists (record it with results).
        train_pixels, test_pixels: [N, 2] (row, col) of the window centres.
        split_map: [H, W] int8 block assignment of every scene pixel (0 train, 1 test).
        stats: per-band {p1, p99, mean, std} computed on the train blocks' pixels.
        window, block_size: the split parameters.
    """

    x_train: Windows
    y_train: np.ndarray
    x_test: Windows
    y_test: np.ndarray
    band_ids: list[str]
    wavelengths: np.ndarray
    class_names: list[str]
    split_hash: str
    train_pixels: np.ndarray
    test_pixels: np.ndarray
    split_map: np.ndarray
    stats: dict[str, dict[str, float]]
    window: int
    block_size: int

    @property
    def task(self) -> str:
        """Always ``"classification"``: the ``LabelledSplit`` field this split stands in for."""
        return "classification"


def load_indian_pines(
    root: str | Path,
    *,
    window: int = 16,
    block_size: int = 24,
    train_fraction: float = 0.6,
    seed: int = 0,
    max_train: int | None = None,
    max_test: int | None = None,
) -> PixelSplit:
    """Read Indian Pines from ``root`` and cut the spatially blocked split (module docstring).

    Args:
        root: folder holding ``Indian_pines_corrected.npy`` and ``Indian_pines_gt.npy``.
        window: side of the neighbourhood cut around each labelled pixel.
        block_size: side of the square blocks assigned to train or test.
        train_fraction: share of the blocks that go to train.
        seed: seeds the block assignment and the subsampling caps.
        max_train, max_test: keep at most this many samples per split, a seeded class-stratified
            subsample (None keeps all).

    Returns:
        The split with normalised windows, labels, band identity and the split hash.
    """
    if window < 1 or block_size < 1 or not 0 < train_fraction < 1:
        raise ValueError(
            f"window={window}, block_size={block_size} must be >= 1 and "
            f"train_fraction={train_fraction} inside (0, 1)"
        )
    image, labels = _read(Path(root))
    sensor = get_sensor(SENSOR)
    split_map, keep = _blocked_split(
        labels, window, block_size, train_fraction, np.random.default_rng(seed), Path(root)
    )
    band_ids = [band.band_id for band in sensor.bands]
    stats = train_stats(image[split_map == TRAIN], band_ids, Path(root) / IMAGE_FILE)
    before, after = window // 2, window - 1 - window // 2
    padded = np.pad(
        normalise(image, stats, band_ids),
        ((before, after), (before, after), (0, 0)),
        mode="reflect",
    )  # [H + w - 1, W + w - 1, C]
    pixels = {}
    for split, cap in ((TRAIN, max_train), (TEST, max_test)):
        coords = np.argwhere(keep & (split_map == split))  # [N, 2] in scene (row-major) order
        # One rng per split, so capping train never changes which test samples are kept.
        subset_rng = np.random.default_rng((seed, 1 + split))
        pixels[split] = coords[stratified_subset(labels[tuple(coords.T)], cap, subset_rng)]
    y = {s: labels[p[:, 0], p[:, 1]].astype(np.int64) - 1 for s, p in pixels.items()}
    return PixelSplit(
        x_train=Windows(padded, pixels[TRAIN], window),
        y_train=y[TRAIN],
        x_test=Windows(padded, pixels[TEST], window),
        y_test=y[TEST],
        band_ids=band_ids,
        wavelengths=np.array([band.wavelength for band in sensor.bands], dtype=np.float32),
        class_names=list(CLASS_NAMES),
        split_hash=split_hash(pixels[TRAIN], pixels[TEST], labels.shape[1]),
        train_pixels=pixels[TRAIN],
        test_pixels=pixels[TEST],
        split_map=split_map,
        stats=stats,
        window=window,
        block_size=block_size,
    )


def split_hash(train_pixels: np.ndarray, test_pixels: np.ndarray, width: int) -> str:
    """sha256 over the flat (row * width + col) train and test index lists."""
    digest = hashlib.sha256()
    for name, pixels in (("train", train_pixels), ("test", test_pixels)):
        flat = pixels[:, 0].astype(np.int64) * width + pixels[:, 1]
        digest.update(f"{name}:{len(flat)}:".encode())
        digest.update(flat.astype("<i8").tobytes())
    return digest.hexdigest()


def _read(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """The cube [H, W, C] uint16 and the label map [H, W], checked against the registry."""
    for name in (IMAGE_FILE, LABEL_FILE):
        if not (root / name).is_file():
            raise DataError(
                f"{root / name} not found; point the dataset at the folder holding "
                f"{IMAGE_FILE} and {LABEL_FILE} (e.g. shared/data/indian_pines_aviris)"
            )
    # allow_pickle=False: these are plain arrays, and loading data must never unpickle.
    image = np.load(root / IMAGE_FILE, allow_pickle=False)
    labels = np.load(root / LABEL_FILE, allow_pickle=False)
    n_bands = len(get_sensor(SENSOR).bands)
    if image.ndim != 3 or image.shape[2] != n_bands:
        raise DataError(
            f"{root / IMAGE_FILE} has shape {image.shape}; expected (H, W, {n_bands}) with the "
            f"{n_bands} bands of registry sensor {SENSOR} (the 'corrected' cube)"
        )
    if labels.shape != image.shape[:2]:
        raise DataError(
            f"{root / LABEL_FILE} has shape {labels.shape} but the image is {image.shape[:2]}"
        )
    if labels.min() < 0 or labels.max() > len(CLASS_NAMES):
        raise DataError(
            f"{root / LABEL_FILE} holds labels {labels.min()}..{labels.max()}; expected "
            f"0 (unlabelled) to {len(CLASS_NAMES)}"
        )
    return image, labels


def _blocked_split(
    labels: np.ndarray,
    window: int,
    block_size: int,
    train_fraction: float,
    rng: np.random.Generator,
    root: Path,
) -> tuple[np.ndarray, np.ndarray]:
    """Block assignment [H, W] int8 (the best of ``SPLIT_DRAWS`` draws) and the mask [H, W] of
    labelled pixels whose window stays inside blocks of their own split."""
    return blocked_split(labels, window, block_size, train_fraction, rng, root / LABEL_FILE)


def load_indian_pines_map(
    root: str | Path,
    *,
    tile: int = 16,
    block_size: int = 32,
    train_fraction: float = 0.6,
    seed: int = 0,
) -> LabelledSplit:
    """Indian Pines as a segmentation map: the scene cut into ``tile`` x ``tile`` tiles, each
    with its per-pixel classes (class ``k - 1`` for label ``k``, -1 where unlabelled).

    Split rule: ``blocked_split`` (blocks of ``block_size`` px, a multiple of ``tile``; a seeded
    assignment of ``train_fraction`` of them to train, the draw with the most similar class
    mixes); a tile goes where its block goes, so no test tile shares a pixel with a train tile.
    Tiles without a labelled pixel are left out. The scene is padded with zeros (and -1 labels)
    to a whole number of tiles. Band order and normalisation as ``load_indian_pines`` (train
    blocks' pixels only). The split hash covers the tile origins of both splits.

    Returns:
        A ``"segmentation"`` split: x [N, 200, tile, tile] float32, y [N, tile, tile] int64.
    """
    check_tiling(tile, block_size, train_fraction)
    image, labels = _read(Path(root))  # [H, W, C], [H, W]
    sensor = get_sensor(SENSOR)
    band_ids = [band.band_id for band in sensor.bands]
    rng = np.random.default_rng(seed)
    split_map, _ = blocked_split(labels, 1, block_size, train_fraction, rng, Path(root))
    stats = train_stats(image[split_map == TRAIN], band_ids, Path(root) / IMAGE_FILE)
    normed = np.moveaxis(normalise(image, stats, band_ids), -1, 0)  # [C, H, W]
    out, ids = blocked_tiles(normed, labels.astype(np.int64) - 1, split_map, tile)
    return LabelledSplit(
        x_train=out[TRAIN][0],
        y_train=out[TRAIN][1],
        x_test=out[TEST][0],
        y_test=out[TEST][1],
        band_ids=band_ids,
        wavelengths=np.array([band.wavelength for band in sensor.bands], dtype=np.float32),
        class_names=list(CLASS_NAMES),
        task="segmentation",
        split_hash=ids_split_hash(ids[TRAIN], ids[TEST]),
        stats=stats,
        train_ids=ids[TRAIN],
        test_ids=ids[TEST],
    )
