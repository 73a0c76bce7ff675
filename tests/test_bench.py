"""The benchmark harness on real Indian Pines: cells over datasets x protocols x encoders x seeds,
resumed where a run stopped, tables with 95% intervals, a plot, and the compare table; kNN through
the CLI."""

from __future__ import annotations

import csv
import json
import re
import warnings

import pytest

from eoforge.finetune import bench, evaluate
from eoforge.launch.cli import main

from conftest import random_release


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A random-weight S2 release: Indian Pines' AVIRIS bands are unseen by it."""
    return random_release(tmp_path_factory.mktemp("release") / "random_s2", ("S2L2A",))


@pytest.fixture
def suite_file(sample_data, tmp_path):
    path = tmp_path / "pines.yaml"
    path.write_text(
        "name: pines\n"
        "seeds: [0, 1, 2]\n"
        "datasets:\n"
        f"  - {{name: indian_pines, root: {sample_data / 'indian_pines_aviris'},\n"
        "     options: {window: 8, max_train: 96, max_test: 64}}\n"
        "protocols: [linear, knn]\n"
        "encoders: [release, random_init]\n"
    )
    return path


def run(suite_file, release, out):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # AVIRIS bands unseen by the S2 release, on every load
        return bench.run_suite(bench.load_suite(suite_file), release, out, progress=False)


def test_suite_runs_every_cell_and_writes_the_tables(suite_file, release, tmp_path):
    out = tmp_path / "out"
    results = run(suite_file, release, out)
    assert len(results["cells"]) == 1 * 3 * 2 * 2
    rows = {(r["protocol"], r["encoder"], r["metric"]): r for r in results["rows"]}
    assert set(rows) == {
        (p, e, m)
        for e in ("release", "random_init", "release - random_init")
        for p, m in (("linear", "accuracy"), ("knn", "accuracy"), ("knn", "balanced_accuracy"))
    }
    # What pretraining adds: differences paired seed by seed on the same split.
    by_cell = {(c["protocol"], c["encoder"], c["seed"]): c["metrics"] for c in results["cells"]}
    differences = [
        by_cell["linear", "release", s]["accuracy"]
        - by_cell["linear", "random_init", s]["accuracy"]
        for s in (0, 1, 2)
    ]
    paired = rows["linear", "release - random_init", "accuracy"]
    assert paired["mean"] == pytest.approx(sum(differences) / 3)
    for row in rows.values():
        assert row["n_seeds"] == 3 and row["seeds"] == [0, 1, 2]
        assert -1.0 <= row["mean"] <= 1.0 and 0.0 <= row["ci95"] < 1.0
        assert row["band_policy"] == "interpolated: 200 of 200 bands unseen in pretraining"
    # The three seeds cut three different splits, so the interval has a spread to measure.
    hashes = {c["split_hash"] for c in results["cells"]}
    assert len(hashes) == 3
    assert json.loads((out / "results.json").read_text())["rows"] == results["rows"]
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    table = (out / "results.md").read_text()
    body = [line for line in table.splitlines() if line.startswith("| indian_pines |")]
    assert len(body) == len(rows) and all(" ± " in line for line in body)
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_stopped_run_continues_with_the_missing_cells_only(
    suite_file, release, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    first = run(suite_file, release, out)
    lines = (out / "cells.jsonl").read_text().splitlines()
    # A run killed while writing its last cell: that line is cut short.
    (out / "cells.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    encoded = []
    real = bench.prepare_split
    monkeypatch.setattr(
        bench, "prepare_split", lambda *a: encoded.append((a[1]["name"], *a[2:4])) or real(*a)
    )
    second = run(suite_file, release, out)
    last = json.loads(lines[-1])
    assert encoded == [("indian_pines", last["seed"], last["encoder"])]
    assert second["rows"] == first["rows"]  # the cell ran again with the same seed
    encoded.clear()
    run(suite_file, release, out)
    assert encoded == []  # everything finished: nothing runs


def test_suite_errors_name_the_key(tmp_path, sample_data):
    root = sample_data / "indian_pines_aviris"
    cases = {
        "seeds: [0, 1]": "at least 3 distinct seeds",
        "seeds: [0, 1, 2]\nprotocols: [linear, detection]": "unknown protocol 'detection'",
        "seeds: [0, 1, 2]\nencoders: [scratch]": "unknown encoder 'scratch'",
        "seeds: [0, 1, 2]\nmetric: accuracy": "unknown key(s) ['metric']",
    }
    for body, message in cases.items():
        path = tmp_path / "s.yaml"
        path.write_text(f"name: x\n{body}\ndatasets: [{{name: indian_pines, root: {root}}}]\n")
        with pytest.raises(ValueError, match=re.escape(message)):
            bench.load_suite(path)
    path.write_text("name: x\nseeds: [0, 1, 2]\ndatasets: [{name: pines, root: /d}]\n")
    with pytest.raises(ValueError, match="unknown dataset 'pines'"):
        bench.load_suite(path)


def test_compare_puts_two_results_side_by_side(suite_file, release, tmp_path, capsys):
    run(suite_file, release, tmp_path / "a")
    b = json.loads((tmp_path / "a" / "results.json").read_text())
    for row in b["rows"]:
        row["mean"] += 0.125
    (tmp_path / "b.json").write_text(json.dumps(b))
    assert (
        main(["bench", "compare", str(tmp_path / "a" / "results.json"), str(tmp_path / "b.json")])
        == 0
    )
    table = capsys.readouterr().out.splitlines()
    assert "B - A" in table[0] and len(table) == 2 + len(b["rows"])
    assert all(line.endswith("| +0.1250 |") for line in table[2:])


def test_eval_knn_from_the_cli(sample_data, release, tmp_path, capsys):
    out = tmp_path / "knn.json"
    dataset = f"indian_pines:{sample_data / 'indian_pines_aviris'}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main([
            "eval", "knn", "--release", str(release), "--dataset", dataset, "--out", str(out),
            "window=8", "max_train=200", "max_test=100", "k=5",
        ])  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    assert result["protocol"] == "knn" and result["k"] == 5 and result["n_train"] == 200
    # Random projections of the spectra keep neighbourhoods: kNN beats the majority class.
    assert result["accuracy"] > result["majority_baseline"]


