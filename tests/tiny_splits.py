"""A tiny random labelled split of each task, as a dataset adapter, so every registered protocol
runs end to end without the sample-data folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from eoforge.datasets.labelled import LabelledSplit
from eoforge.datasets.sensors import get_sensor

BANDS = get_sensor("S2L2A").bands[:3]
SIZE, N, CLASSES = 16, 12, 2


def load_tiny(root: str | Path, *, task: str, seed: int = 0) -> LabelledSplit:
    """``N`` train and ``N`` test images [3, SIZE, SIZE] (change: pairs) of S2 bands, with
    labels of ``task`` in which both classes occur on both sides."""
    rng = np.random.default_rng(seed)
    image = (2, len(BANDS), SIZE, SIZE) if task == "change" else (len(BANDS), SIZE, SIZE)
    classes = np.arange(N) % CLASSES

    def labels():
        if task == "classification":
            return classes.astype(np.int64)
        if task == "multilabel":
            return np.stack([classes, 1 - classes], axis=1).astype(np.float32)
        maps = np.broadcast_to(classes[:, None, None], (N, SIZE, SIZE))
        return np.ascontiguousarray(np.where(rng.random(maps.shape) < 0.1, -1, maps))

    return LabelledSplit(
        x_train=rng.standard_normal((N, *image)).astype(np.float32),
        y_train=labels(),
        x_test=rng.standard_normal((N, *image)).astype(np.float32),
        y_test=labels(),
        band_ids=[band.band_id for band in BANDS],
        wavelengths=np.array([band.wavelength for band in BANDS], dtype=np.float32),
        class_names=["unchanged", "changed"] if task == "change" else ["a", "b"],
        task=task,
        split_hash=f"tiny-{task}-{seed}",
        stats={},
        train_ids=[f"train{i}" for i in range(N)],
        test_ids=[f"test{i}" for i in range(N)],
    )
