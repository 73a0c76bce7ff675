"""The build manifest (sha256 and sample count per shard in index.json) and ``data verify``
catching a changed byte or a dropped sample, in single-sensor and multi-sensor folders."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import tarfile
import warnings
from pathlib import Path

import pytest

from eoforge.datasets.errors import DataError
from eoforge.datasets.ingest import build_shards, verify_shards
from eoforge.datasets.pairs import build_paired_shards
from eoforge.launch.cli import main

from conftest import REPO_ROOT


def quiet(build, *args, **kwargs) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nodata / missing-partner warnings of the real data
        return build(*args, progress=False, **kwargs)


@pytest.fixture
def enmap_shards(sample_data, tmp_path) -> Path:
    out = tmp_path / "enmap"
    quiet(
        build_shards, sample_data / "hyspecnet11k_enmap", out, "ENMAP",
        pattern="*SPECTRAL_IMAGE.TIF", tile_size=64, shard_size=3,
    )  # fmt: skip
    return out


@pytest.fixture
def paired_shards(sample_data, tmp_path) -> Path:
    out = tmp_path / "s2s1"
    quiet(
        build_paired_shards, sample_data / "ssl4eo_s12_s1s2", out, "S2L2A", pair=["S1GRD"],
        layout="ssl4eo", time_window_days=7, tile_size=132, shard_size=5,
    )  # fmt: skip
    return out


def flip_byte(shard: Path) -> None:
    """Change one byte inside the first image array (the tar itself stays readable)."""
    with tarfile.open(shard) as tar:
        info = next(i for i in tar if i.name.endswith("image.npy"))
    with open(shard, "r+b") as f:
        f.seek(info.offset_data + info.size - 1)
        last = f.read(1)
        f.seek(-1, io.SEEK_CUR)
        f.write(bytes([last[0] ^ 0xFF]))


def drop_last_sample(shard: Path) -> None:
    """Rewrite a shard without the members of its last sample."""
    with tarfile.open(shard) as tar:
        members = [(i, tar.extractfile(i).read()) for i in tar if i.isfile()]
    last = members[-1][0].name.split(".", 1)[0]
    with tarfile.open(shard, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if info.name.split(".", 1)[0] != last:
                tar.addfile(info, io.BytesIO(data))


def index_of(folder: Path) -> dict:
    return json.loads((folder / "index.json").read_text())


@pytest.mark.parametrize("folder", ["enmap_shards", "paired_shards"])
def test_manifest_records_each_shards_sha256_and_count(folder, request):
    out = request.getfixturevalue(folder)
    index = index_of(out)
    assert len(index["shards"]) == 3
    for row in index["shards"]:
        assert row["sha256"] == hashlib.sha256((out / row["name"]).read_bytes()).hexdigest()
    assert sum(row["samples"] for row in index["shards"]) == index["samples"]
    result = verify_shards(out)
    assert result["sha256_checked"] == 3 and result["samples"] == index["samples"]


@pytest.mark.parametrize("folder", ["enmap_shards", "paired_shards"])
def test_a_changed_byte_is_caught_naming_the_shard(folder, request):
    out = request.getfixturevalue(folder)
    flip_byte(out / "shard-000001.tar")
    samples = index_of(out)["shards"][1]["samples"]
    with pytest.raises(DataError) as caught:
        verify_shards(out)
    message = str(caught.value)
    assert f"{out / 'shard-000001.tar'}: sha256 " in message
    assert f"it holds {samples} samples, index.json says {samples}" in message


@pytest.mark.parametrize("folder", ["enmap_shards", "paired_shards"])
def test_a_dropped_sample_is_caught_naming_the_shard(folder, request):
    out = request.getfixturevalue(folder)
    shard = out / "shard-000000.tar"
    expected = index_of(out)["shards"][0]["samples"]
    drop_last_sample(shard)
    with pytest.raises(DataError, match=f"it holds {expected - 1} samples, index.json says"):
        verify_shards(out)
    # With the manifest's sha256 rewritten to match, the sample count still gives it away.
    index = index_of(out)
    index["shards"][0]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(
        DataError, match=f"{shard} holds {expected - 1} samples but .*index.json says {expected}"
    ):
        verify_shards(out)


def test_folders_without_a_manifest_verify_with_a_warning(enmap_shards):
    index = index_of(enmap_shards)
    for row in index["shards"]:
        del row["sha256"]
    (enmap_shards / "index.json").write_text(json.dumps(index))
    with pytest.warns(UserWarning, match="records no sha256 for 3 shard"):
        result = verify_shards(enmap_shards)
    assert result["sha256_checked"] == 0 and result["samples"] == 8


def test_cli_verify_reports_checked_shards_and_names_a_changed_one(enmap_shards, capsys):
    assert main(["data", "verify", str(enmap_shards)]) == 0
    assert json.loads(capsys.readouterr().out)["sha256_checked"] == 3
    flip_byte(enmap_shards / "shard-000002.tar")
    assert main(["data", "verify", str(enmap_shards)]) == 2
    assert f"{enmap_shards / 'shard-000002.tar'}: sha256" in capsys.readouterr().err


def test_data_pipeline_benchmark_smoke(sample_data, tmp_path):
    # perf/data_pipeline.py at tiny sizes: builds shards with a manifest, reads them back through
    # ShardStream and writes its table, so the benchmark cannot rot between real runs.
    spec = importlib.util.spec_from_file_location(
        "data_pipeline_bench", REPO_ROOT / "perf" / "data_pipeline.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--smoke", "--out", str(tmp_path)])
    measured = result["measured"]
    assert measured["samples"] == measured["samples_per_epoch_read"] == 28  # 7 patches x 4 tiles
    # image + json per sample, plus a valid mask where a tile holds DN 0 (S2 nodata)
    assert 2 * 28 <= measured["members"] <= 3 * 28
    gate = result["gate"]
    assert gate["reader_ratio"] > 0 and gate["cpu_ratio"] > 0 and gate["ingest_ratio"] > 0
    assert json.loads((tmp_path / "data_pipeline.json").read_text())["gate"] == gate
    assert "| reader, normalised on the device" in (tmp_path / "data_pipeline.md").read_text()
