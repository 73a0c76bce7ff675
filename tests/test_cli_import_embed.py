"""`eoforge release import` and `eoforge embed` from the command line."""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import rasterio
import torch
from test_embed import geotiff, release  # noqa: F401  (fixtures: a real S2 crop, a release)
from test_importers import S2_10, SatMAE, randomise

from eoforge.launch.cli import main
from eoforge.models import create_model, load_release


def test_release_import_from_a_satmae_training_checkpoint(tmp_path, capsys):
    torch.manual_seed(1)
    model = SatMAE().eval()
    randomise(model)
    checkpoint = tmp_path / "satmae.pth"
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(lr=1.0)}, checkpoint)
    out = tmp_path / "imported"
    argv = ["release", "import", str(checkpoint), str(out), "--layout", "satmae"]
    argv += ["--architecture", "vit_test_patch8", "--sensor", "S2L2A", "--bands", *S2_10]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no normalisation given: the default is named
        assert main(argv) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert main(["release", "verify", str(out)]) == 0
    loaded = load_release(out)
    assert loaded.band_ids == [f"S2L2A:{b}" for b in S2_10]
    assert loaded.card["objective"] == {"name": "imported", "source": "satmae"}
    assert "imported from a published satmae checkpoint" in (out / "README.md").read_text()


def test_embed_writes_a_georeferenced_embedding(release, geotiff, tmp_path):  # noqa: F811
    out = tmp_path / "emb.tif"
    assert (
        main(["embed", "--release", str(release), str(geotiff), str(out), "--sensor", "S2L2A"]) == 0
    )
    with rasterio.open(geotiff) as src, rasterio.open(out) as emb:
        assert emb.crs == src.crs
        assert (emb.height, emb.width) == (-(-src.height // 8), -(-src.width // 8))
        assert emb.transform == src.transform * src.transform.scale(8, 8)
        assert emb.count == create_model("vit_test_patch8").embed_dim  # one band per feature
        assert np.isfinite(emb.read(1)).any()
