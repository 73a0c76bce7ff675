"""Every mistake a config can hold is one line, exit code 2, before anything starts: no run folder
is made, no process group or DeepSpeed started (each case here fails within the validation)."""

from __future__ import annotations

import json

import pytest

from eoforge.datasets.shards import FORMAT, INDEX_FILE
from eoforge.launch.cli import main


def one_shard_folder(folder):
    """A shard folder whose index lists one S2 shard (never read: the checks count shards)."""
    folder.mkdir()
    (folder / "shard-000000.tar").write_bytes(b"")
    index = {
        "format": FORMAT,
        "shards": [{"name": "shard-000000.tar", "samples": 4}],
        "sensors": {"S2L2A": {}},
    }
    (folder / INDEX_FILE).write_text(json.dumps(index))
    return folder


def refused(capsys, tmp_path, *argv):
    """(stderr, exit code) of ``eoforge ARGV`` whose run folder is tmp_path/run; asserts that
    the error is one line and that no run folder was left."""
    code = main([*argv, f"run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert not (tmp_path / "run").exists()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err, code


def pretrain_on(folder, *overrides):
    return [
        "pretrain",
        "--config",
        "demo",
        "data.demo=false",
        f"data.shards=[{folder}]",
        *overrides,
    ]


@pytest.fixture
def shards(tmp_path):
    return one_shard_folder(tmp_path / "s2")


@pytest.mark.parametrize(
    "override, named",
    [
        ("model.name=vit_tiny", "model.name='vit_tiny': unknown model; did you mean vit_tiny_patch16"),
        ("model.kwargs.gsd_refrence=10", "model.kwargs.gsd_refrence=10: unknown option of SpectralViT; did you mean gsd_reference"),
        ("model.kwargs.tokenizer=spectrall", "model.kwargs.tokenizer='spectrall': unknown tokenizer; did you mean spectral"),
        ("model.kwargs.tokenizer_kwargs.band_scal=3", "model.kwargs.tokenizer_kwargs.band_scal=3: unknown option of SpectrumAwarePatchEmbed; did you mean band_scale"),
        ("objective.name=mea", "objective.name='mea': unknown objective; did you mean mae"),
        ("objective.kwargs.mask_ration=0.5", "objective.kwargs.mask_ration=0.5: unknown option of MAE; did you mean mask_ratio"),
    ],
)  # fmt: skip
def test_model_tokenizer_and_objective_mistakes_are_one_line(
    capsys, tmp_path, shards, override, named
):
    err, code = refused(capsys, tmp_path, *pretrain_on(shards, override))
    assert code == 2 and named in err


def test_a_missing_shard_folder_names_the_key_and_the_nearest_folder(capsys, tmp_path, shards):
    err, code = refused(capsys, tmp_path, *pretrain_on(tmp_path / "s3"))
    assert code == 2
    assert f"data.shards[0]='{tmp_path / 's3'}': no such shard folder" in err
    assert f"did you mean {shards}" in err


def test_a_folder_without_shards_is_named(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    err, code = refused(capsys, tmp_path, *pretrain_on(tmp_path / "empty"))
    assert code == 2 and f"data.shards[0]='{tmp_path / 'empty'}'" in err and "index.json" in err


def test_too_few_shards_for_the_workers_of_one_rank(capsys, tmp_path, shards):
    err, code = refused(capsys, tmp_path, *pretrain_on(shards, "data.num_workers=2"))
    assert code == 2
    assert "1 rank(s) x 2 worker(s) need 2 shards" in err and "the largest source has 1" in err


def test_launch_local_checks_the_shards_for_its_ranks(capsys, tmp_path, shards):
    argv = ["launch", "local", "--nproc", "2", "--", *pretrain_on(shards)]
    err, code = refused(capsys, tmp_path, *argv)
    assert code == 2 and "2 rank(s) x 1 worker(s) need 2 shards" in err


def test_launch_slurm_dry_run_checks_the_shards_for_its_ranks(capsys, tmp_path, shards):
    slurm = ["launch", "slurm", "--nodes", "2", "--gpus-per-node", "8", "--time", "1:00:00"]
    argv = [*slurm, "--partition", "gpu", "--dry-run", "--", *pretrain_on(shards)]
    err, code = refused(capsys, tmp_path, *argv)
    assert code == 2 and "16 rank(s) x 1 worker(s) need 16 shards" in err


def test_a_command_line_typo_is_blamed_on_the_command_line(capsys, tmp_path, shards):
    err, code = refused(capsys, tmp_path, *pretrain_on(shards, "data.bach_size=4"))
    assert code == 2
    assert "the command-line override 'data.bach_size=4'" in err and "batch_size" in err
    assert "demo.yaml" not in err and "full_key" not in err and "object_type" not in err


def test_debug_shows_the_traceback(capsys, tmp_path, shards, monkeypatch):
    with pytest.raises(ValueError, match="model.name='vit_tiny'"):
        main(["--debug", *pretrain_on(shards, "model.name=vit_tiny", f"run_dir={tmp_path}/r")])
    monkeypatch.setenv("EOFORGE_DEBUG", "1")
    with pytest.raises(ValueError, match="model.name='vit_tiny'"):
        main(pretrain_on(shards, "model.name=vit_tiny", f"run_dir={tmp_path}/r"))
    assert not (tmp_path / "r").exists()


def test_mixture_sets_are_checked_under_their_own_keys(capsys, tmp_path, shards):
    mixture = f"data.mixture=[{{shards: [{shards}], weight: 1}}, {{shards: [{tmp_path / 'x'}]}}]"
    argv = ["pretrain", "--config", "demo", "data.demo=false", mixture]
    err, code = refused(capsys, tmp_path, *argv)
    assert code == 2 and f"data.mixture[1].shards[0]='{tmp_path / 'x'}'" in err
    mixture = f"data.mixture=[{{shards: [{shards}], weight: 1}}]"
    err, code = refused(
        capsys, tmp_path, "launch", "local", "--nproc", "2", "--", *argv[:-1], mixture
    )
    assert code == 2 and "data.mixture: 2 rank(s) x 1 worker(s)" in err
