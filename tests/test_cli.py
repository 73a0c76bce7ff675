"""The `eoforge` command line on real files: data build -> stats -> verify, and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys


def eoforge(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "eoforge.launch.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
    )


def test_data_build_stats_verify_on_real_bigearthnet_tiles(sample_data, tmp_path):
    src = sample_data / "bigearthnet_s1s2" / "v1_tiles_bigearthnet_encoder" / "s2-tiny"
    out = tmp_path / "s2"
    built = eoforge(
        "data", "build", src, out, "--sensor", "S2L2A", "--tile-size", "120", "--shard-size", "2"
    )
    assert built.returncode == 0, built.stderr
    assert "eoforge data stats" in built.stdout  # the printed next step
    index = json.loads((out / "index.json").read_text())
    assert index["samples"] == 3 and len(index["shards"]) == 2
    assert eoforge("data", "stats", out).returncode == 0
    stats = json.loads((out / "stats.json").read_text())
    assert len(stats["bands"]) == 12 and "S2L2A:B8A" in stats["bands"]
    verified = eoforge("data", "verify", out)
    assert verified.returncode == 0, verified.stderr


def test_empty_folder_is_one_clear_message(tmp_path):
    (tmp_path / "empty").mkdir()
    result = eoforge("data", "build", tmp_path / "empty", tmp_path / "out", "--sensor", "S2L2A")
    assert result.returncode == 2
    assert str(tmp_path / "empty") in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_unknown_sensor_and_config_key_are_named(tmp_path):
    result = eoforge("data", "build", tmp_path, tmp_path / "out", "--sensor", "SENTINEL99")
    assert result.returncode == 2 and "SENTINEL99" in result.stderr
    result = eoforge("pretrain", "optim.learnin_rate=1", cwd=tmp_path)
    assert result.returncode == 2 and "optim.learnin_rate" in result.stderr


def test_release_verify_refuses_tampered_weights(tmp_path):

    from eoforge.models import create_model, save_release

    card = {
        "bands": [
            {"band_id": "S1GRD:VV", "sensor": "S1GRD", "wavelength": 5.5e7, "bandwidth": 0.0}
        ],
        "normalisation": {"S1GRD:VV": {"p1": -25.0, "p99": 0.0, "mean": 0.5, "std": 0.2}},
        "objective": {"name": "mae"},
        "data": {},
        "steps": 1,
    }
    release = save_release(
        tmp_path / "r", create_model("vit_test_patch8").state_dict(), "vit_test_patch8", {}, card
    )
    assert eoforge("release", "verify", release).returncode == 0
    weights = release / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    result = eoforge("release", "verify", release)
    assert result.returncode == 2 and "sha256" in result.stderr
