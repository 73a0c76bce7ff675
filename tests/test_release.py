"""The release card records the bands a model was trained on, and loading checks it."""

from __future__ import annotations

import json

import pytest
import torch

from eoforge.models import (
    ReleaseError,
    UnsupportedBandError,
    create_model,
    load_release,
    save_release,
)

BANDS = [
    {"band_id": "S2L2A:B04", "sensor": "S2L2A", "wavelength": 664.6, "bandwidth": 31.0},
    {"band_id": "S2L2A:B08", "sensor": "S2L2A", "wavelength": 832.8, "bandwidth": 106.0},
    {"band_id": "S1GRD:VV", "sensor": "S1GRD", "wavelength": 5.5466e7, "bandwidth": 0.0},
]


@pytest.fixture
def release(tmp_path):
    torch.manual_seed(0)
    model = create_model("vit_test_patch8")
    card = {
        "bands": BANDS,
        "normalisation": {b["band_id"]: {"p1": 0, "p99": 1, "mean": 0, "std": 1} for b in BANDS},
        "objective": {"name": "mae"},
        "data": {"samples": 1},
        "steps": 3,
    }
    return save_release(tmp_path / "r", model.state_dict(), "vit_test_patch8", {}, card), model


def test_round_trip_and_band_subset(release):
    path, model = release
    loaded = load_release(path, bands=["S2L2A:B08", "S2L2A:B04"])
    assert loaded.band_ids == ["S2L2A:B08", "S2L2A:B04"]
    torch.testing.assert_close(loaded.wavelengths, torch.tensor([832.8, 664.6]))
    x = torch.randn(1, 2, 16, 16)
    torch.testing.assert_close(
        loaded.encoder.forward_features(x, loaded.band_ids, loaded.wavelengths),
        model.eval().forward_features(x, loaded.band_ids, loaded.wavelengths),
    )
    assert load_release(path).band_ids == [b["band_id"] for b in BANDS]


def test_band_outside_the_card_is_refused_by_name(release):
    with pytest.raises(ReleaseError, match="S2L2A:B11"):
        load_release(release[0], bands=["S2L2A:B04", "S2L2A:B11"])


def test_unseen_band_with_wavelength_follows_the_rule_with_a_warning(release):
    with pytest.warns(UserWarning, match="S2L2A:B11"):
        loaded = load_release(
            release[0], bands=["S2L2A:B04", {"band_id": "S2L2A:B11", "wavelength": 1613.7}]
        )
    assert loaded.band_ids[-1] == "S2L2A:B11"
    with pytest.raises(UnsupportedBandError, match="LANDSAT89:B10"):
        load_release(release[0], bands=[{"band_id": "LANDSAT89:B10", "wavelength": 10895.0}])


def test_card_and_config_must_agree(release):
    path = release[0]
    config = json.loads((path / "config.json").read_text())
    config["kwargs"] = {"depth": 3}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ReleaseError, match="architecture"):
        load_release(path)


def test_hypernetwork_release_warns_for_bands_it_was_not_trained_on(tmp_path):
    torch.manual_seed(0)
    model = create_model("vit_test_patch8", tokenizer="dofa")
    card = {
        "bands": BANDS,
        "normalisation": {b["band_id"]: {"p1": 0, "p99": 1, "mean": 0, "std": 1} for b in BANDS},
        "objective": {"name": "mae"},
        "data": {},
        "steps": 1,
    }
    path = save_release(
        tmp_path / "dofa", model.state_dict(), "vit_test_patch8", {"tokenizer": "dofa"}, card
    )
    assert load_release(path).encoder.patch_embed.trained_bands == {b["band_id"] for b in BANDS}
    with pytest.warns(UserWarning, match="S2L2A:B05"):
        load_release(path, bands=["S2L2A:B04", {"band_id": "S2L2A:B05", "wavelength": 704.1}])


def test_model_card_states_whether_inputs_are_clipped(tmp_path):
    model = create_model("vit_test_patch8")
    for clip, wording in ((True, "clip to [p1, p99], scale"), (False, "no clipping, scale")):
        norm = {"p1": 0, "p99": 1, "mean": 0, "std": 1, "clip": clip}
        card = {
            "bands": BANDS,
            "normalisation": {b["band_id"]: norm for b in BANDS},
            "objective": {"name": "mae"},
            "data": {"samples": 1},
            "steps": 3,
        }
        path = save_release(tmp_path / str(clip), model.state_dict(), "vit_test_patch8", {}, card)
        assert wording in (path / "README.md").read_text()
        assert load_release(path).normalisation["S2L2A:B04"]["clip"] is clip


def test_verify_names_what_is_wrong(release, tmp_path):
    path = release[0]
    card = json.loads((path / "card.json").read_text())
    assert card["schema_version"] == 1 and card["eoforge_version"]
    assert card["gsd"] == {} and len(card["weights_sha256"]) == 64
    readme = (path / "README.md").read_text()
    # Model-hub front matter: the folder uploads as it is.
    assert readme.startswith("---\nlicense: cc-by-4.0\nlibrary_name: eoforge\ntags:\n")
    assert "- mae\n- S1GRD\n- S2L2A\n---" in readme

    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    with pytest.raises(
        ReleaseError, match="model.safetensors has sha256 .* the weights were changed"
    ):
        load_release(path)
    card["schema_version"] = 99
    (path / "card.json").write_text(json.dumps(card))
    with pytest.raises(ReleaseError, match="schema 99; this eoforge reads up to 1"):
        load_release(path)
    del card["bands"]
    (path / "card.json").write_text(json.dumps(card))
    with pytest.raises(ReleaseError, match=r"lacks keys \['bands'\]"):
        load_release(path)
    (path / "README.md").unlink()
    with pytest.raises(ReleaseError, match="lacks README.md"):
        load_release(path)
