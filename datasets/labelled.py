"""Labelled evaluation splits: one split type for every downstream dataset, and its helpers.

``LabelledSplit`` is what every evaluation adapter returns (``eoforge.datasets.eval_datasets``
registers the adapters by dataset name). Its images are normalised with the ``stats.json``
convention: clip every band to its [p1, p99] percentiles, scale to [0, 1], then z-score with the
mean/std of the scaled values; statistics always come from the TRAIN split only, so nothing about
the test images leaks into the normalisation.

Tasks and label layouts:

* ``"classification"``: ``y`` [N] int64 class indices into ``class_names``.
* ``"multilabel"``: ``y`` [N, K] float32 multi-hot over the K ``class_names``.
* ``"segmentation"``: ``y`` [N, H, W] int64 class indices, -1 = unlabelled.
* ``"change"``: ``x`` [N, 2, C, H, W] (before, after); ``y`` [N, H, W] int64 with 1 = changed,
  0 = unchanged, -1 = unlabelled.

Split hashes of sample-list datasets (``ids_split_hash``): sha256 over ``"train:<n>:"`` followed
by the n train sample ids joined by newlines, then ``"test:<n>:"`` and the test ids likewise, each
list in split order. A sample id is the dataset's own name for the sample (a path relative to the
dataset root, a patch id, a tile's pixel origin); the adapter's docstring says which.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from eoforge.datasets.errors import DataError

TASKS = ("classification", "multilabel", "segmentation", "change")
TRAIN, TEST = 0, 1
SPLIT_DRAWS = 64


@dataclass
class LabelledSplit:
    """A normalised train/test split of one labelled dataset.

    Attributes:
        x_train, x_test: array-like float32 normalised images [N, C, H, W] (``"change"``:
            [N, 2, C, H, W], before then after).
        y_train, y_test: labels in the task's layout (module docstring).
        band_ids: registry keys of the C bands, in the channel order of ``x``.
        wavelengths: [C] float32 band-centre wavelengths in nm.
        class_names: names of the class indices (``"change"``: ``["unchanged", "changed"]``).
        task: one of ``TASKS``.
        split_hash: sha256 identifying the split (the adapter's docstring gives its rule).
        stats: per-band {p1, p99, mean, std} of the training split.
        train_ids, test_ids: the dataset's own id of every sample, in ``x`` order.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    band_ids: list[str]
    wavelengths: np.ndarray
    class_names: list[str]
    task: str
    split_hash: str
    stats: dict[str, dict[str, float]]
    train_ids: list[str] = field(default_factory=list)
    test_ids: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task {self.task!r} is not one of {', '.join(TASKS)}")


class Windows:
    """Array-like ``[N, ..., w, w]`` float32 neighbourhoods cut on access.

    Cutting every window up front can take gigabytes (Indian Pines at window 16: about 2 GB); this
    keeps only the padded normalised cube and the window centres, and cuts the windows asked for.

    Args:
        padded: normalised cube [H + w - 1, W + w - 1, ...] float32, reflect-padded; the trailing
            axes (e.g. [C] or [2, C]) become the sample axes before the two window axes.
        pixels: [N, 2] (row, col) scene coordinates of the window centres.
        window: window side in pixels.
    """

    def __init__(self, padded: np.ndarray, pixels: np.ndarray, window: int):
        self.pixels = pixels
        self.window = window
        self._views = sliding_window_view(
            padded, (window, window), axis=(0, 1)
        )  # [H, W, ..., w, w]

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.pixels), *self._views.shape[2:])

    @property
    def dtype(self) -> np.dtype:
        return self._views.dtype

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, key) -> np.ndarray:
        """Windows for an int ([..., w, w]), a slice or an index array ([n, ..., w, w])."""
        rows, cols = self.pixels[key].T
        return np.ascontiguousarray(self._views[rows, cols])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)


def train_stats(
    pixels: np.ndarray, band_ids: Sequence[str], source: str | Path
) -> dict[str, dict[str, float]]:
    """Per-band p1/p99 and mean/std of the clipped, [0, 1]-scaled values of pixels [N, C].

    Raises:
        DataError: naming ``source`` and the band when a band is constant over ``pixels``.
    """
    values = pixels.astype(np.float64)
    p1, p99 = np.percentile(values, [1, 99], axis=0)  # [C] each
    flat = np.flatnonzero(p99 <= p1)
    if flat.size:
        raise DataError(
            f"{source}: band {band_ids[flat[0]]} is constant over the training split "
            f"(p1 = p99 = {p1[flat[0]]}); drop it or use another seed or split"
        )
    scaled = (np.clip(values, p1, p99) - p1) / (p99 - p1)
    mean, std = scaled.mean(axis=0), scaled.std(axis=0)
    return {
        band: {
            "p1": float(p1[c]),
            "p99": float(p99[c]),
            "mean": float(mean[c]),
            "std": float(std[c]),
        }
        for c, band in enumerate(band_ids)
    }


