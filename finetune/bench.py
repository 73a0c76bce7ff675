"""The benchmark harness: datasets x protocols x encoders x seeds, resumable, with mean and 95%
confidence interval over seeds for every row.

A suite (YAML)::

    name: pines
    seeds: [0, 1, 2]                 # at least 3: a row's interval needs a spread
    datasets:
      - {name: indian_pines, root: ../shared/data/indian_pines_aviris,
         options: {window: 8, max_train: 600, max_test: 600}}
      - {id: eurosat_rgb_10, name: eurosat, root: ../shared/data/eurosat_rgb,
         options: {labels_per_class: 10}, encoders: [release, random_init]}
    protocols: [linear, knn]          # any of eoforge.finetune.protocols.PROTOCOLS
    encoders: [release, random_init, supervised]
    training: {epochs: 10, batch_size: 16}   # trained protocols and the supervised baseline

``training`` takes the options of the trained protocols (``protocols.trained.TrainedOptions``)
but ``seed``, which is each cell's; it is checked like them, and only the keys given are passed,
so each protocol keeps its own defaults for the others.

Each dataset entry is keyed by its ``id`` (default: its name; two entries without distinct ids
are an error, so two folders never merge into one row); an entry's ``encoders`` may name a
subset of the suite's, and its ``training`` overrides the suite's for that entry (the supervised
baseline's recipe can then follow the entry's label count). Every cell records the entry's name, root and options.

Encoders: the release; its architecture with random weights (``random_init``: under frozen
probes it shows what pretraining adds, under trained protocols it is training from scratch);
and that random encoder trained with the split's labels first (``supervised``, a small model
trained from scratch on the same split, for image-label datasets). Every (dataset, seed) split is
cut once, its encoder built and its features extracted once per encoder and shared by the
protocols. Each finished cell is appended to ``cells.jsonl`` in the output folder at once,
so a run that stops is continued by running it again: finished cells are skipped. The output
folder then gets ``results.json`` (suite, release, every cell, the summary rows),
``results.csv``, ``results.md`` and ``results.png``; every row names its band-handling policy.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from eoforge.datasets.errors import DataError
from eoforge.finetune.evaluate import band_policy, dataset_release, load_split, parse_dataset
from eoforge.finetune.features import extract_features, resolve_device
from eoforge.finetune.metrics import mean_ci95
from eoforge.finetune.protocols import PROTOCOLS, get_protocol
from eoforge.finetune.protocols.finetune import train as train_classifier
from eoforge.finetune.protocols.trained import TrainedOptions
from eoforge.launch.config import config_from
from eoforge.models import create_model
from eoforge.models.release import Release

ENCODERS = ("release", "random_init", "supervised")
CELLS, RESULTS = "cells.jsonl", "results"
MIN_SEEDS = 3


@dataclass
class Suite:
    """A benchmark suite (module docstring)."""

    name: str
    seeds: list[int]
    datasets: list[dict]
    protocols: list[str] = field(default_factory=lambda: ["linear", "knn"])
    encoders: list[str] = field(default_factory=lambda: ["release", "random_init"])
    # Options of the trained protocols and of the supervised baseline's training.
    training: dict = field(default_factory=lambda: {"epochs": 10, "batch_size": 16})


def load_suite(path: str | Path) -> Suite:
    """Read and check a suite file.

    Raises:
        DataError: naming the file and the key, protocol, encoder or dataset at fault.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"suite {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    known = set(Suite.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise DataError(f"{path}: unknown key(s) {unknown}; a suite has {sorted(known)}")
    for key in ("name", "seeds", "datasets"):
        if key not in data:
            raise DataError(f"{path}: missing key {key!r}")
    suite = Suite(**data)
    if len(set(suite.seeds)) < MIN_SEEDS:
        raise DataError(
            f"{path}: seeds {suite.seeds}: give at least {MIN_SEEDS} distinct seeds, so that "
            "every row has a confidence interval"
        )
    for kind, names, allowed in (
        ("protocol", suite.protocols, PROTOCOLS),
        ("encoder", suite.encoders, ENCODERS),
    ):
        for name in names:
            if name not in allowed:
                raise DataError(f"{path}: unknown {kind} {name!r}; known: {', '.join(allowed)}")
    check_entries(suite, path)
    return suite


def check_training(training: dict, where: str) -> None:
    """A suite's or an entry's ``training`` options: those of the trained protocols but
    ``seed``, of their types.

    Raises:
        DataError: naming ``where`` and a key that is no training option.
        ConfigError: naming ``where`` and a key of the wrong type.
    """
    unknown = sorted(set(training) - (set(TrainedOptions.__dataclass_fields__) - {"seed"}))
    if unknown:
        raise DataError(
            f"{where}: unknown training option(s) {unknown}; see "
            "eoforge.finetune.protocols.trained.TrainedOptions (seed is each cell's)"
        )
    config_from(TrainedOptions, training, where)


