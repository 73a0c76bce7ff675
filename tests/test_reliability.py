"""Faults end in a resumed run or a clear message: SIGKILL between checkpoints and while one is
written, torn checkpoints, a malicious pickle, non-finite losses, a change of world size, and
configurations that cannot run."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eoforge.launch.checkpoints import (
    UnsafeCheckpointError,
    newest_whole,
    vet_pickles,
)
from eoforge.launch.config import load_config
from eoforge.launch.faults import Fault, parse_faults
from eoforge.pretrain.config import PretrainConfig, find_config

from pretrain_runs import eoforge, run_env, scalars

RUN = [
    "--config",
    "demo",
    "log_every=1",
    "image_every=100",
    "engine.precision=fp32",
    "release.export=false",
    "data.log_ids=true",
]
TWO_RANKS = [*RUN, "steps=8", "save_every=2", "keep_last=2", "data.batch_size=4"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("eoforge-cache")


def trained(run: Path, rank: int) -> list[str]:
    """The sample-id lines of the micro-batches a run trained on, one per step: a killed run's
    lines after its last checkpoint are replaced by those its resumed run logged."""
    by_step = {}
    for line in (run / "logs" / f"samples-rank{rank}.txt").read_text().splitlines():
        by_step[int(line.split()[0])] = line
    return [by_step[s] for s in sorted(by_step)]


def ids(lines: list[str]) -> list[str]:
    return [i for line in lines for i in line.split()[1:]]


def assert_same_training(run: Path, reference: Path) -> None:
    expected, got = scalars(reference, "loss"), scalars(run, "loss")
    assert sorted(got) == sorted(expected) == list(range(1, 9))  # no gap, no duplicate step
    for step, value in expected.items():
        assert got[step] == pytest.approx(value, rel=1e-5, abs=1e-6), step
    for rank in (0, 1):
        assert trained(run, rank) == trained(reference, rank)
        seen = ids(trained(run, rank))
        assert len(seen) == len(set(seen)) == 8 * 4  # one epoch: nothing twice, nothing skipped


@pytest.fixture(scope="module")
def uninterrupted(cache, tmp_path_factory):
    run = tmp_path_factory.mktemp("full") / "run"
    eoforge(["pretrain", *TWO_RANKS, f"run_dir={run}"], cache, nproc=2)
    return run


def killed(cache, run: Path, fault: str, monkeypatch) -> subprocess.CompletedProcess:
    with monkeypatch.context() as m:
        m.setenv("EOFORGE_FAULT", fault)
        result = eoforge(["pretrain", *TWO_RANKS, f"run_dir={run}"], cache, nproc=2, check=False)
    assert result.returncode != 0, result.stdout[-2000:]
    return result


@pytest.mark.slow
def test_sigkill_between_checkpoints_resumes_exactly(cache, uninterrupted, tmp_path, monkeypatch):
    step = random.choice([3, 5, 7])  # a step after which no checkpoint is written
    print(f"killing after step {step}")
    run = tmp_path / "run"
    killed(cache, run, f"kill@{step}", monkeypatch)
    assert newest_whole(run / "checkpoints").step == step - 1
    resumed = eoforge(["pretrain", *TWO_RANKS, f"run_dir={run}"], cache, nproc=2)
    assert f"resuming at step {step - 1}" in resumed.stdout
    assert_same_training(run, uninterrupted)


@pytest.mark.slow
def test_sigkill_while_a_checkpoint_is_written(cache, uninterrupted, tmp_path, monkeypatch):
    step = random.choice([4, 6])
    print(f"killing while saving step {step}")
    run = tmp_path / "run"
    killed(cache, run, f"kill_in_save@{step}", monkeypatch)
    checkpoints = run / "checkpoints"
    assert (checkpoints / f".partial-step_{step:08d}").is_dir()  # DeepSpeed's files, no commit
    assert (checkpoints / "latest").read_text() == f"step_{step - 2:08d}"
    resumed = eoforge(["pretrain", *TWO_RANKS, f"run_dir={run}"], cache, nproc=2)
    assert f"resuming at step {step - 2}" in resumed.stdout
    log = (run / "logs" / "rank0.log").read_text()
    assert f".partial-step_{step:08d} was never completed" in log
    assert_same_training(run, uninterrupted)
    # The last K are kept, and the pointer names the newest.
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_00000006", "step_00000008"]
    assert (checkpoints / "latest").read_text() == "step_00000008"


@pytest.fixture(scope="module")
def single(cache, tmp_path_factory):
    """A one-rank run of 6 steps stopped after 4, two micro-batches of 4 per step, a checkpoint
    at every step."""
    run = tmp_path_factory.mktemp("single") / "run"
    args = [*RUN, "steps=6", "save_every=1", "keep_last=2", "data.batch_size=4"]
    args.append("optim.global_batch=8")
    result = eoforge(["pretrain", *args, "stop_at=4", f"run_dir={run}"], cache)
    return run, args, result


def test_gradient_accumulation_reaches_the_global_batch(single):
    run, _, result = single
    assert "global batch 8 (2 micro-batch(es) per step)" in result.stdout
    steps = [int(line.split()[0]) for line in trained_lines(run)]
    assert steps == [0, 0, 1, 1, 2, 2, 3, 3]


def trained_lines(run: Path) -> list[str]:
    return (run / "logs" / "samples-rank0.txt").read_text().splitlines()


def test_torn_checkpoint_is_skipped_with_a_warning(single, cache, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(single[0], run)
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_00000003", "step_00000004"]
    optim = next((checkpoints / "step_00000004").glob("*optim_states.pt"))
    optim.write_bytes(optim.read_bytes()[: optim.stat().st_size // 2])  # torn by a full disk
    result = eoforge(["pretrain", *single[1], "stop_at=4", f"run_dir={run}"], cache)
    assert "resuming at step 3" in result.stdout
    log = (run / "logs" / "rank0.log").read_text()
    assert f"checkpoint {checkpoints / 'step_00000004'} is torn ({optim.name} has" in log


def with_precision(args: list[str], precision: str) -> list[str]:
    return [a for a in args if not a.startswith("engine.precision=")] + [
        f"engine.precision={precision}"
    ]


@pytest.mark.slow
def test_a_resume_across_weight_forms_is_refused_naming_the_precision(single, cache, tmp_path):
    """fp32 and bf16-autocast keep fp32 weights in one layout: a CPU run (auto: fp32) resumes
    under bf16-autocast (auto on a GPU). DeepSpeed's bf16 mode keeps bf16 weights and optimizer
    files of its own: a resume across that line stops with a message naming the precision that
    resumes it, for manifests that record the precision and for older ones that do not."""
    autocast = tmp_path / "autocast"
    shutil.copytree(single[0], autocast)
    result = eoforge(
        ["pretrain", *with_precision(single[1], "bf16-autocast"), f"run_dir={autocast}"], cache
    )
    assert "resuming at step 4" in result.stdout and "ZeRO-2 bf16-autocast" in result.stdout
    assert sorted(scalars(autocast, "loss")) == list(range(1, 7))

    refused = tmp_path / "refused"
    shutil.copytree(single[0], refused)
    newest = refused / "checkpoints" / "step_00000004"
    assert json.loads((newest / "complete.json").read_text())["precision"] == "fp32"
    bf16 = with_precision(single[1], "bf16")
    config = (refused / "config.yaml").read_text()
    result = eoforge(["pretrain", *bf16, f"run_dir={refused}"], cache, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"checkpoint {newest} was written in engine.precision fp32," in result.stderr
    assert "resolves to bf16 " in result.stderr
    assert "set engine.precision to fp32 or bf16-autocast to resume it" in result.stderr
    assert (refused / "config.yaml").read_text() == config  # refused before it was rewritten

    for step in (3, 4):  # manifests written before they named the precision
        manifest = refused / "checkpoints" / f"step_{step:08d}" / "complete.json"
        old = {k: v for k, v in json.loads(manifest.read_text()).items() if k != "precision"}
        manifest.write_text(json.dumps(old))
    result = eoforge(["pretrain", *bf16, f"run_dir={refused}"], cache, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "in engine.precision fp32, fp16 or bf16-autocast (its manifest" in result.stderr
    assert "set engine.precision to fp32 or bf16-autocast (fp16 if" in result.stderr

    written_bf16 = tmp_path / "bf16"
    eoforge(["pretrain", *bf16, "stop_at=2", f"run_dir={written_bf16}"], cache)
    newest = written_bf16 / "checkpoints" / "step_00000002"
    assert any(newest.glob("bf16_*optim_states.pt"))
    for step in (1, 2):  # told apart by DeepSpeed's bf16 file names alone
        manifest = written_bf16 / "checkpoints" / f"step_{step:08d}" / "complete.json"
        old = {k: v for k, v in json.loads(manifest.read_text()).items() if k != "precision"}
        manifest.write_text(json.dumps(old))
    args = with_precision(single[1], "bf16-autocast")
    result = eoforge(["pretrain", *args, f"run_dir={written_bf16}"], cache, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"checkpoint {newest} was written in engine.precision bf16," in result.stderr
    assert "set engine.precision to bf16 to resume it" in result.stderr
    result = eoforge(["pretrain", *bf16, f"run_dir={written_bf16}"], cache)
    assert "resuming at step 2" in result.stdout


class Payload:
    """Unpickling this runs a shell command that leaves a file behind."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_in_a_checkpoint_is_refused(single, cache, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(single[0], run)
    marker = tmp_path / "payload-ran"
    newest = run / "checkpoints" / "step_00000004"
    torch.save({"step": 4, "extra": Payload(marker)}, newest / "mp_rank_00_extra.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"mp_rank_00_extra.pt would build \['posix"):
        vet_pickles(newest)
    (newest / "bare.pt").write_bytes(b"\x80\x04K\x01.")  # a bare pickle, no torch archive
    with pytest.raises(UnsafeCheckpointError, match="bare.pt is not a torch checkpoint"):
        vet_pickles(newest)
    (newest / "bare.pt").unlink()
    result = eoforge(["pretrain", *single[1], f"run_dir={run}"], cache, check=False)
    assert result.returncode != 0
    assert "mp_rank_00_extra.pt would build" in result.stdout + result.stderr
    assert not marker.exists()  # refused before anything was unpickled


@pytest.mark.slow
def test_nonfinite_loss_on_one_rank_is_skipped_by_all(cache, tmp_path, monkeypatch):
    run = tmp_path / "run"
    args = [*RUN, "steps=4", "save_every=100", "data.batch_size=4", f"run_dir={run}"]
    monkeypatch.setenv("EOFORGE_FAULT", "nan_loss@3:1")  # rank 1's first micro-batch of step 3
    eoforge(["pretrain", *args], cache, nproc=2)
    assert scalars(run, "train/nonfinite_skipped") == {1: 0, 2: 0, 3: 1, 4: 1}
    losses = scalars(run, "loss")
    assert sorted(losses) == [1, 2, 3, 4] and all(torch.isfinite(torch.tensor([*losses.values()])))
    for rank in (0, 1):  # both ranks drew a second micro-batch for step 3 (0-based 2)
        steps = [int(line.split()[0]) for line in trained_lines_of(run, rank)]
        assert steps == [0, 1, 2, 2, 3]
    assert (
        "step 3: non-finite loss on some rank; micro-batch skipped"
        in (run / "logs" / "rank0.log").read_text()
    )


def trained_lines_of(run: Path, rank: int) -> list[str]:
    return (run / "logs" / f"samples-rank{rank}.txt").read_text().splitlines()


def test_nonfinite_losses_in_a_row_stop_with_a_checkpoint(single, cache, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(single[0], run)
    monkeypatch.setenv("EOFORGE_FAULT", "nan_loss@5x3")
    args = [*single[1], "engine.nonfinite_limit=3", f"run_dir={run}"]
    result = eoforge(["pretrain", *args], cache, check=False)
    assert result.returncode != 0
    assert "3 non-finite losses in a row at step 5 (engine.nonfinite_limit=3)" in result.stderr
    assert "saved checkpoint at step 4" in result.stdout
    state = json.loads((run / "checkpoints" / "step_00000004" / "complete.json").read_text())
    assert state["step"] == 4
    # Relaunched (the fault gone), the run resumes past the three skipped micro-batches.
    monkeypatch.delenv("EOFORGE_FAULT")
    eoforge(["pretrain", *args], cache)
    lines = trained_lines(run)
    assert [int(line.split()[0]) for line in lines].count(4) == 3 + 2  # skipped, then trained


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_resume_on_another_world_size(cache, tmp_path, stage):
    run = tmp_path / "run"
    args = [*RUN, "steps=6", "save_every=100", "data.batch_size=4", f"run_dir={run}"]
    args += [f"engine.zero_stage={stage}"]
    eoforge(["pretrain", *args, "stop_at=3"], cache, nproc=2)
    first = {r: trained_lines_of(run, r) for r in (0, 1)}
    resumed = eoforge(["pretrain", *args], cache)  # one rank now
    assert "resuming at step 3" in resumed.stdout
    assert "was written by 2 rank(s); data positions remapped" in resumed.stdout
    losses = scalars(run, "loss")
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    later = trained_lines_of(run, 0)[len(first[0]) :]
    assert [int(line.split()[0]) for line in later] == [3, 4, 5]
    seen = ids(first[0] + first[1] + later)
    assert len(seen) == len(set(seen))  # within the epoch, nothing is read twice
    check_universal_load(run / "checkpoints" / "step_00000003", cache)


def check_universal_load(checkpoint: Path, cache: Path) -> None:
    """Load the 2-rank checkpoint on one rank through the universal form, in a fresh process:
    weights equal the 2-rank checkpoint's consolidated fp32 weights, and the Adam moments equal
    the universal files' (gathered from their ZeRO-3 partitions where the run used ZeRO-3)."""
    script = f"""
import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from eoforge.launch.checkpoints import inspect_checkpoint
from eoforge.launch.distributed import DistEnv, free_port, init_distributed
from eoforge.launch.engine import DeepSpeedEngine
from eoforge.launch.config import load_config
from eoforge.models import create_model
from eoforge.pretrain.config import PretrainConfig
from eoforge.pretrain.objectives import build_objective

init_distributed(DistEnv(0, 1, 0, "127.0.0.1", free_port()))
checkpoint, _ = inspect_checkpoint(__import__("pathlib").Path({str(checkpoint)!r}))
cfg = load_config(PretrainConfig, checkpoint.path.parents[1] / "config.yaml")
torch.manual_seed(123)  # other initial weights: everything must come from the checkpoint
objective = build_objective(cfg.objective, create_model(cfg.model.name, **cfg.model.kwargs))
engine = DeepSpeedEngine(objective, micro_batch=4, lr=1e-3, weight_decay=0.05,
                         betas=(0.9, 0.95), precision="fp32", load_universal=True,
                         zero_stage=cfg.engine.zero_stage)
state = engine.load(checkpoint)
assert state["step"] == 3, state["step"]
reference = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.path.parent), checkpoint.tag)
universal = checkpoint.path.parent / ".universal" / checkpoint.tag / "zero"
for name, param in engine.engine.module.named_parameters():
    full = safe_get_full_fp32_param(param)  # the whole tensor under ZeRO-3 too
    torch.testing.assert_close(full, reference[name], rtol=0, atol=0)
    saved = torch.load(universal / name / "exp_avg.pt", weights_only=True)
    saved = saved["param"] if isinstance(saved, dict) else saved  # ZeRO-3 writes the bare tensor
    torch.testing.assert_close(safe_get_full_optimizer_state(param, "exp_avg"), saved.view_as(full))
print("universal load ok")
"""
    out = subprocess.run(
        [sys.executable, "-c", script],
        env=run_env(cache),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "universal load ok" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]


def test_fault_specs_parse_and_bad_ones_are_named():
    assert parse_faults("kill@3, kill_in_save@4:1,nan_loss@5-7x2") == [
        Fault("kill", 3, 3, 1, None),
        Fault("kill_in_save", 4, 4, 1, 1),
        Fault("nan_loss", 5, 7, 2, None),
    ]
    for bad in ("explode@3", "kill@x", "kill@5-3", "kill"):
        with pytest.raises(ValueError, match="EOFORGE_FAULT"):
            parse_faults(bad)


@pytest.mark.parametrize(
    ("overrides", "world_size", "key"),
    [
        (["optim.global_batch=12", "data.batch_size=4"], 2, "optim.global_batch"),
        (["engine.nonfinite_limit=0"], 1, "engine.nonfinite_limit"),
        (["stop_at=500", "steps=100"], 1, "stop_at"),
        (["optim.lr=0.001", "optim.min_lr=0.01"], 1, "optim.min_lr"),
    ],
)
def test_impossible_combinations_are_named(overrides, world_size, key):
    cfg = load_config(PretrainConfig, find_config("demo"), overrides)
    with pytest.raises(ValueError, match=key):
        cfg.validate(world_size)


def test_bad_config_fails_before_any_process_starts(tmp_path, cache):
    run = tmp_path / "run"
    launch = ["launch", "local", "--nproc", "2", "--", "pretrain", "--config", "demo"]
    for overrides, key in (
        (["optim.global_batch=12", "data.batch_size=4"], "optim.global_batch"),
        (["optim.global_bach=16"], "optim.global_bach"),  # unknown key
        (["data.batch_size=four"], "data.batch_size"),  # wrong type
    ):
        result = eoforge([*launch, *overrides, f"run_dir={run}"], cache, check=False, timeout=120)
        assert result.returncode != 0
        assert key in result.stderr
        assert "torch.distributed" not in result.stderr and not run.exists()
