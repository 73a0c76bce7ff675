"""Choosing recipes for the label-efficiency benchmark on EuroSAT RGB's VALIDATION split.

Every run here reads ``split="val"`` (``eoforge.datasets.eurosat``): training images are the
train scenes, scores are on the validation scenes carved from train, and the test scenes are never
read. Two kinds of run, each printing one JSON line (append them to
``results/eurosat_val_recipes.jsonl``):

* ``pretrain``: the encoder is trained by an objective for a fixed wall time in plain PyTorch
  (AdamW, linear warm-up, cosine by elapsed time; the objective's own code, without DeepSpeed, to
  compare recipes quickly), then its frozen features are probed (linear and kNN) at 10 and 100
  labels per class, label draws 0 and 1. ``random`` probes the untrained encoder.
* ``supervised``: the encoder is trained from scratch on the drawn labels
  (``finetune_classifier``) and scored on the validation scenes.

``table`` renders ``results/eurosat_val_recipes.jsonl`` as ``results/eurosat_val_recipes.md``: the
objectives per CPU-minute (the same wall time on the same 2 threads each) and the supervised
baseline's recipes.

Usage::

    python perf/eurosat_val_recipes.py pretrain '{"objective": "instance_contrast", "seconds": 300}'
    python perf/eurosat_val_recipes.py random '{}'
    python perf/eurosat_val_recipes.py supervised '{"labels_per_class": 10, "epochs": 100, "lr": 1e-3}'
    python perf/eurosat_val_recipes.py table '{}'
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from eoforge.datasets.eurosat import load_eurosat
from eoforge.finetune.features import extract_features
from eoforge.finetune.finetune import finetune_classifier
from eoforge.finetune.knn import knn_probe
from eoforge.finetune.linear import linear_probe
from eoforge.models import create_model
from eoforge.pretrain.objectives import objective_class

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DATA = Path(os.environ.get("EOFORGE_SAMPLE_DATA", REPO_ROOT.parent / "shared" / "data"))
ROOT = SAMPLE_DATA / "eurosat_rgb"
TEST_FRACTION = 0.25  # as perf/label_efficiency.py: the same test scenes stay unread
MODEL = {"patch_size": 16, "embed_dim": 192, "depth": 4, "num_heads": 3}


def split(labels_per_class: int | None = None, seed: int = 0):
    return load_eurosat(
        ROOT, split="val", test_fraction=TEST_FRACTION, labels_per_class=labels_per_class, seed=seed
    )


def probe(encoder: torch.nn.Module) -> dict:
    """{labels per class: [linear, kNN] validation accuracy, mean over label draws 0 and 1}."""
    out = {}
    for n in (10, 100):
        scores = []
        for seed in range(2):
            d = split(n, seed)
            wavelengths = torch.as_tensor(d.wavelengths)
            train, val = (
                extract_features(encoder, x, d.band_ids, wavelengths, progress=False)
                for x in (d.x_train, d.x_test)
            )
            y_train, y_val = torch.as_tensor(d.y_train), torch.as_tensor(d.y_test)
            linear = linear_probe(
                train, y_train, val, y_val, n_classes=10, seed=seed, progress=False
            )
            knn = knn_probe(train, y_train, val, y_val, n_classes=10)
            scores.append((linear.accuracy, knn.accuracy))
        out[n] = np.mean(scores, axis=0).round(4).tolist()
    return out


def pretrain(args: dict) -> dict:
    """Train ``args["objective"]`` for ``args["seconds"]`` on the train scenes' images, probe."""
    full = split()
    images = torch.from_numpy(full.x_train)
    torch.manual_seed(0)
    encoder = create_model("vit_tiny_patch16", **args.get("model", MODEL))
    objective = objective_class(args["objective"])(encoder, **args.get("kwargs", {}))
    lr, batch, budget = args.get("lr", 1e-3), args.get("batch", 128), args.get("seconds", 300)
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05, betas=(0.9, 0.95))
    view = {"band_ids": full.band_ids, "wavelengths": torch.as_tensor(full.wavelengths)}
    generator = torch.Generator().manual_seed(0)
    start, step = time.time(), 0
    while time.time() - start < budget:
        rows = torch.randint(0, len(images), (batch,), generator=generator)
        sample = view | {"image": images[rows], "gsd": torch.full((batch,), 10.0)}
        elapsed = (time.time() - start) / budget
        scale = (
            min(1.0, (step + 1) / args.get("warmup", 50)) * 0.5 * (1 + math.cos(math.pi * elapsed))
        )
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        if hasattr(objective, "set_progress"):  # schedules by the fraction of training done
            objective.set_progress(elapsed)
        loss = objective({full.band_ids[0].split(":")[0]: sample})["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
    return {
        "kind": "pretrain",
        **args,
        "steps": step,
        "images_per_s": round(step * batch / budget, 1),
        "val": probe(encoder),
    }


def supervised(args: dict) -> dict:
    d = split(args["labels_per_class"], 0)
    torch.manual_seed(0)
    encoder = create_model("vit_tiny_patch16", **args.get("model", MODEL))
    start = time.time()
    result = finetune_classifier(
        encoder, d.x_train, d.y_train, d.x_test, d.y_test, d.band_ids,
        torch.as_tensor(d.wavelengths), epochs=args["epochs"], lr=args["lr"], layer_decay=1.0,
        batch_size=64, seed=0, n_classes=10,
    )  # fmt: skip
    return {
        "kind": "supervised",
        **args,
        "val_accuracy": round(result.accuracy, 4),
        "seconds": round(time.time() - start),
    }


def describe(run: dict) -> str:
    """A run's recipe in a few words: objective, options, model, lr and budget."""
    model = run.get("model", MODEL)
    parts = [run.get("objective", "random weights")]
    if "tokenizer" in model:
        options = model.get("tokenizer_kwargs")
        parts.append(f"tokenizer {model['tokenizer']}" + (f" {options}" if options else ""))
    parts += [f"{k}={v}" for k, v in run.get("kwargs", {}).items()]
    parts.append(f"patch {model['patch_size']}, D={model['embed_dim']}, depth {model['depth']}")
    if run["kind"] == "pretrain":
        parts.append(f"lr {run.get('lr', 1e-3)}, batch {run.get('batch', 128)}")
    text = ", ".join(parts)
    return text + (f" ({run['note']})" if "note" in run else "")


def table(path: Path) -> str:
    """The Markdown of ``path``'s runs (module docstring)."""
    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    lines = [
        "# EuroSAT RGB validation split: recipes tried",
        "",
        "Scores on the validation scenes (split seed 0, test fraction 0.25, validation 0.2 of "
        "EuroSAT's scenes; the test scenes are never read), by `perf/eurosat_val_recipes.py`. "
        "Pretraining runs train for the same wall time on the same 2 threads (300 s = 10 "
        "CPU-minutes) in plain PyTorch, then probe frozen features; each cell is the mean over "
        "label draws 0 and 1.",
        "",
        "| recipe | steps in budget | images/s | linear @10 | kNN @10 | linear @100 | kNN @100 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        if run["kind"] in ("pretrain", "random"):
            val = run["val"]
            steps = run.get("steps", 0)
            speed = run.get("images_per_s", "-")
            lines.append(
                f"| {describe(run)} | {steps} | {speed} | {val['10'][0]:.4f} | {val['10'][1]:.4f} "
                f"| {val['100'][0]:.4f} | {val['100'][1]:.4f} |"
            )
    lines += [
        "",
        "Supervised from scratch (the bench's `supervised` baseline), label draw 0:",
        "",
        "| labels per class | epochs | lr | validation accuracy | seconds |",
        "|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        if run["kind"] == "supervised":
            lines.append(
                f"| {run['labels_per_class']} | {run['epochs']} | {run['lr']} | "
                f"{run['val_accuracy']:.4f} | {run['seconds']} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    kind, args = sys.argv[1], json.loads(sys.argv[2])
    if kind == "table":
        results = Path(__file__).parent / "results"
        md = table(results / "eurosat_val_recipes.jsonl")
        (results / "eurosat_val_recipes.md").write_text(md)
        print(md, end="")
        return
    torch.set_num_threads(args.pop("threads", 2))
    if kind == "random":
        torch.manual_seed(0)
        encoder = create_model("vit_tiny_patch16", **args.get("model", MODEL))
        print(json.dumps({"kind": "random", **args, "val": probe(encoder)}))
    elif kind == "pretrain":
        print(json.dumps(pretrain(args)))
    else:
        print(json.dumps(supervised(args)))


if __name__ == "__main__":
    main()
