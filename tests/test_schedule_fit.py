"""Schedules that fit the run: a warm-up as long as the run, a peak lr too small to train, and a
loss that has not moved after warm-up are warnings naming the setting and a value that fits;
warm-up is stated in steps or as a fraction of the run, not both."""

from __future__ import annotations

import pytest

from eoforge.launch.cli import main
from eoforge.launch.config import load_config
from eoforge.launch.run_logging import get_logger
from eoforge.pretrain.config import OptimConfig, PretrainConfig, find_config
from eoforge.pretrain.schedule import (
    loss_has_not_moved,
    schedule_warnings,
    stalled_loss_warning,
)


def test_a_warmup_longer_than_the_run_names_one_that_fits():
    (message,) = schedule_warnings(
        OptimConfig(warmup_steps=2000, lr=1e-3), steps=20, global_batch=8
    )
    assert "optim.warmup_steps=2000 is not shorter than the run (steps=20)" in message
    assert "optim.warmup_steps=2 or optim.warmup_fraction=0.1" in message


def test_a_peak_lr_below_1e_5_after_scaling_names_a_blr_that_fits():
    # MAE's blr 1.5e-4 x batch 4 / 256 = 2.3e-6.
    (message,) = schedule_warnings(OptimConfig(warmup_steps=2), steps=20, global_batch=4)
    assert "peak lr 2.3e-06 (optim.blr=1.5e-04 x global batch 4 / 256) is below 1e-05" in message
    assert "optim.blr=6.4e-04 or more" in message
    (message,) = schedule_warnings(OptimConfig(lr=1e-6, warmup_steps=2), steps=20, global_batch=4)
    assert "optim.lr=1.0e-06" in message and "set optim.lr=1e-04" in message


def test_a_schedule_that_fits_warns_nothing():
    assert schedule_warnings(OptimConfig(warmup_fraction=0.05), steps=1000, global_batch=256) == []


def test_warmup_as_a_fraction_of_the_run_and_not_both():
    assert OptimConfig(warmup_fraction=0.05).warmup(100_000) == 5000
    assert OptimConfig().warmup(100) == 10  # neither: the default steps
    with pytest.raises(ValueError, match="optim.warmup_steps=10 and optim.warmup_fraction=0.1"):
        OptimConfig(warmup_steps=10, warmup_fraction=0.1).validate()
    with pytest.raises(ValueError, match="optim.warmup_fraction=1.5"):
        OptimConfig(warmup_fraction=1.5).validate()


def test_shipped_configs_state_warmup_once_and_mae_as_its_paper_does():
    for name in ("mae", "jepa", "demo", "croma", "seasonal_contrast"):
        load_config(PretrainConfig, find_config(name)).optim.validate()
    mae = load_config(PretrainConfig, find_config("mae"))
    assert mae.optim.warmup_fraction == 0.05 and mae.optim.warmup(mae.steps) == 5000


@pytest.mark.parametrize(
    "losses, stalled",
    [
        ([1.0, 1.001, 0.999, 1.0, 1.002, 0.998], True),  # flat, with noise
        ([1.0, 0.95, 0.9, 0.85, 0.8, 0.75], False),  # learning
        ([1.0, 1.0, 1.0, 1.0, 1.0], False),  # too few intervals yet
        ([2.0, 2.01, 2.0, 2.02, 2.0, 2.01], True),  # 0.3% over the window
        ([2.0, 2.0, 2.0, 1.97, 1.96, 1.95], False),  # 2% down
    ],
)
def test_the_loss_has_not_moved_detector(losses, stalled):
    assert loss_has_not_moved(losses) is stalled


def test_warnings_reach_the_console_and_the_rank_log(tmp_path, capsys):
    log = get_logger(tmp_path, rank=0)
    losses = [1.0] * 6
    log.warning(stalled_loss_warning(losses, OptimConfig(), global_batch=8))
    for handler in log.handlers:
        handler.flush()
    expected = "[rank 0] warning: the loss has not moved in the 6 log intervals after warm-up"
    assert expected in capsys.readouterr().out
    assert expected in (tmp_path / "rank0.log").read_text()
    assert "try optim.blr=1.5e-03" in (tmp_path / "rank0.log").read_text()
    get_logger(None, rank=1)  # closes the log file: no handler left behind


def test_launch_dry_run_warns_of_a_schedule_that_does_not_fit(tmp_path, capsys):
    slurm = ["launch", "slurm", "--nodes", "1", "--gpus-per-node", "4", "--time", "1:00:00"]
    argv = [*slurm, "--partition", "debug", "--dry-run", "--", "pretrain", "steps=20"]
    assert main([*argv, "optim.warmup_steps=2000", f"run_dir={tmp_path / 'run'}"]) == 0
    err = capsys.readouterr().err
    assert "eoforge: warning: optim.warmup_steps=2000 is not shorter than the run" in err
