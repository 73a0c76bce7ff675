"""``embed_geotiff`` on a real Sentinel-2 L2A GeoTIFF (hydro_s2l2a_patches, 12 bands, 256 x 256)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import Affine
from rasterio.windows import Window

from eoforge.datasets.errors import DataError
from eoforge.datasets.sensors import get_sensor
from eoforge.finetune.embed import embed_geotiff
from eoforge.models import create_model, load_release, save_release

S2 = get_sensor("S2L2A")
P, WINDOW = 8, 32  # vit_test_patch8; crops of 4 x 4 patches
NORM = {"p1": 1000.0, "p99": 3500.0, "mean": 0.4, "std": 0.25, "clip": True}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("vit_test_patch8")
    card = {
        "bands": [b.to_dict() for b in S2.bands],
        "normalisation": {b.band_id: dict(NORM) for b in S2.bands},
        "objective": {"name": "mae"},
        "data": {"samples": 0},
        "steps": 0,
    }
    return save_release(
        tmp_path_factory.mktemp("rel") / "r", model.state_dict(), "vit_test_patch8", {}, card
    )


@pytest.fixture(scope="module")
def geotiff(sample_data, tmp_path_factory):
    """A 203 x 250 crop of a real patch (sides not multiples of the patch), written to tmp."""
    src = sample_data / "hydro_s2l2a_patches" / "patch_0.tif"
    out = tmp_path_factory.mktemp("tif") / "crop.tif"
    with rasterio.open(src) as ds:
        window = Window(3, 5, 250, 203)
        data = ds.read(window=window)
        profile = {**ds.profile, "height": 203, "width": 250}
        profile.update(transform=ds.window_transform(window), tiled=False)
        profile.pop("blockxsize"), profile.pop("blockysize")
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(data)
    return out


def normalise(raw: np.ndarray) -> np.ndarray:
    x = np.clip(raw.astype(np.float64), NORM["p1"], NORM["p99"])
    return (((x - NORM["p1"]) / (NORM["p99"] - NORM["p1"]) - NORM["mean"]) / NORM["std"]).astype(
        np.float32
    )


def read(path):
    with rasterio.open(path) as ds:
        return ds.read(), ds.crs, ds.transform, ds.nodata


def test_georeferenced_per_patch_embeddings(release, geotiff, tmp_path):
    out = embed_geotiff(
        release,
        geotiff,
        tmp_path / "emb.tif",
        sensor="S2L2A",
        window=WINDOW,
        tile=64,
        progress=False,
    )
    emb, crs, transform, nodata = read(out)
    _, src_crs, src_transform, _ = read(geotiff)
    assert emb.shape == (64, math.ceil(203 / P), math.ceil(250 / P)) and emb.dtype == np.float32
    assert crs == src_crs
    assert transform == src_transform @ Affine.scale(P)
    assert math.isnan(nodata) and np.isfinite(emb).all()


def test_embeddings_equal_encoding_the_crop_directly(release, geotiff, tmp_path):
    out = embed_geotiff(
        release,
        geotiff,
        tmp_path / "emb.tif",
        sensor="S2L2A",
        window=WINDOW,
        tile=64,
        progress=False,
    )
    emb = read(out)[0]
    loaded = load_release(release)
    with rasterio.open(geotiff) as ds:  # the crop in the second crop-row, third crop-column
        raw = ds.read(window=Window(2 * WINDOW, WINDOW, WINDOW, WINDOW))
    x = torch.from_numpy(normalise(raw))[None]
    with torch.no_grad():
        tokens = loaded.encoder.forward_features(x, loaded.band_ids, loaded.wavelengths)
    expected = tokens[0, 1:].reshape(4, 4, -1).permute(2, 0, 1).numpy()
    np.testing.assert_allclose(emb[:, 4:8, 8:12], expected, atol=1e-5, rtol=1e-5)


def test_tile_size_does_not_change_the_result(release, geotiff, tmp_path):
    small = embed_geotiff(
        release,
        geotiff,
        tmp_path / "a.tif",
        sensor="S2L2A",
        window=WINDOW,
        tile=WINDOW,
        progress=False,
    )
    large = embed_geotiff(
        release,
        geotiff,
        tmp_path / "b.tif",
        sensor="S2L2A",
        window=WINDOW,
        tile=4 * WINDOW,
        progress=True,
    )
    np.testing.assert_array_equal(read(small)[0], read(large)[0])


def test_nodata_patches_are_nan_and_partial_patches_embedded(release, geotiff, tmp_path):
    with rasterio.open(geotiff) as ds:
        data, profile = ds.read(), ds.profile
    data[:, :P, :P] = 0  # Sentinel-2's registered nodata, every band: one whole patch
    data[:, P : P + 2, :P] = 0  # part of the patch below
    holed = tmp_path / "holed.tif"
    with rasterio.open(holed, "w", **profile) as dst:
        dst.write(data)
    emb = read(
        embed_geotiff(
            release, holed, tmp_path / "e.tif", sensor="S2L2A", window=WINDOW, progress=False
        )
    )[0]
    assert np.isnan(emb[:, 0, 0]).all()
    assert np.isfinite(emb[:, 1, 0]).all() and np.isfinite(emb[:, 0, 1]).all()


def test_explicit_band_ids_and_errors_name_the_band(release, geotiff, tmp_path):
    names = [b.name for b in S2.bands]
    by_name = embed_geotiff(
        release,
        geotiff,
        tmp_path / "n.tif",
        sensor="S2L2A",
        bands=[n.replace("B0", "B") for n in names],
        window=WINDOW,
        progress=False,
    )
    by_sensor = embed_geotiff(
        release, geotiff, tmp_path / "s.tif", sensor="S2L2A", window=WINDOW, progress=False
    )
    np.testing.assert_array_equal(read(by_name)[0], read(by_sensor)[0])
    wrong = [f"S2L2A:{n}" for n in names[:-1]] + ["S2L2A:B99"]
    with pytest.raises(DataError, match="B99"):
        embed_geotiff(release, geotiff, tmp_path / "x.tif", bands=wrong, progress=False)
    with pytest.raises(DataError, match="S1GRD"):
        embed_geotiff(release, geotiff, tmp_path / "x.tif", sensor="S1GRD", progress=False)


def test_bands_outside_the_release_are_named_and_left_out(geotiff, tmp_path):
    model = create_model("vit_test_patch8")
    kept = S2.bands[1:5]
    card = {
        "bands": [b.to_dict() for b in kept],
        "normalisation": {b.band_id: dict(NORM) for b in kept},
        "objective": {"name": "mae"},
        "data": {},
        "steps": 0,
    }
    path = save_release(tmp_path / "r4", model.state_dict(), "vit_test_patch8", {}, card)
    with pytest.warns(UserWarning, match="S2L2A:B01"):
        out = embed_geotiff(
            path, geotiff, tmp_path / "e.tif", sensor="S2L2A", window=WINDOW, progress=False
        )
    with rasterio.open(out) as ds:
        assert ds.tags()["bands"] == ",".join(b.band_id for b in kept)