ENTRY_KEYS = {"id", "name", "root", "options", "encoders", "training"}


def check_entries(suite: Suite, where: str | Path) -> None:
    """Each dataset entry: known keys, a known dataset, encoders of the suite, a unique id.

    Raises:
        DataError: naming ``where``, the entry and the key at fault.
    """
    check_training(suite.training, f"{where}: training")
    seen: dict[str, int] = {}
    for i, entry in enumerate(suite.datasets):
        if not isinstance(entry, dict) or not {"name", "root"} <= set(entry):
            raise DataError(f"{where}: datasets[{i}] needs name and root, got {entry!r}")
        unknown = sorted(set(entry) - ENTRY_KEYS)
        if unknown:
            raise DataError(
                f"{where}: datasets[{i}] has unknown key(s) {unknown}; {sorted(ENTRY_KEYS)}"
            )
        parse_dataset(f"{entry['name']}:{entry['root']}")  # an unknown name fails here
        check_training(entry.get("training", {}), f"{where}: datasets[{i}].training")
        extra = sorted(set(entry.get("encoders", [])) - set(suite.encoders))
        if extra:
            raise DataError(
                f"{where}: datasets[{i}] names encoder(s) {extra} the suite does not run "
                f"({suite.encoders})"
            )
        key = entry_id(entry)
        if key in seen:
            raise DataError(
                f"{where}: datasets[{seen[key]}] and datasets[{i}] are both {key!r}; give each "
                "an id of its own"
            )
        seen[key] = i


def entry_id(entry: dict) -> str:
    """The key of a dataset entry in cells and rows: its ``id``, else its dataset name."""
    return str(entry.get("id", entry["name"]))


def entry_encoders(suite: Suite, entry: dict) -> list[str]:
    """The encoders scored on an entry, in the suite's order."""
    wanted = entry.get("encoders", suite.encoders)
    return [e for e in suite.encoders if e in wanted]


def planned_cells(suite: Suite) -> list[tuple[dict, int, str, str]]:
    """(entry, seed, encoder, protocol) of every cell, grouped by (entry, seed, encoder)."""
    return [
        (entry, seed, encoder, protocol)
        for entry in suite.datasets
        for seed in suite.seeds
        for encoder in entry_encoders(suite, entry)
        for protocol in suite.protocols
    ]


def cell_key(dataset: str, protocol: str, encoder: str, seed: int) -> str:
    return f"{dataset}|{protocol}|{encoder}|{seed}"


def run_suite(
    suite: Suite,
    release: str | Path,
    out: str | Path,
    *,
    device: str | None = None,
    progress: bool = True,
) -> dict:
    """Run every cell of ``suite`` not yet in ``out/cells.jsonl``, then write the results.

    Args:
        suite: from ``load_suite``.
        release: release folder scored (and whose architecture the baselines use).
        out: output folder (created).
        device: where encoders run (``features.resolve_device``: default CUDA when present).
        progress: a progress bar over the cells.

    Returns:
        The contents of results.json.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    check_entries(suite, suite.name)
    where = resolve_device(device)
    done = read_cells(out / CELLS)
    todo = [
        (entry, seed, encoder, protocol)
        for entry, seed, encoder, protocol in planned_cells(suite)
        if cell_key(entry_id(entry), protocol, encoder, seed) not in done
    ]
    with tqdm(
        total=len(todo), desc=f"bench {suite.name}", unit="cell", disable=not progress
    ) as bar:
        # Cells come grouped by (dataset, seed, encoder): one encoder and one feature extraction
        # serve every protocol of the group, and one split every encoder of (dataset, seed).
        group, prepared, split = None, None, (None, None)
        for entry, seed, encoder, protocol in todo:
            if group != (entry_id(entry), seed, encoder):
                group = (entry_id(entry), seed, encoder)
                if split[0] != group[:2]:
                    where_from = f"{entry['name']}:{entry['root']}"
                    split = (group[:2], load_split(where_from, seed, **entry.get("options", {})))
                training = suite.training | entry.get("training", {})
                prepared = prepare_split(split[1], entry, seed, encoder, release, training, where)
            cell = score(prepared, protocol, seed) | {
                "dataset": entry_id(entry),
                "dataset_name": entry["name"],
                "root": str(entry["root"]),
                "options": entry.get("options", {}),
                "protocol": protocol,
                "encoder": encoder,
                "seed": seed,
            }
            append_cell(out / CELLS, cell)
            done[cell_key(entry_id(entry), protocol, encoder, seed)] = cell
            bar.update()
    cells = [done[cell_key(entry_id(e), p, enc, s)] for e, s, enc, p in planned_cells(suite)]
    results = {
        "suite": asdict(suite),
        "release": str(Path(release).resolve()),
        "cells": cells,
        "rows": summarise(cells),
    }
    write_results(out, results)
    return results


@dataclass
class PreparedSplit:
    """One dataset split with one encoder, and what the rows report."""

    data: object  # the dataset's LabelledSplit
    loaded: Release  # the release loaded for the dataset's bands (ids and wavelengths)
    model: nn.Module  # the encoder of the row: the release's, or a baseline
    band_policy: str
    training: dict  # the suite's training options (trained protocols, the supervised baseline)
    features: tuple[torch.Tensor, torch.Tensor] | None = None  # frozen [N, D], [M, D]; lazy
    feature_images_per_s: float | None = None

    def frozen_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.features is None:
            ids = (self.loaded.band_ids, self.loaded.wavelengths)
            start = time.perf_counter()
            self.features = tuple(
                extract_features(self.model, x, *ids, progress=False)
                for x in (self.data.x_train, self.data.x_test)
            )
            n_images = len(self.data.x_train) + len(self.data.x_test)
            self.feature_images_per_s = round(n_images / (time.perf_counter() - start), 1)
        return self.features

    def feature_provenance(self) -> dict:
        """The frozen features' rate and device, for a cell (after ``frozen_features``)."""
        device = str(next(self.model.parameters()).device)
        return {"feature_images_per_s": self.feature_images_per_s, "device": device}


