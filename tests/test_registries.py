"""Every registered protocol, dataset adapter and verb, tested through its registry: a new entry
is tested here without new test code. Protocols run end to end on tiny random splits (no sample
data needed); options are typed like a config."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import warnings
from importlib.metadata import entry_points

import pytest

from eoforge.datasets.errors import DataError
from eoforge.datasets.eval_datasets import EVAL_DATASETS, Adapter, dataset_options
from eoforge.finetune import bench, evaluate
from eoforge.finetune.protocols import PROTOCOLS, get_protocol
from eoforge.launch.cli import GROUP, build_parser, main
from eoforge.launch.config import ConfigError, config_from

from conftest import random_release

# Small enough for every protocol to train in a second on a CPU.
QUICK = {"epochs": 1, "batch_size": 4}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return random_release(tmp_path_factory.mktemp("release") / "s2", ("S2L2A",))


@pytest.fixture
def tiny_datasets(monkeypatch):
    """``tiny_<task>`` datasets registered beside the real ones."""
    tasks = ("classification", "multilabel", "segmentation", "change")
    tiny = {f"tiny_{t}": Adapter("tiny_splits:load_tiny", {"task": t}) for t in tasks}
    registry = dict(EVAL_DATASETS) | tiny
    monkeypatch.setattr("eoforge.datasets.eval_datasets.EVAL_DATASETS", registry)
    monkeypatch.setattr("eoforge.finetune.evaluate.EVAL_DATASETS", registry)


def quick_options(protocol) -> dict:
    names = {f.name for f in dataclasses.fields(protocol.options)}
    return {key: value for key, value in QUICK.items() if key in names}


@pytest.mark.parametrize("name", PROTOCOLS)
def test_protocol_declares_itself_under_its_name(name):
    protocol = get_protocol(name)
    assert protocol.name == name and PROTOCOLS[name].rsplit(".", 1)[1] == name
    defaults = protocol.options()  # every option has a default
    assert isinstance(defaults.seed, int)
    assert set(protocol.flags) <= {f.name for f in dataclasses.fields(protocol.options)}
    assert (
        protocol.summary and protocol.tasks and protocol.example.startswith(f"eoforge eval {name}")
    )


@pytest.mark.parametrize("name", PROTOCOLS)
def test_protocol_options_are_typed_and_named_in_errors(name, release):
    with pytest.raises(ConfigError, match="config key 'seed'"):
        evaluate.run_protocol(name, release, "indian_pines:/nowhere", seed="first")
    with pytest.raises(DataError, match=r"takes no option\(s\) \['bogus'\]"):
        evaluate.run_protocol(name, release, "indian_pines:/nowhere", bogus=1)


@pytest.mark.parametrize("name", PROTOCOLS)
def test_protocol_runs_on_each_task_it_scores_and_refuses_the_others(
    name, release, tiny_datasets, tmp_path
):
    protocol = get_protocol(name)
    for task in ("classification", "multilabel", "segmentation", "change"):
        dataset = f"tiny_{task}:{tmp_path}"
        options = quick_options(protocol)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tiny splits draw coverage warnings
            if task not in protocol.tasks:
                with pytest.raises(DataError, match=task):
                    evaluate.run_protocol(name, release, dataset, progress=False, **options)
                continue
            out = tmp_path / f"{task}.json"
            result = evaluate.run_protocol(
                name, release, dataset, progress=False, out=out, **options
            )
        assert result["protocol"] == name and json.loads(out.read_text()) == result
        assert result["split_hash"] == f"tiny-{task}-0" and result["n_test"] == 12


@pytest.mark.parametrize("name", PROTOCOLS)
def test_protocol_scores_a_bench_cell(name, release, tiny_datasets, tmp_path):
    protocol = get_protocol(name)
    suite = bench.Suite(
        name="tiny",
        seeds=[0, 1, 2],
        datasets=[{"name": f"tiny_{protocol.tasks[0]}", "root": str(tmp_path)}],
        protocols=[name],
        encoders=["release"],
        training=QUICK,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = bench.run_suite(suite, release, tmp_path / "out", progress=False)
    assert len(results["cells"]) == 3
    assert all(cell["metrics"] and cell["protocol"] == name for cell in results["cells"])


@pytest.mark.parametrize("name", sorted(EVAL_DATASETS))
def test_dataset_options_are_a_typed_config(name):
    schema = dataset_options(name)
    assert "root" not in {f.name for f in dataclasses.fields(schema)}
    assert "seed" not in {f.name for f in dataclasses.fields(schema)}
    required = [f.name for f in dataclasses.fields(schema) if f.default is dataclasses.MISSING]
    if required:
        with pytest.raises(ConfigError, match=f"config key '{required[0]}'"):
            config_from(schema, {})
    else:
        config_from(schema, {})  # the adapter's defaults are a valid config
    with pytest.raises(ConfigError, match="config key 'bogus'"):
        config_from(schema, {"bogus": 1})


VERBS = sorted(ep.name for ep in entry_points(group=GROUP))


def test_every_verb_is_registered_by_the_layer_that_runs_it():
    layers = {"datasets", "models", "pretrain", "finetune", "launch"}
    for ep in entry_points(group=GROUP):
        assert ep.module.split(".")[1] in layers, ep
        assert ep.module.endswith(".commands"), ep
    assert set(build_parser().verbs) == {tuple(name.split(".")) for name in VERBS}


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as done:
        main([*verb.split("."), "--help"])
    assert done.value.code == 0
    assert "usage: eoforge " + verb.replace(".", " ") in capsys.readouterr().out


def test_registering_every_verb_imports_no_heavy_module():
    """Verb modules import torch, deepspeed and the readers inside their run functions, so the
    help of any verb reads without them."""
    code = (
        "import sys; from eoforge.launch.cli import build_parser; build_parser(); "
        "print(sorted({'torch', 'deepspeed', 'rasterio', 'numpy'} & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