def test_trained_protocols_and_the_supervised_baseline(sample_data, release, tmp_path):
    """A segmentation row per encoder on the Indian Pines map, and a supervised encoder (trained
    with the split's labels first) probed beside the release."""
    path = tmp_path / "dense.yaml"
    root = sample_data / "indian_pines_aviris"
    path.write_text(
        "name: dense\nseeds: [0, 1, 2]\n"
        f"datasets:\n  - {{name: indian_pines_map, root: {root}}}\n"
        "  - {name: indian_pines, root: "
        + str(root)
        + ", options: {window: 8, max_train: 64, max_test: 32}}\n"
        "protocols: [segmentation, knn]\nencoders: [release, supervised]\n"
        "training: {epochs: 1, batch_size: 8}\n"
    )
    suite = bench.load_suite(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # kNN scores image labels, not a map: the suite stops at the first such cell, naming
        # it; so does a supervised baseline asked for on a map.
        with pytest.raises(ValueError, match="knn scores image labels, not segmentation"):
            bench.run_suite(suite, release, tmp_path / "out", progress=False)
        suite.encoders = ["supervised"]
        with pytest.raises(ValueError, match="supervised baseline needs image labels"):
            bench.run_suite(suite, release, tmp_path / "out1", progress=False)
        suite.encoders = ["release", "random_init"]
        suite.datasets = suite.datasets[:1]
        suite.protocols = ["segmentation"]
        results = bench.run_suite(suite, release, tmp_path / "out2", progress=False)
        rows = {(r["encoder"], r["metric"]) for r in results["rows"]}
        assert ("release", "miou") in rows and ("release - random_init", "miou") in rows
        suite.datasets = bench.load_suite(path).datasets[1:]
        suite.encoders, suite.protocols = ["supervised"], ["knn"]
        supervised = bench.run_suite(suite, release, tmp_path / "out3", progress=False)
    assert {c["encoder"] for c in supervised["cells"]} == {"supervised"}
    assert all(0.0 <= c["metrics"]["accuracy"] <= 1.0 for c in supervised["cells"])


def test_a_linear_cell_scores_what_eval_linear_scores_for_its_seed(suite_file, release, tmp_path):
    """The seed of a cell seeds its probe (hold-out and shuffling) as ``eval linear --seed`` does,
    so a bench row and the eval command agree on the same split, and seeds vary the probe too."""
    suite = bench.load_suite(suite_file)
    suite.protocols, suite.encoders = ["linear"], ["release"]
    entry = suite.datasets[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = bench.run_suite(suite, release, tmp_path / "out", progress=False)
        for cell in results["cells"]:
            alone = evaluate.run_protocol(
                "linear",
                release,
                f"{entry['name']}:{entry['root']}",
                seed=cell["seed"],
                progress=False,
                **entry["options"],
            )
            assert alone["split_hash"] == cell["split_hash"]
            assert alone["accuracy"] == cell["metrics"]["accuracy"], cell["seed"]
            assert alone["best_lr"] == cell["details"]["best_lr"], cell["seed"]
            assert alone["lr_at_grid_edge"] == cell["details"]["lr_at_grid_edge"]
    # The table says how many cells chose a learning rate at the end of the grid.
    edge = sum(cell["details"]["lr_at_grid_edge"] for cell in results["cells"])
    table = (tmp_path / "out" / "results.md").read_text()
    sentence = f"In {edge} of {len(results['cells'])} linear-probe cells"
    assert (sentence in table) == (edge > 0)


def test_the_table_counts_linear_cells_whose_rate_sits_at_the_grid_edge():
    def cell(protocol: str, edge: bool) -> dict:
        return {"protocol": protocol, "details": {"lr_at_grid_edge": edge}}

    results = {
        "suite": {"name": "s", "seeds": [0, 1, 2]},
        "release": "r",
        "rows": [],
        "cells": [cell("linear", True), cell("linear", False), cell("linear", True)]
        + [cell("knn", False)],
    }
    assert "In 2 of 3 linear-probe cells the selected learning rate" in bench.markdown(results)
    results["cells"] = [cell("linear", False), cell("knn", False)]
    assert "linear-probe cells" not in bench.markdown(results)


def test_entries_are_keyed_by_id_and_never_merge(sample_data, release, tmp_path):
    """Two entries of one dataset (EuroSAT MS at 10 and 20 labels per class) keep rows of their
    own; an entry's encoders and training options apply to it alone; cells record each entry."""
    root = sample_data / "eurosat_ms_subset"
    suite = bench.Suite(
        name="ids",
        seeds=[0, 1, 2],
        datasets=[
            {"id": "ms_5", "name": "eurosat", "root": str(root), "options": {"labels_per_class": 5},
             "encoders": ["release"]},
            {"id": "ms_6", "name": "eurosat", "root": str(root), "options": {"labels_per_class": 6}},
        ],
        protocols=["knn"],
        encoders=["release", "random_init"],
    )  # fmt: skip
    results = bench.run_suite(suite, release, tmp_path / "out", progress=False)
    cells = {(c["dataset"], c["encoder"], c["seed"]): c for c in results["cells"]}
    assert len(cells) == 3 + 6  # ms_5: the release only; ms_6: both encoders
    assert {c["n_train"] for k, c in cells.items() if k[0] == "ms_5"} == {50}
    assert {c["n_train"] for k, c in cells.items() if k[0] == "ms_6"} == {60}
    assert cells["ms_5", "release", 0]["options"] == {"labels_per_class": 5}
    assert cells["ms_5", "release", 0]["root"] == str(root)
    rows = {(r["dataset"], r["encoder"], r["metric"]) for r in results["rows"]}
    assert ("ms_6", "release - random_init", "accuracy") in rows
    assert ("ms_5", "release - random_init", "accuracy") not in rows
    row = next(r for r in results["rows"] if r["dataset"] == "ms_5")
    assert row["root"] == str(root) and row["options"] == {"labels_per_class": 5}
    # The same test scenes for every seed and both label counts: only the label draws move.
    assert len({c["split_hash"] for c in results["cells"]}) == 6  # 2 entries x 3 label draws


def test_two_entries_of_one_name_need_ids(sample_data, tmp_path):
    root = sample_data / "eurosat_ms_subset"
    path = tmp_path / "twice.yaml"
    path.write_text(
        "name: twice\nseeds: [0, 1, 2]\ndatasets:\n"
        f"  - {{name: eurosat, root: {root}}}\n"
        f"  - {{name: eurosat, root: {root}, options: {{form: ms}}}}\n"
    )
    with pytest.raises(
        bench.DataError, match=r"datasets\[0\] and datasets\[1\] are both 'eurosat'"
    ):
        bench.load_suite(path)
    path.write_text(
        "name: odd\nseeds: [0, 1, 2]\nencoders: [release]\ndatasets:\n"
        f"  - {{name: eurosat, root: {root}, encoders: [supervised]}}\n"
    )
    with pytest.raises(bench.DataError, match=r"names encoder\(s\) \['supervised'\] the suite"):
        bench.load_suite(path)