def normalise(image: np.ndarray, stats: dict, band_ids: Sequence[str]) -> np.ndarray:
    """Channel-last values [..., C] -> float32 normalised with ``stats`` (clip, scale, z-score)."""
    p1, p99, mean, std = (
        np.array([stats[band][key] for band in band_ids]) for key in ("p1", "p99", "mean", "std")
    )
    scaled = (np.clip(image.astype(np.float64), p1, p99) - p1) / (p99 - p1)
    return ((scaled - mean) / std).astype(np.float32)


def normalise_stacks(
    train: np.ndarray, test: np.ndarray, band_ids: Sequence[str], source: str | Path
) -> tuple[np.ndarray, np.ndarray, dict[str, dict[str, float]]]:
    """Normalise channel-first stacks [N, C, H, W] with statistics of ``train``'s pixels only."""
    channels_last = np.moveaxis(train, 1, -1).reshape(-1, train.shape[1])  # [N * H * W, C]
    stats = train_stats(channels_last, band_ids, source)

    def apply(stack: np.ndarray) -> np.ndarray:
        out = normalise(np.moveaxis(stack, 1, -1), stats, band_ids)  # [N, H, W, C]
        return np.ascontiguousarray(np.moveaxis(out, -1, 1))  # [N, C, H, W]

    return apply(train), apply(test), stats