def prepare_split(
    data,
    entry: dict,
    seed: int,
    encoder: str,
    release: str | Path,
    training: dict,
    device: torch.device | None = None,
) -> PreparedSplit:
    """Build the row's encoder for the dataset split ``data`` (the entry's, for ``seed``):
    ``release``; or its architecture with random weights drawn from ``seed`` (``random_init``:
    frozen probes then show what pretraining adds, and trained protocols train it from
    scratch); or that random encoder first trained with labels on the split (``supervised``,
    image-label datasets)."""
    loaded = dataset_release(release, data)
    model = loaded.encoder
    if encoder != "release":
        config = json.loads((Path(release) / "config.json").read_text())
        torch.manual_seed(seed)
        model = create_model(config["architecture"], **config["kwargs"]).eval()
    model.to(device or torch.device("cpu"))
    if encoder == "supervised":
        if data.task not in ("classification", "multilabel"):
            raise DataError(
                f"the supervised baseline needs image labels; {entry['name']} is {data.task}"
            )
        _, trained = train_classifier(model, data, loaded, seed, **training)
        model = trained.encoder.eval()
    return PreparedSplit(data, loaded, model, band_policy(data.band_ids, loaded.card), training)


def score(split: PreparedSplit, protocol: str, seed: int) -> dict:
    """One protocol on one prepared split: its metrics and provenance."""
    data = split.data
    common = {"split_hash": data.split_hash, "band_policy": split.band_policy}
    common |= {"n_train": len(data.y_train), "n_test": len(data.y_test)}
    return common | get_protocol(protocol).cell(split, seed, split.training)


def summarise(cells: Sequence[dict]) -> list[dict]:
    """One row per (dataset, protocol, encoder, metric): mean and 95% half-width over seeds; and
    for each baseline, the paired difference ``release - baseline`` seed by seed (both were
    scored on the same split, so the difference's interval is the one that says whether
    pretraining added anything)."""
    groups: dict[tuple, list[dict]] = {}
    for cell in cells:
        for metric in cell["metrics"]:
            key = (cell["dataset"], cell["protocol"], cell["encoder"], metric)
            groups.setdefault(key, []).append(cell)
    rows = [
        _row(key, [c["metrics"][key[3]] for c in group], group) for key, group in groups.items()
    ]
    for (dataset, protocol, encoder, metric), group in groups.items():
        release = groups.get((dataset, protocol, "release", metric))
        if encoder == "release" or release is None:
            continue
        ours = {c["seed"]: c["metrics"][metric] for c in release}
        paired = [c for c in group if c["seed"] in ours]
        if paired:
            differences = [ours[c["seed"]] - c["metrics"][metric] for c in paired]
            key = (dataset, protocol, f"release - {encoder}", metric)
            rows.append(_row(key, differences, paired))
    return rows


def _row(key: tuple, values: list[float], cells: list[dict]) -> dict:
    dataset, protocol, encoder, metric = key
    mean, half = mean_ci95(values)
    return {
        "dataset": dataset,
        "protocol": protocol,
        "encoder": encoder,
        "metric": metric,
        "mean": mean,
        "ci95": half,
        "n_seeds": len(values),
        "seeds": [c["seed"] for c in cells],
        "band_policy": "; ".join(sorted({c["band_policy"] for c in cells})),
        # Where the row's data came from (cells of older runs may lack it).
        "root": cells[0].get("root"),
        "options": cells[0].get("options"),
    }


