"""Evaluation on a chosen device: ``--device`` for eval, bench and embed, features in batches
(bf16 autocast on CUDA, fp32 on the CPU), and the images/s each result reports."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from eoforge.finetune import bench
from eoforge.finetune.evaluate import run_protocol
from eoforge.finetune.features import resolve_device
from eoforge.launch.cli import main

from conftest import random_release

MS = "eurosat_ms_subset"
SMALL = {"labels_per_class": 5}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A random-weight release over EuroSAT MS's 13 S2L1C bands."""
    return random_release(tmp_path_factory.mktemp("release") / "random_s2l1c", ("S2L1C",))


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # B10 falls in no spectral range, expectedly
        return fn(*args, **kwargs)


def test_default_device_is_cuda_when_present():
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: no CUDA device.*--device cpu"):
            resolve_device("cuda")


def test_cpu_results_name_the_device_and_the_feature_rate(sample_data, release, tmp_path):
    dataset = f"eurosat:{sample_data / MS}"
    result = quiet(run_protocol, "linear", release, dataset, device="cpu", progress=False, **SMALL)
    assert result["device"] == "cpu" and result["feature_images_per_s"] > 0
    out = tmp_path / "knn.json"
    argv = ["eval", "knn", "--release", str(release), "--dataset", dataset, "--device", "cpu"]
    assert quiet(main, [*argv, "--out", str(out), "labels_per_class=5"]) == 0
    knn = json.loads(out.read_text())
    assert knn["device"] == "cpu" and knn["feature_images_per_s"] > 0
    assert knn["n_train"] == 50


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where CUDA is absent")
def test_cuda_where_there_is_none_is_a_one_line_error(sample_data, release, capsys):
    argv = ["eval", "knn", "--release", str(release), "--dataset", f"eurosat:{sample_data / MS}"]
    with pytest.raises(SystemExit) as stopped:  # argparse refuses it before anything runs
        main([*argv, "--device", "cuda"])
    assert stopped.value.code == 2
    assert "no CUDA device is present here; use --device cpu" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_features_follow_the_cpu_ones(sample_data, release, tmp_path):
    """On CUDA, features under bf16 autocast: kNN and linear scores close to the CPU's fp32 ones,
    and the bench's cells on the GPU."""
    dataset = f"eurosat:{sample_data / MS}"
    cpu = quiet(run_protocol, "knn", release, dataset, device="cpu", progress=False, **SMALL)
    gpu = quiet(run_protocol, "knn", release, dataset, device="cuda", progress=False, **SMALL)
    assert gpu["device"].startswith("cuda") and gpu["feature_images_per_s"] > 0
    assert abs(gpu["accuracy"] - cpu["accuracy"]) < 0.05
    linear = quiet(run_protocol, "linear", release, dataset, device="cuda", progress=False, **SMALL)
    assert 0.0 <= linear["accuracy"] <= 1.0
    suite = bench.Suite(
        name="gpu",
        seeds=[0, 1, 2],
        datasets=[{"name": "eurosat", "root": str(sample_data / MS), "options": SMALL}],
        protocols=["knn"],
        encoders=["release", "random_init"],
    )
    results = quiet(
        bench.run_suite, suite, release, tmp_path / "bench", device="cuda", progress=False
    )
    assert {c["device"] for c in results["cells"]} == {"cuda:0"}
