"""Configuration: shipped configs load, overrides merge, bad keys and types fail naming the key."""

from __future__ import annotations

import pytest

from eoforge.launch.config import ConfigError, load_config
from eoforge.pretrain.config import CONFIG_DIR, PretrainConfig, find_config
from eoforge.pretrain.objectives import validate_objective
from eoforge.pretrain.schedule import lr_at, step_seed


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_shipped_configs_load_and_validate(name):
    cfg = load_config(PretrainConfig, find_config(name), ["data.shards=[shards/a]"])
    cfg.validate()
    validate_objective(cfg.objective)  # every objective name and option is known


def test_overrides_merge_with_types():
    cfg = load_config(
        PretrainConfig, find_config("demo"), ["steps=7", "engine.zero_stage=3", "optim.lr=0.01"]
    )
    assert (cfg.steps, cfg.engine.zero_stage, cfg.optim.lr) == (7, 3, 0.01)
    assert cfg.data.demo is True


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="optim.learning_rate"):
        load_config(PretrainConfig, None, ["optim.learning_rate=0.1"])


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match="steps"):
        load_config(PretrainConfig, None, ["steps=many"])


def test_impossible_values_are_named():
    cfg = load_config(PretrainConfig, find_config("demo"), ["engine.zero_stage=4"])
    with pytest.raises(ValueError, match="engine.zero_stage"):
        cfg.validate()
    cfg = load_config(PretrainConfig, None, [])
    with pytest.raises(ValueError, match="data.shards"):
        cfg.validate()


def test_missing_config_lists_shipped_ones():
    with pytest.raises(FileNotFoundError, match="demo"):
        find_config("nope")


def test_lr_schedule_is_a_pure_function_of_step():
    peak = 1e-3
    assert lr_at(0, peak, 10, 100, 0.0) == pytest.approx(1e-4)
    assert lr_at(9, peak, 10, 100, 0.0) == pytest.approx(peak)
    assert lr_at(100, peak, 10, 100, 1e-5) == pytest.approx(1e-5)
    assert lr_at(55, peak, 10, 100, 0.0) == pytest.approx(peak / 2)
    assert step_seed(0, 5, 1) == step_seed(0, 5, 1) != step_seed(0, 5, 0)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["data.shards=[a]", "data.mixture=[{shards: [b]}]"], "data.mixture"),
        (["data.mixture=[{shards: [a], weight: 0}]"], r"data.mixture\[0\].weight"),
        (["data.mixture=[{folders: [a]}]"], r"data.mixture\[0\]"),
        (["data.shards=['pipe:cat a.tar']"], "data.stats"),
        (["data.shards=[a]", "data.val_shards=[b]"], "data.val_every"),
        (["data.shards=[a]", "data.val_every=5"], "data.val_shards"),
        (["data.shards=[a]", "data.sensor_weights={S2L2A: -1}"], "data.sensor_weights.S2L2A"),
    ],
)
def test_impossible_data_settings_are_named(overrides, key):
    cfg = load_config(PretrainConfig, None, overrides)
    with pytest.raises(ValueError, match=key):
        cfg.validate()


def test_auto_precision_is_bf16_autocast_on_a_gpu_and_fp32_on_a_cpu(monkeypatch):
    """``engine.precision: auto`` picks fp32 weights with bf16 autocast on a GPU under ZeRO-1/2
    (its compiled step beat DeepSpeed's bf16 mode there, perf/results/gpu_h100), bf16 under
    ZeRO-3 (whose weight gathers would move fp32), fp32 on a CPU; explicit values are kept."""
    from eoforge.launch.engine import deepspeed_config, resolve_precision

    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert resolve_precision("auto") == "bf16-autocast"
    assert resolve_precision("auto", zero_stage=1) == "bf16-autocast"
    assert resolve_precision("auto", zero_stage=3) == "bf16"
    config = deepspeed_config(8, 2, resolve_precision("auto"), 1.0)
    assert config["torch_autocast"]["enabled"] and not config["bf16"]["enabled"]
    assert resolve_precision("bf16") == "bf16"
    assert resolve_precision("bf16-autocast", zero_stage=3) == "bf16-autocast"
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert resolve_precision("auto") == "fp32"
    assert resolve_precision("auto", zero_stage=3) == "fp32"
    assert resolve_precision("bf16-autocast") == "bf16-autocast"