def read_cells(path: Path) -> dict[str, dict]:
    """Finished cells by key; a line cut short by a crash is ignored (its cell runs again)."""
    cells = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                cell = json.loads(line)
            except json.JSONDecodeError:
                continue
            cells[cell_key(cell["dataset"], cell["protocol"], cell["encoder"], cell["seed"])] = cell
    return cells


def append_cell(path: Path, cell: dict) -> None:
    """Append one cell as a line, synced: after a crash the file holds every finished cell."""
    # A line cut short by a crash gets its end here, so the new cell starts a line of its own.
    torn = path.is_file() and path.stat().st_size and path.read_bytes()[-1:] != b"\n"
    with open(path, "a") as f:
        f.write(("\n" if torn else "") + json.dumps(cell) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_results(out: Path, results: dict) -> None:
    (out / f"{RESULTS}.json").write_text(json.dumps(results, indent=2))
    fields = ["dataset", "protocol", "encoder", "metric", "mean", "ci95", "n_seeds", "band_policy"]
    with open(out / f"{RESULTS}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results["rows"])
    (out / f"{RESULTS}.md").write_text(markdown(results))
    plot(results["rows"], out / f"{RESULTS}.png", results["suite"]["name"])


def markdown(results: dict) -> str:
    suite = results["suite"]
    lines = [
        f"# {suite['name']}: {results['release']}",
        "",
        f"Seeds {suite['seeds']}; mean ± half-width of the 95% Student t interval over seeds. "
        "Rows `release - <baseline>` are paired differences on the same splits: pretraining "
        "added something where their interval excludes 0.",
        "",
        "| dataset | protocol | encoder | metric | mean ± 95% CI | seeds | band policy |",
        "|---|---|---|---|---:|---:|---|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['dataset']} | {r['protocol']} | {r['encoder']} | {r['metric']} | "
            f"{r['mean']:.4f} ± {r['ci95']:.4f} | {r['n_seeds']} | {r['band_policy']} |"
        )
    edge, linear = grid_edge_cells(results["cells"])
    if edge:
        lines += [
            "",
            f"In {edge} of {linear} linear-probe cells the selected learning rate is "
            "the grid's largest or smallest: a better one may lie beyond the grid.",
        ]
    return "\n".join(lines) + "\n"


def grid_edge_cells(cells: Sequence[dict]) -> tuple[int, int]:
    """(linear-probe cells whose selected learning rate is an end of the grid, linear cells)."""
    linear = [c for c in cells if c["protocol"] == "linear"]
    return sum(bool(c["details"].get("lr_at_grid_edge")) for c in linear), len(linear)


def plot(rows: Sequence[dict], path: Path, title: str) -> None:
    """Bars of each (dataset, protocol, metric) per encoder, with the 95% interval as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["dataset"], r["protocol"], r["metric"]) for r in rows})
    encoders = sorted({r["encoder"] for r in rows})
    width = 0.8 / max(1, len(encoders))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(groups)), 3.6))
    for j, encoder in enumerate(encoders):
        by_group = {
            (r["dataset"], r["protocol"], r["metric"]): r for r in rows if r["encoder"] == encoder
        }
        xs = [i + (j - (len(encoders) - 1) / 2) * width for i in range(len(groups))]
        means = [by_group[g]["mean"] if g in by_group else float("nan") for g in groups]
        errors = [by_group[g]["ci95"] if g in by_group else 0.0 for g in groups]
        ax.bar(xs, means, width, yerr=errors, capsize=3, label=encoder)
    ax.set_xticks(range(len(groups)), [f"{d}\n{p} {m}" for d, p, m in groups], fontsize=8)
    ax.set_ylabel("score (mean ± 95% CI)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare(a: str | Path, b: str | Path) -> str:
    """A side-by-side Markdown table of two results.json files, row by row."""
    rows = {}
    for side, path in (("a", a), ("b", b)):
        for r in json.loads(Path(path).read_text())["rows"]:
            key = (r["dataset"], r["protocol"], r["encoder"], r["metric"])
            rows.setdefault(key, {})[side] = r
    lines = [
        f"| dataset | protocol | encoder | metric | A: {a} | B: {b} | B - A |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for (dataset, protocol, encoder, metric), pair in sorted(rows.items()):
        cells = [
            f"{pair[s]['mean']:.4f} ± {pair[s]['ci95']:.4f}" if s in pair else "-" for s in "ab"
        ]
        delta = f"{pair['b']['mean'] - pair['a']['mean']:+.4f}" if len(pair) == 2 else "-"
        lines.append(
            f"| {dataset} | {protocol} | {encoder} | {metric} | {cells[0]} | {cells[1]} | {delta} |"
        )
    return "\n".join(lines) + "\n"
