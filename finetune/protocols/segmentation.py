"""``segmentation``: an UPerNet-style decoder trained on the encoder (``eoforge.finetune.dense``),
scored by mean IoU."""

from __future__ import annotations

from functools import partial

from eoforge.finetune.protocols import Protocol
from eoforge.finetune.protocols.trained import TrainedOptions, run_trained, trained_cell

TASKS = ("segmentation",)


def train(encoder, data, loaded, seed: int, **training):
    """(scores, the trainer's result) of a segmentation decoder trained on ``encoder``."""
    from eoforge.finetune.dense import train_segmentation

    trained = train_segmentation(
        encoder, data.x_train, data.y_train, data.x_test, data.y_test, len(data.class_names),
        loaded.band_ids, loaded.wavelengths, seed=seed, **training,
    )  # fmt: skip
    per_class = {data.class_names[c]: v for c, v in sorted(trained.per_class_iou.items())}
    return {"miou": trained.miou, "per_class_iou": per_class}, trained


PROTOCOL = Protocol(
    name="segmentation",
    summary="train an UPerNet-style decoder on the encoder; mIoU",
    tasks=TASKS,
    options=TrainedOptions,
    run=partial(run_trained, "segmentation", TASKS, train),
    cell=partial(trained_cell, "segmentation", TASKS, train),
    flags={"frozen": "train the head only"},
    example="eoforge eval segmentation --release R --dataset indian_pines_map:../shared/data/indian_pines_aviris --frozen",
)
