"""EuroSAT in its two real layouts (MS GeoTIFFs with B8A last, RGB JPEGs): the form, the
S2RGB8 sensor, one scene-level split for both forms, label draws that never move the test split,
and ``data build --layout eurosat``."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import rasterio

from eoforge.datasets.errors import DataError
from eoforge.datasets.eurosat import (
    CLASS_SIZES,
    FILE_BANDS,
    find_images,
    load_eurosat,
    scene_id,
    scene_splits,
)
from eoforge.datasets.sensors import get_sensor
from eoforge.launch.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
RGB, MS, SAMPLES = "eurosat_rgb", "eurosat_ms_subset", "eurosat_ms_samples"


def link_first(src_folder, dst, per_class: int, suffix: str) -> None:
    """Symlink the first ``per_class`` images of each class folder of ``src_folder`` into ``dst``."""
    for folder in sorted(p for p in src_folder.iterdir() if p.is_dir()):
        for path in sorted(folder.glob(f"*{suffix}"))[:per_class]:
            (dst / folder.name).mkdir(parents=True, exist_ok=True)
            (dst / folder.name / path.name).symlink_to(path)


def test_s2rgb8_is_a_sensor_of_its_own_at_s2_wavelengths():
    rgb8, s2 = get_sensor("S2RGB8"), get_sensor("S2L1C")
    assert rgb8.band_names == ["R", "G", "B"]
    for name, s2_name in zip("RGB", ("B04", "B03", "B02"), strict=True):
        assert rgb8.band(name).wavelength == s2.band(s2_name).wavelength
        assert rgb8.band(name).band_id == f"S2RGB8:{name}" != s2.band(s2_name).band_id


def test_forms_are_told_apart_by_the_files(sample_data):
    kind, folder, paths = find_images(sample_data / RGB)
    assert kind.name == "rgb" and folder.name == "2750" and len(paths) == 10_000
    kind, _, paths = find_images(sample_data / MS)
    assert kind.name == "ms" and len(paths) == 889
    with pytest.raises(DataError, match="both EuroSAT MS and RGB.*form=ms"):
        find_images(sample_data / SAMPLES)  # holds EuroSAT_MS/ and EuroSAT_RGB/
    kind, folder, paths = find_images(sample_data / SAMPLES, "rgb")
    assert folder.name == "EuroSAT_RGB" and len(paths) == 3
    with pytest.raises(DataError, match="no EuroSAT images"):
        find_images(sample_data / MS, "rgb")
    with pytest.raises(DataError, match="form='sar'"):
        find_images(sample_data / MS, "sar")


def test_the_split_is_stratified_over_eurosat_and_shared_by_both_forms(sample_data):
    every = [f"{name}_{i}" for name, size in CLASS_SIZES.items() for i in range(1, size + 1)]
    splits = scene_splits(every)
    start = 0
    for size in CLASS_SIZES.values():  # exactly stratified on the whole of EuroSAT
        mine = splits[start : start + size]
        assert (mine == "test").sum() == round(0.2 * size) and (mine == "val").sum() == round(
            0.2 * size
        )
        start += size
    assert not np.array_equal(splits, scene_splits(every, split_seed=1))
    rgb_ids = [scene_id(p) for p in find_images(sample_data / RGB)[2]]
    ms_ids = [scene_id(p) for p in find_images(sample_data / MS)[2]]
    assert set(ms_ids) <= set(rgb_ids)
    by_rgb = dict(zip(rgb_ids, scene_splits(rgb_ids), strict=True))
    assert [by_rgb[i] for i in ms_ids] == list(scene_splits(ms_ids))  # a scene, one split
    with pytest.raises(DataError, match="'Forest_3001' is not a EuroSAT scene id"):
        scene_splits(["Forest_3001"])


@pytest.fixture(scope="module")
def rgb_10(sample_data):
    return [load_eurosat(sample_data / RGB, labels_per_class=10, seed=s) for s in (0, 1)]


def test_rgb_split_reads_8_bit_renderings_with_their_own_bands(sample_data, rgb_10):
    split = rgb_10[0]
    assert split.band_ids == ["S2RGB8:R", "S2RGB8:G", "S2RGB8:B"]
    assert split.x_train.shape == (100, 3, 64, 64) and len(split.x_test) > 1900
    assert set(split.stats) == set(split.band_ids) and split.stats["S2RGB8:R"]["p99"] <= 255
    with rasterio.open(sample_data / RGB / "2750" / split.train_ids[0]) as ds:
        red = ds.read(1).astype(np.float64)
    s = split.stats["S2RGB8:R"]
    expected = ((np.clip(red, s["p1"], s["p99"]) - s["p1"]) / (s["p99"] - s["p1"]) - s["mean"]) / s[
        "std"
    ]
    np.testing.assert_allclose(split.x_train[0, 0], expected, rtol=1e-5, atol=1e-5)


def test_seeds_draw_labels_and_never_move_the_test_split(sample_data, rgb_10):
    first, second = rgb_10
    assert first.test_ids == second.test_ids and first.train_ids != second.train_ids
    for split in rgb_10:
        assert np.bincount(split.y_train).tolist() == [10] * 10
    # The test images are exactly the split's test scenes; the labels come from the others.
    ids = [scene_id(p) for p in find_images(sample_data / RGB)[2]]
    test_scenes = {i for i, s in zip(ids, scene_splits(ids), strict=True) if s == "test"}
    assert {i.rsplit("/", 1)[-1].removesuffix(".jpg") for i in first.test_ids} == test_scenes
    for split in rgb_10:
        assert not test_scenes & {
            i.rsplit("/", 1)[-1].removesuffix(".jpg") for i in split.train_ids
        }
    with pytest.raises(
        DataError, match=r"class Pasture has \d+ training images, fewer than labels_per_class=60"
    ):
        load_eurosat(sample_data / MS, labels_per_class=60)


def test_validation_split_never_reads_test_scenes(sample_data):
    val = load_eurosat(sample_data / MS, split="val")
    test = load_eurosat(sample_data / MS)
    used = set(val.train_ids) | set(val.test_ids)
    assert not used & set(test.test_ids)
    assert set(val.train_ids) | set(val.test_ids) == set(test.train_ids)
    assert val.band_ids[12] == "S2L1C:B8A" and val.band_ids == [f"S2L1C:{b}" for b in FILE_BANDS]


def test_a_file_outside_eurosat_naming_is_refused(sample_data, tmp_path):
    link_first(sample_data / RGB / "2750", tmp_path / "2750", 2, ".jpg")
    shutil.copy(
        next((tmp_path / "2750" / "Forest").iterdir()),
        tmp_path / "2750" / "Forest" / "Forest_9999.jpg",
    )
    with pytest.raises(DataError, match="'Forest_9999' is not a EuroSAT scene id"):
        load_eurosat(tmp_path)


def test_data_build_layout_eurosat_declares_the_band_order(sample_data, tmp_path, capsys):
    src = tmp_path / "ms"
    link_first(sample_data / MS, src, 3, ".tif")
    out = tmp_path / "shards_ms"
    assert (
        main(["data", "build", str(src), str(out), "--layout", "eurosat", "--shard-size", "8"]) == 0
    )
    index = json.loads((out / "index.json").read_text())
    assert [b["band_id"] for b in index["bands"]] == [f"S2L1C:{b}" for b in FILE_BANDS]
    assert index["samples"] == 30
    assert main(["data", "stats", str(out)]) == 0
    stats = json.loads((out / "stats.json").read_text())["bands"]
    # B8A (stored last) is near-infrared, far brighter than B09 (water vapour) and B10 (cirrus).
    assert (
        stats["S2L1C:B8A"]["mean"] > 1500 > stats["S2L1C:B09"]["mean"] > stats["S2L1C:B10"]["mean"]
    )
    capsys.readouterr()
    assert (
        main(
            [
                "data",
                "build",
                str(src),
                str(tmp_path / "x"),
                "--layout",
                "eurosat",
                "--sensor",
                "S2L2A",
            ]
        )
        == 2
    )
    assert "EuroSAT images are S2L1C or S2RGB8" in capsys.readouterr().err
    assert (
        main(
            [
                "data",
                "build",
                str(src),
                str(tmp_path / "x"),
                "--layout",
                "eurosat",
                "--bands",
                "B01",
            ]
        )
        == 2
    )
    assert "drop --bands" in capsys.readouterr().err


def test_data_build_layout_eurosat_reads_rgb_jpegs(sample_data, tmp_path):
    src = tmp_path / "rgb"
    link_first(sample_data / RGB / "2750", src / "2750", 2, ".jpg")
    out = tmp_path / "shards_rgb"
    assert main(["data", "build", str(src), str(out), "--layout", "eurosat"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert [b["band_id"] for b in index["bands"]] == ["S2RGB8:R", "S2RGB8:G", "S2RGB8:B"]
    assert index["sensors"] == {"S2RGB8": 20}
    import tarfile

    with tarfile.open(out / "shard-000000.tar") as tar:
        meta = json.loads(tar.extractfile(next(m for m in tar if m.name.endswith(".json"))).read())
    assert meta["gsd"] == 10.0 and meta["window"] == [0, 0, 64, 64]


def test_shards_mix_the_class_folders_so_batches_do_too(sample_data, tmp_path):
    """Shards are written in a seeded random order: built from class folders, every shard and
    every batch holds many classes (in file order each held one), every image once and unchanged,
    and the same build gives the same bytes."""
    import tarfile

    from eoforge.datasets.reader import ShardStream
    from eoforge.datasets.shards import decode_sample, iter_tar_samples
    from eoforge.datasets.stats import Normaliser

    src = tmp_path / "rgb"
    link_first(sample_data / RGB / "2750", src / "2750", 40, ".jpg")
    out, again = tmp_path / "shards", tmp_path / "again"
    for folder in (out, again):
        args = [
            "data",
            "build",
            str(src),
            str(folder),
            "--layout",
            "eurosat",
            "--shard-size",
            "100",
        ]
        assert main(args) == 0
    shards = sorted(out.glob("shard-*.tar"))
    keys = [
        [m.name.removesuffix(".json") for m in tarfile.open(p) if m.name.endswith(".json")]
        for p in shards
    ]
    assert [len(k) for k in keys] == [100] * 4

    def classes_of(ids: list[str]) -> set[str]:
        return {i.split("_")[1] for i in ids}  # ids are S2RGB8_<Class>_<n>_r0_c0

    assert all(len(classes_of(k)) >= 8 for k in keys), [sorted(classes_of(k)) for k in keys]
    images = sorted(src.glob("2750/*/*.jpg"))
    assert sorted(sum(keys, [])) == sorted(f"S2RGB8_{p.stem}_r0_c0" for p in images)
    shas = [[r["sha256"] for r in json.loads((f / "index.json").read_text())["shards"]]
            for f in (out, again)]  # fmt: skip
    assert shas[0] == shas[1]

    raw = next(iter_tar_samples(shards[0]))
    image, _, meta = decode_sample(raw)
    path = src / "2750" / meta["id"].split("_")[1] / f"{'_'.join(meta['id'].split('_')[1:3])}.jpg"
    with rasterio.open(path) as f:
        np.testing.assert_array_equal(image, f.read())

    assert main(["data", "stats", str(out)]) == 0
    stream = ShardStream(
        [str(out)], Normaliser.from_files([out / "stats.json"]), batch_size=32, seed=0
    )
    batch = next(stream.iter_batches())
    assert len(classes_of(batch["meta"]["id"])) >= 6
