"""``change``: a siamese change-detection head trained on the encoder (``eoforge.finetune.dense``),
scored by F1 and IoU of the change class (and its precision and recall)."""

from __future__ import annotations

from functools import partial

from eoforge.finetune.protocols import Protocol
from eoforge.finetune.protocols.trained import TrainedOptions, run_trained, trained_cell

TASKS = ("change",)


def train(encoder, data, loaded, seed: int, **training):
    """(scores, the trainer's result) of a change head trained on ``encoder``."""
    from eoforge.finetune.dense import train_change

    trained = train_change(
        encoder, data.x_train, data.y_train, data.x_test, data.y_test, loaded.band_ids,
        loaded.wavelengths, seed=seed, **training,
    )  # fmt: skip
    scores = {"f1": trained.f1, "iou": trained.iou}
    return scores | {"precision": trained.precision, "recall": trained.recall}, trained


PROTOCOL = Protocol(
    name="change",
    summary="train a siamese change-detection head on the encoder; F1 and IoU",
    tasks=TASKS,
    options=TrainedOptions,
    run=partial(run_trained, "change", TASKS, train),
    cell=partial(trained_cell, "change", TASKS, train),
    flags={"frozen": "train the head only"},
    example="eoforge eval change --release R --dataset taizhou:../shared/data/landsat_tm_change_detection_taizhou_nanjing",
)
