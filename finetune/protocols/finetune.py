"""``finetune``: finetune the encoder with a linear head (layer-wise lr decay); classification
is scored by accuracy, multilabel by mAP (micro and macro)."""

from __future__ import annotations

from functools import partial

from eoforge.finetune.protocols import Protocol
from eoforge.finetune.protocols.trained import TrainedOptions, run_trained, trained_cell

TASKS = ("classification", "multilabel")


def train(encoder, data, loaded, seed: int, **training):
    """(scores, the trainer's result) of a classifier trained on ``encoder`` over ``data``."""
    from eoforge.finetune.finetune import finetune_classifier

    multilabel = data.task == "multilabel"
    trained = finetune_classifier(
        encoder, data.x_train, data.y_train, data.x_test, data.y_test, loaded.band_ids,
        loaded.wavelengths, multilabel=multilabel,
        n_classes=None if multilabel else len(data.class_names), seed=seed, **training,
    )  # fmt: skip
    if multilabel:
        return {"map_micro": trained.map_micro, "map_macro": trained.map_macro}, trained
    return {"accuracy": trained.accuracy}, trained


PROTOCOL = Protocol(
    name="finetune",
    summary="finetune the encoder with a linear head (layer-wise lr decay)",
    tasks=TASKS,
    options=TrainedOptions,
    run=partial(run_trained, "finetune", TASKS, train),
    cell=partial(trained_cell, "finetune", TASKS, train),
    flags={"frozen": "train the head only"},
    example="eoforge eval finetune --release runs/demo/release --dataset eurosat:../shared/data/eurosat_ms_samples epochs=20",
)
