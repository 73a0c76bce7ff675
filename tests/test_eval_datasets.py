"""Evaluation dataset adapters on the real sample files: band identity, labels, splits and
normalisation from the training split only."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio

from eoforge.datasets.bigearthnet import CLASS_NAMES as BEN_CLASSES
from eoforge.datasets.bigearthnet import load_bigearthnet
from eoforge.datasets.change_pairs import SCENES, load_change_pairs
from eoforge.datasets.errors import DataError
from eoforge.datasets.eurosat import FILE_BANDS, load_eurosat
from eoforge.datasets.eval_datasets import EVAL_DATASETS, dataset_loader
from eoforge.datasets.folder_csv import load_folder_csv
from eoforge.datasets.indian_pines import PixelSplit
from eoforge.datasets.labelled import LabelledSplit
from eoforge.datasets.sensors import get_sensor
from eoforge.datasets.torchgeo_adapter import to_labelled_split

TAIZHOU_BANDS = ["B1", "B2", "B3", "B4", "B5", "B7"]


def _normalise(raw: np.ndarray, stats: dict) -> np.ndarray:
    p1, p99, mean, std = (stats[k] for k in ("p1", "p99", "mean", "std"))
    return ((np.clip(raw, p1, p99) - p1) / (p99 - p1) - mean) / std


@pytest.fixture(scope="module")
def eurosat_root(sample_data):
    return sample_data / "eurosat_ms_samples"


@pytest.fixture(scope="module")
def ben_root(sample_data):
    return sample_data / "bigearthnet_s1s2" / "v2_lmdb_configilm_mock"


@pytest.fixture(scope="module")
def change_root(sample_data):
    return sample_data / "landsat_tm_change_detection_taizhou_nanjing"


# The 4-image sample folder holds both forms; half of EuroSAT's scenes in test (split seed 0)
# leaves 2 of its MS images for training and 2 for testing.
SAMPLE_SPLIT = {"form": "ms", "test_fraction": 0.5, "val_fraction": 0.0}


@pytest.fixture(scope="module")
def eurosat(eurosat_root):
    return load_eurosat(eurosat_root, seed=0, **SAMPLE_SPLIT)


@pytest.fixture(scope="module")
def taizhou(change_root):
    return load_change_pairs(change_root, scene="taizhou", seed=0)


def test_registry_loads_through_one_mapping(sample_data, eurosat_root, eurosat):
    names = {"indian_pines", "eurosat", "bigearthnet", "change_pairs", "folder_csv", "torchgeo"}
    assert names <= set(EVAL_DATASETS)
    assert dataset_loader("eurosat")(eurosat_root, **SAMPLE_SPLIT).split_hash == eurosat.split_hash
    pines = dataset_loader("indian_pines")(
        sample_data / "indian_pines_aviris", max_train=20, max_test=10
    )
    assert isinstance(pines, PixelSplit) and pines.task == "classification"
    assert pines.x_train.shape == (20, 200, 16, 16)


def test_eurosat_shapes_labels_and_b8a_last(eurosat, eurosat_root):
    assert isinstance(eurosat, LabelledSplit) and eurosat.task == "classification"
    assert eurosat.x_train.shape == (2, 13, 64, 64) and eurosat.x_test.shape == (2, 13, 64, 64)
    assert eurosat.x_train.dtype == np.float32 and eurosat.y_train.dtype == np.int64
    assert eurosat.class_names == ["AnnualCrop", "Highway", "Pasture", "SeaLake"]
    assert eurosat.band_ids == [f"S2L1C:{b}" for b in FILE_BANDS]
    assert eurosat.band_ids[8] == "S2L1C:B09" and eurosat.band_ids[12] == "S2L1C:B8A"
    assert eurosat.wavelengths[12] == pytest.approx(get_sensor("S2L1C").band("B8A").wavelength)
    folder = eurosat_root / "EuroSAT_MS"
    for x, y, ids in (
        (eurosat.x_train, eurosat.y_train, eurosat.train_ids),
        (eurosat.x_test, eurosat.y_test, eurosat.test_ids),
    ):
        for i, sample_id in enumerate(ids):
            assert eurosat.class_names[y[i]] == sample_id.split("/")[0]
            with rasterio.open(folder / sample_id) as ds:
                b8a = ds.read(13).astype(np.float64)  # the file's last band is B8A
            expected = _normalise(b8a, eurosat.stats["S2L1C:B8A"])
            np.testing.assert_allclose(x[i, 12], expected, rtol=1e-5, atol=1e-5)


def test_eurosat_split_determinism_and_train_only_stats(eurosat, eurosat_root, tmp_path):
    # The seed draws labels, never the split; the split seed moves scenes between splits.
    hashes = {load_eurosat(eurosat_root, seed=s, **SAMPLE_SPLIT).split_hash for s in range(4)}
    assert hashes == {eurosat.split_hash}
    moved = {
        tuple(load_eurosat(eurosat_root, split_seed=s, **SAMPLE_SPLIT).test_ids) for s in (0, 1, 3)
    }
    assert len(moved) > 1
    assert not set(eurosat.train_ids) & set(eurosat.test_ids)
    # Overwriting the test image's pixels leaves the statistics and the train images unchanged.
    shutil.copytree(eurosat_root / "EuroSAT_MS", tmp_path / "EuroSAT_MS")
    test_file = tmp_path / "EuroSAT_MS" / eurosat.test_ids[0]
    with rasterio.open(test_file, "r+") as ds:
        ds.write(ds.read() * 3)
    moved = load_eurosat(tmp_path, seed=0, **SAMPLE_SPLIT)
    assert moved.split_hash == eurosat.split_hash and moved.stats == eurosat.stats
    np.testing.assert_array_equal(moved.x_train, eurosat.x_train)
    assert not np.array_equal(moved.x_test, eurosat.x_test)


def test_eurosat_missing_folder_is_named(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "nowhere")):
        load_eurosat(tmp_path / "nowhere")


def test_bigearthnet_multi_hot_matches_parquet(ben_root):
    split = load_bigearthnet(ben_root, s1=True)
    assert split.task == "multilabel" and split.class_names == list(BEN_CLASSES)
    assert split.x_train.shape == (6, 14, 120, 120) and split.x_test.shape == (6, 14, 120, 120)
    assert split.y_train.shape == (6, 19) and split.y_train.dtype == np.float32
    assert split.band_ids[8] == "S2L2A:B8A" and split.band_ids[-2:] == ["S1GRD:VV", "S1GRD:VH"]
    assert len(split.band_ids) == 14 and split.wavelengths[-1] > 1e6  # radar wavelength
    meta = pq.read_table(ben_root / "metadata.parquet").to_pandas().set_index("patch_id")
    assert split.train_ids == list(meta.index[meta.split == "train"])
    assert split.test_ids == list(meta.index[meta.split == "test"])
    for y, ids in ((split.y_train, split.train_ids), (split.y_test, split.test_ids)):
        for row, patch in zip(y, ids, strict=True):
            named = {BEN_CLASSES[k] for k in np.flatnonzero(row)}
            assert named == set(meta.loc[patch, "labels"])
    # Normalised train bands have zero mean, unit std: statistics of the train patches only.
    assert np.abs(split.x_train.mean(axis=(0, 2, 3))).max() < 1e-4
    assert np.abs(split.x_train.std(axis=(0, 2, 3)) - 1).max() < 1e-4


def test_bigearthnet_upsampling_repeats_pixels(ben_root):
    import lmdb
    from safetensors.numpy import load

    split = load_bigearthnet(ben_root, test_split="validation")
    assert split.x_train.shape[1] == 12 and split.test_ids[0] not in split.train_ids
    env = lmdb.open(str(ben_root / "BigEarthNet-V2-LMDB"), readonly=True, lock=False)
    with env.begin() as txn:
        bands = load(txn.get(split.train_ids[0].encode()))
    env.close()
    for c, name, factor in ((0, "B01", 6), (8, "B8A", 2), (1, "B02", 1)):
        raw = np.kron(bands[name].astype(np.float64), np.ones((factor, factor)))  # [120, 120]
        expected = _normalise(raw, split.stats[split.band_ids[c]])
        np.testing.assert_allclose(split.x_train[0, c], expected, rtol=1e-5, atol=1e-5)


def test_bigearthnet_missing_metadata_is_named(tmp_path):
    with pytest.raises(DataError, match="metadata.parquet"):
        load_bigearthnet(tmp_path)


def test_change_pairs_taizhou(taizhou, change_root):
    assert taizhou.task == "change" and taizhou.class_names == ["unchanged", "changed"]
    assert taizhou.band_ids == [f"LANDSAT7ETM:{b}" for b in TAIZHOU_BANDS]
    n_train, n_test = len(taizhou.y_train), len(taizhou.y_test)
    assert taizhou.x_train.shape == (n_train, 2, 6, 32, 32) and n_train > 10 and n_test > 10
    assert taizhou.x_test.dtype == np.float32 and taizhou.y_test.dtype == np.int64
    for y in (taizhou.y_train, taizhou.y_test):
        assert set(np.unique(y).tolist()) == {-1, 0, 1}
    # A tile at origin (r, c) shows the scene's pixels and reference there.
    scene = change_root / "Taizhou"
    with rasterio.open(scene / "2003TM") as ds:
        after = ds.read().astype(np.float64)  # [6, 400, 400]
    with rasterio.open(scene / "change.bmp") as ds:
        changed = ds.read(1) > 0
    r, c = map(int, taizhou.train_ids[0].split(":")[1].split("_"))
    expected = _normalise(after[3, r : r + 32, c : c + 32], taizhou.stats["LANDSAT7ETM:B4"])
    np.testing.assert_allclose(taizhou.x_train[0, 1, 3], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(taizhou.y_train[0] == 1, changed[r : r + 32, c : c + 32])
    # No tile is in both splits.
    assert not set(taizhou.train_ids) & set(taizhou.test_ids)


def test_change_pairs_nanjing_and_split_determinism(change_root, taizhou):
    nanjing = load_change_pairs(change_root / "Nanjing")
    assert nanjing.band_ids[3] == "LANDSAT5TM:B4" and nanjing.x_train.shape[1:] == (2, 6, 32, 32)
    assert set(np.unique(nanjing.y_test).tolist()) == {-1, 0, 1}
    again = load_change_pairs(change_root, scene="taizhou", seed=0)
    assert again.split_hash == taizhou.split_hash
    assert load_change_pairs(change_root, scene="taizhou", seed=1).split_hash != taizhou.split_hash
    assert set(SCENES) == {"taizhou", "nanjing"}


def _write_geotiff_pair(change_root, folder, scale_test_pixel=None):
    """Taizhou as before.tif / after.tif / mask.tif (255 = unlabelled)."""
    scene = change_root / "Taizhou"
    folder.mkdir(exist_ok=True)
    with rasterio.open(scene / "change.bmp") as ds:
        changed = ds.read(1) > 0
    with rasterio.open(scene / "unchanged.bmp") as ds:
        unchanged = ds.read(1) > 0
    mask = np.where(changed, 1, np.where(unchanged, 0, 255)).astype(np.uint8)
    for src, name in (("2000TM", "before.tif"), ("2003TM", "after.tif")):
        with rasterio.open(scene / src) as ds:
            data, profile = ds.read(), {"crs": ds.crs, "transform": ds.transform}
        if name == "after.tif" and scale_test_pixel is not None:
            r, c = scale_test_pixel
            data[:, r, c] = 255 - data[:, r, c]
        _write(folder / name, data, profile)
    _write(folder / "mask.tif", mask[None], profile, nodata=255)


def _write(path, data, profile, nodata=None):
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=data.shape[2],
        height=data.shape[1],
        count=data.shape[0],
        dtype=data.dtype,
        nodata=nodata,
        **profile,
    ) as ds:
        ds.write(data)


def test_geotiff_change_pair_matches_envi_and_keeps_test_out_of_stats(
    change_root, taizhou, tmp_path
):
    _write_geotiff_pair(change_root, tmp_path / "pair")
    split = load_change_pairs(tmp_path / "pair", sensor="LANDSAT7ETM", bands=TAIZHOU_BANDS)
    assert split.band_ids == taizhou.band_ids and split.stats == taizhou.stats
    np.testing.assert_array_equal(split.y_train, taizhou.y_train)
    np.testing.assert_allclose(split.x_test, taizhou.x_test)
    # Altering a pixel of a test tile changes that tile only, never the statistics.
    r, c = map(int, taizhou.test_ids[0].split(":")[1].split("_"))
    _write_geotiff_pair(change_root, tmp_path / "altered", scale_test_pixel=(r + 5, c + 5))
    altered = load_change_pairs(tmp_path / "altered", sensor="LANDSAT7ETM", bands=TAIZHOU_BANDS)
    assert altered.stats == split.stats and altered.split_hash == split.split_hash
    np.testing.assert_array_equal(altered.x_train, split.x_train)
    assert not np.array_equal(altered.x_test[0], split.x_test[0])
    with pytest.raises(DataError, match=r"before\.tif.*B9"):
        load_change_pairs(tmp_path / "pair", sensor="LANDSAT7ETM", bands=TAIZHOU_BANDS[:5] + ["B9"])


def test_change_pairs_unknown_folder_is_named(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path)):
        load_change_pairs(tmp_path)


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def test_folder_csv_classification_on_eurosat_files(eurosat_root, eurosat, tmp_path):
    folder = eurosat_root / "EuroSAT_MS"
    files = sorted(folder.glob("*/*.tif"))
    table = tmp_path / "labels.csv"
    test_ids = set(eurosat.test_ids)
    rows = [
        [str(p), p.parent.name, "test" if p.relative_to(folder).as_posix() in test_ids else "train"]
        for p in files
    ]
    _write_csv(table, ["path", "label", "split"], rows)
    split = load_folder_csv(folder, sensor="S2L1C", csv_file=table, bands=list(FILE_BANDS))
    # Same files, same band mapping, the EuroSAT adapter's split: the same arrays.
    assert split.task == "classification" and split.class_names == eurosat.class_names
    assert split.band_ids == eurosat.band_ids
    np.testing.assert_array_equal(split.x_train, eurosat.x_train)
    np.testing.assert_array_equal(split.y_test, eurosat.y_test)
    _write_csv(table, ["path", "label"], [[str(p), p.parent.name] for p in files])
    with pytest.raises(DataError, match=r"AnnualCrop_1\.tif.*'B13'"):
        load_folder_csv(folder, sensor="S2L1C", csv_file=table, bands=[*FILE_BANDS[:12], "B13"])
    with pytest.raises(DataError, match=r"AnnualCrop_1\.tif has 13 bands"):
        load_folder_csv(folder, sensor="S2L2A", csv_file=table)


def test_folder_csv_multilabel_on_hydro_patches(sample_data, tmp_path):
    root = sample_data / "hydro_s2l2a_patches"
    names = sorted(p.name for p in root.glob("*.tif"))
    label_sets = ["water", "water;land", "land", "water;cloud", "land;cloud", "water", "land"]
    table = tmp_path / "labels.csv"
    rows = [
        [n, labels, "test" if i < 2 else "train"]
        for i, (n, labels) in enumerate(zip(names, label_sets, strict=True))
    ]
    _write_csv(table, ["path", "labels", "split"], rows)
    split = load_folder_csv(root, sensor="S2L2A", csv_file=table)
    assert split.task == "multilabel" and split.class_names == ["cloud", "land", "water"]
    assert split.x_train.shape == (5, 12, 256, 256) and split.y_test.shape == (2, 3)
    assert split.band_ids == [b.band_id for b in get_sensor("S2L2A").bands]
    np.testing.assert_array_equal(split.y_test, [[0, 0, 1], [0, 1, 1]])
    assert split.test_ids == names[:2]
    _write_csv(table, ["path", "label"], [["missing.tif", "a"]])
    with pytest.raises(DataError, match="missing.tif"):
        load_folder_csv(root, sensor="S2L2A", csv_file=table)


def test_torchgeo_style_samples_wrap_into_a_split(eurosat_root, eurosat):
    class Samples:  # a map-style dataset yielding torchgeo sample dicts
        def __init__(self, ids):
            self.ids = ids

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            with rasterio.open(eurosat_root / "EuroSAT_MS" / self.ids[i]) as ds:
                image = ds.read()
            return {"image": image, "label": eurosat.class_names.index(self.ids[i].split("/")[0])}

    split = to_labelled_split(
        Samples(eurosat.train_ids),
        Samples(eurosat.test_ids),
        sensor="S2L1C",
        bands=FILE_BANDS,
        task="classification",
        class_names=eurosat.class_names,
        name="EuroSAT",
    )
    assert split.band_ids == eurosat.band_ids and split.stats == eurosat.stats
    np.testing.assert_allclose(split.x_test, eurosat.x_test, rtol=1e-6)
    np.testing.assert_array_equal(split.y_train, eurosat.y_train)


def test_torchgeo_adapter_with_torchgeo(tmp_path):
    pytest.importorskip("torchgeo", reason="torchgeo is not installed; the adapter needs it")
    from eoforge.datasets.torchgeo_adapter import load_torchgeo

    with pytest.raises(DataError, match="NoSuchDataset"):
        load_torchgeo(tmp_path, name="NoSuchDataset", sensor="S2L1C")