def stratified_subset(labels: np.ndarray, cap: int | None, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of a seeded subsample of size ``cap`` keeping class proportions."""
    if cap is None or cap >= len(labels):
        return np.arange(len(labels))
    if cap < 1:
        raise ValueError(f"max_train/max_test must be >= 1, got {cap}")
    order = rng.permutation(len(labels))
    # Rank each sample within its class in random order; (rank + 0.5) / class size spreads every
    # class evenly over [0, 1], so the ``cap`` smallest keys take each class in proportion.
    key = np.empty(len(labels))
    for label in np.unique(labels):
        members = order[labels[order] == label]
        key[members] = (np.arange(len(members)) + 0.5) / len(members)
    return np.sort(np.argsort(key, kind="stable")[:cap])


def stratified_split(
    labels: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded class-stratified split of sample indices into (train, test), both sorted.

    The test split takes ``round(test_fraction * N)`` samples (at least 1, at most N - 1), spread
    over the classes in proportion to their sizes (``stratified_subset``); where classes tie (e.g.
    one sample per class) the seeded permutation decides, so every sample can land in test.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction={test_fraction} must lie inside (0, 1)")
    if len(labels) < 2:
        raise DataError(f"a train/test split needs at least 2 samples, found {len(labels)}")
    n_test = min(max(round(test_fraction * len(labels)), 1), len(labels) - 1)
    perm = rng.permutation(len(labels))
    test = np.sort(perm[stratified_subset(labels[perm], n_test, rng)])
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, test


def check_tiling(tile: int, block_size: int, train_fraction: float) -> None:
    """The options of a tiled, blocked split: ValueError naming them unless they fit."""
    if tile < 1 or block_size < tile or block_size % tile or not 0 < train_fraction < 1:
        raise ValueError(
            f"tile={tile} must be >= 1, block_size={block_size} a multiple of it and "
            f"train_fraction={train_fraction} inside (0, 1)"
        )


def blocked_tiles(
    image: np.ndarray, labels: np.ndarray, split_map: np.ndarray, tile: int, prefix: str = ""
) -> tuple[dict[int, tuple[np.ndarray, np.ndarray]], dict[int, list[str]]]:
    """Cut a scene into ``tile`` x ``tile`` tiles and deal them to the splits of ``split_map``.

    Args:
        image: [..., H, W]; zero-padded to whole tiles.
        labels: [H, W] int, -1 where unlabelled; padded with -1. Tiles without a labelled pixel
            are left out.
        split_map: [H, W] of ``TRAIN``/``TEST`` (``blocked_split``, blocks a multiple of
            ``tile``, so each tile lies in one block: a tile goes where its origin goes).
        prefix: put before each tile's id, ``"<row>_<col>"`` of its origin.

    Returns:
        ``({split: (x [N, ..., tile, tile], y [N, tile, tile])}, {split: ids})``, tiles in
        row-major order.
    """
    height, width = labels.shape
    pad = ((0, -height % tile), (0, -width % tile))
    image = np.pad(image, ((0, 0),) * (image.ndim - 2) + pad)  # zeros past the edge
    labels = np.pad(labels, pad, constant_values=-1)
    n_rows, n_cols = labels.shape[0] // tile, labels.shape[1] // tile
    lead = image.ndim - 2
    x = image.reshape(*image.shape[:-2], n_rows, tile, n_cols, tile)
    x = x.transpose(lead, lead + 2, *range(lead), lead + 1, lead + 3)  # [nR, nC, ..., t, t]
    y = labels.reshape(n_rows, tile, n_cols, tile).transpose(0, 2, 1, 3)  # [nR, nC, t, t]
    tile_split = split_map[::tile, ::tile]  # [nR, nC]
    labelled = (y >= 0).any(axis=(2, 3))
    out, ids = {}, {}
    for split in (TRAIN, TEST):
        rows, cols = np.nonzero(labelled & (tile_split == split))
        out[split] = (np.ascontiguousarray(x[rows, cols]), np.ascontiguousarray(y[rows, cols]))
        ids[split] = [f"{prefix}{r * tile}_{c * tile}" for r, c in zip(rows, cols, strict=True)]
    return out, ids


def blocked_split(
    labels: np.ndarray,
    window: int,
    block_size: int,
    train_fraction: float,
    rng: np.random.Generator,
    source: str | Path,
) -> tuple[np.ndarray, np.ndarray]:
    """Spatially blocked split of a label map [H, W] (0 = unlabelled, 1..K = classes).

    The scene is cut into square blocks of ``block_size`` pixels (the last row and column of
    blocks absorb the remainder) and a seeded draw assigns ``train_fraction`` of them to train.
    Of ``SPLIT_DRAWS`` draws, the one whose kept train and test pixels have the most similar
    class mix (least total variation distance) is used; both splits always keep labelled pixels.

    Returns:
        The block assignment [H, W] int8 (``TRAIN``/``TEST``) and the mask [H, W] of labelled
        pixels whose ``window`` x ``window`` neighbourhood (reflect-padded at the border) stays
        inside blocks of their own split.

    Raises:
        DataError: naming ``source`` when no draw leaves labelled pixels in both splits.
    """
    height, width = labels.shape
    grid = max(1, height // block_size), max(1, width // block_size)
    block_rows = np.minimum(np.arange(height) // block_size, grid[0] - 1)
    block_cols = np.minimum(np.arange(width) // block_size, grid[1] - 1)
    n_blocks = grid[0] * grid[1]
    if n_blocks < 2:
        raise DataError(
            f"{source}: a {height}x{width} scene holds one block of {block_size} px; "
            "use smaller blocks"
        )
    n_train = min(max(round(train_fraction * n_blocks), 1), n_blocks - 1)
    n_labels = int(labels.max()) + 1
    best, best_distance = None, np.inf
    for _ in range(SPLIT_DRAWS):
        assign = np.full(n_blocks, TEST, dtype=np.int8)
        assign[rng.permutation(n_blocks)[:n_train]] = TRAIN
        split_map = assign.reshape(grid)[block_rows[:, None], block_cols[None, :]]  # [H, W]
        keep = pure_windows(split_map, window) & (labels > 0)
        train, test = labels[keep & (split_map == TRAIN)], labels[keep & (split_map == TEST)]
        if not (train.size and test.size):
            continue
        # Fields of one class are few and large, so a plain random draw often leaves a class on
        # one side only; keep the draw whose class mixes differ least (total variation).
        shares = [np.bincount(s, minlength=n_labels) / s.size for s in (train, test)]
        distance = 0.5 * np.abs(shares[0] - shares[1]).sum()
        if distance < best_distance:
            best, best_distance = (split_map, keep), distance
    if best is None:
        raise DataError(
            f"{source}: no draw of {n_blocks} blocks of {block_size} px left labelled "
            f"{window}x{window} windows in both splits; use a smaller window or larger blocks"
        )
    return best


def pure_windows(split_map: np.ndarray, window: int) -> np.ndarray:
    """[H, W] bool: the window around the pixel reads only pixels of one split.

    The split map is padded exactly like the cube, so the window's cells name the split of
    every scene pixel it reads, reflections included; an integral image counts the train cells.
    """
    before, after = window // 2, window - 1 - window // 2
    padded = np.pad(
        (split_map == TRAIN).astype(np.int32), ((before, after), (before, after)), mode="reflect"
    )  # [H + w - 1, W + w - 1]
    integral = np.pad(padded.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    n_train = (
        integral[window:, window:]
        - integral[:-window, window:]
        - integral[window:, :-window]
        + integral[:-window, :-window]
    )  # [H, W]
    return (n_train == 0) | (n_train == window * window)


def ids_split_hash(train_ids: Sequence[str], test_ids: Sequence[str]) -> str:
    """sha256 of the train and test sample-id lists (rule in the module docstring)."""
    digest = hashlib.sha256()
    for name, ids in (("train", train_ids), ("test", test_ids)):
        digest.update(f"{name}:{len(ids)}:".encode())
        digest.update("\n".join(ids).encode())
    return digest.hexdigest()
