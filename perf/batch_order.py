"""What the order of samples in the shards does to pretraining, on EuroSAT RGB's VALIDATION split.

The reader shuffles within a shard and fills each batch from one shard, so shards written in
class-folder order give batches of one class. This script trains the same MAE (the encoder and
decoder of ``eurosat_val_recipes.py``, plain PyTorch, AdamW, lr 1e-3 with 50 warm-up steps, batch
128) for the same number of steps on batches of ``ShardStream`` over two shard folders holding the
same images, the train scenes of the validation split:

* ``mixed``: built by ``data build --layout eurosat`` (samples written in a seeded random order);
* ``file_order``: the same samples rewritten in key order, i.e. class folder by class folder, as
  shards were written before the builder permuted them.

Then it probes the frozen encoder on the validation scenes (``eurosat_val_recipes.probe``: linear
and kNN at 10 and 100 labels per class, label draws 0 and 1), and reports how many classes the
first batches hold. The test scenes are never read. Results: ``results/batch_order.{json,md}``.

Usage: ``python perf/batch_order.py [--steps 2000] [--smoke] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from pathlib import Path

import torch
from eurosat_val_recipes import MODEL, ROOT, TEST_FRACTION, probe

from eoforge.datasets.errors import DataError
from eoforge.datasets.eurosat import build_eurosat_shards, find_images, scene_id, scene_splits
from eoforge.datasets.ingest import write_shard_folder
from eoforge.datasets.reader import ShardStream
from eoforge.datasets.shards import iter_tar_samples, list_shards, read_index
from eoforge.datasets.stats import compute_stats
from eoforge.models import create_model
from eoforge.pretrain.data import training_normaliser
from eoforge.pretrain.objectives import objective_class

from perf_report import machine, now

BATCH, LR, WARMUP = 128, 1e-3, 50
MAE = {"decoder_dim": 128, "decoder_depth": 2, "decoder_heads": 4}


def stage_train_scenes(work: Path, per_class: int | None) -> Path:
    """Symlinks to the RGB images of the validation split's train scenes (neither test nor
    validation), in EuroSAT's class folders."""
    _, folder, paths = find_images(ROOT, "rgb")
    splits = scene_splits([scene_id(p) for p in paths], test_fraction=TEST_FRACTION)
    staged, taken = work / "staged", collections.Counter()
    for path, split in zip(paths, splits, strict=True):
        taken[path.parent] += split == "train"
        if split != "train" or (per_class is not None and taken[path.parent] > per_class):
            continue
        link = staged / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path.resolve())
    return staged


def rewrite_in_key_order(mixed: Path, out: Path) -> None:
    """``mixed``'s samples, bytes unchanged, into ``out`` sorted by key (class folder order)."""
    raws = [raw for url in list_shards(mixed) for raw in iter_tar_samples(url)]
    members = [
        {k: bytes(v) for k, v in raw.items() if not k.startswith("__")}
        | {"__key__": raw["__key__"]}
        for raw in sorted(raws, key=lambda r: r["__key__"])
    ]
    index = read_index(mixed)

    def rows(counts: list[int]) -> dict:
        return index | {"shards": [{"name": f"shard-{i:06d}.tar", "samples": n}
                                   for i, n in enumerate(counts)]}  # fmt: skip

    size = index["shards"][0]["samples"]
    write_shard_folder(
        out, members, rows, shard_size=size, overwrite=False,
        empty=lambda: DataError(f"{mixed} holds no sample"), order_seed=None,
    )  # fmt: skip
    (out / "stats.json").write_text((mixed / "stats.json").read_text())


def classes_per_batch(folder: Path, batches: int) -> list[int]:
    """How many EuroSAT classes each of the first ``batches`` batches holds."""
    stream = ShardStream([str(folder)], training_normaliser([folder]), batch_size=BATCH, seed=0)
    counts, it = [], stream.iter_batches()
    for _ in range(batches):
        ids = next(it)["meta"]["id"]
        counts.append(len({i.split("_")[1] for i in ids}))  # S2RGB8_<Class>_<n>_r0_c0
    return counts


def pretrain_and_probe(folder: Path, steps: int) -> dict:
    """MAE for ``steps`` batches of ``folder``'s stream, then the validation probe."""
    torch.manual_seed(0)
    encoder = create_model("vit_tiny_patch16", **MODEL)
    objective = objective_class("mae")(encoder, **MAE)
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.05, betas=(0.9, 0.95))
    stream = ShardStream([str(folder)], training_normaliser([folder]), batch_size=BATCH, seed=0)
    batches, losses, start = stream.iter_batches(), {}, time.time()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = LR * min(1.0, (step + 1) / WARMUP)
        loss = objective(next(batches))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % max(1, steps // 8) == 0 or step == steps - 1:
            losses[step] = round(loss.item(), 4)
    return {"losses": losses, "train_s": round(time.time() - start), "val": probe(encoder)}


def markdown(result: dict) -> str:
    lines = [
        "# Sample order in the shards and what MAE learns (EuroSAT RGB validation split)",
        "",
        f"`perf/batch_order.py`, {result['date']}, {result['machine']['cpu_count']} CPUs; "
        f"{result['images']} train-scene images; MAE (ViT D=192, depth 4, patch 16, decoder "
        f"128x2), {result['steps']} steps of batch {BATCH}, lr {LR}. Validation scores: mean over "
        "label draws 0 and 1.",
        "",
        "| shards | classes per batch (first 8) | loss first / last | linear @10 | kNN @10 "
        "| linear @100 | kNN @100 |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for name, run in result["runs"].items():
        loss = list(run["losses"].values())
        val = run["val"]
        lines.append(
            f"| {name} | {run['classes_per_batch']} | {loss[0]:.4f} / {loss[-1]:.4f} | "
            f"{val[10][0]:.4f} | {val[10][1]:.4f} | {val[100][0]:.4f} | {val[100][1]:.4f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--smoke", action="store_true", help="20 images per class, 3 steps")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = 3 if args.smoke else args.steps
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        staged = stage_train_scenes(work, 20 if args.smoke else None)
        mixed, ordered = work / "mixed", work / "file_order"
        summary = build_eurosat_shards(staged, mixed, form="rgb", progress=False)
        compute_stats(mixed, progress=False)
        rewrite_in_key_order(mixed, ordered)
        runs = {}
        for name, folder in (("mixed", mixed), ("file_order", ordered)):
            runs[name] = {
                "classes_per_batch": classes_per_batch(folder, 8 if not args.smoke else 1)
            }
            runs[name] |= pretrain_and_probe(folder, steps)
            print(name, json.dumps(runs[name]), flush=True)
    result = {
        "date": now(),
        "machine": machine(),
        "smoke": args.smoke,
        "images": summary["samples"],
        "steps": steps,
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = "batch_order_smoke" if args.smoke else "batch_order"
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"{name}.md").write_text(markdown(result))
    print(markdown(result), end="")


if __name__ == "__main__":
    main()
