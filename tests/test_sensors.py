"""The sensor and band registry: band counts, aliases, SAR conventions, hyperspectral tables."""

from __future__ import annotations

import json

import numpy as np
import pytest

from eoforge.datasets.errors import DataError
from eoforge.datasets.sensors import (
    MICROWAVE_MIN_NM,
    SENSORS,
    band_table,
    get_band,
    get_sensor,
)


def test_sentinel2_levels_have_13_and_12_bands():
    l1c, l2a = get_sensor("S2L1C"), get_sensor("S2L2A")
    assert len(l1c.bands) == 13
    assert len(l2a.bands) == 12
    assert "B10" in l1c.band_names and "B10" not in l2a.band_names
    assert l1c.band_names[8] == "B8A"  # canonical product order puts B8A after B08
    assert {b.gsd for b in l2a.bands} == {10.0, 20.0, 60.0}


@pytest.mark.parametrize("alias", ["B8A", "B08A", "B8a", "b8a", " B8A "])
def test_b8a_aliases_resolve(alias):
    for level in ("S2L1C", "S2L2A"):
        band = get_sensor(level).band(alias)
        assert band.name == "B8A"
        assert band.band_id == f"{level}:B8A"
    assert get_band(f"S2L2A:{alias.strip()}").wavelength == pytest.approx(864.7)


def test_short_sentinel2_names_resolve():
    s2 = get_sensor("S2L2A")
    assert s2.band("B2").name == "B02"  # SSL4EO-style file names (B2.tif)
    assert s2.find("B13") is None


def test_sar_bands_are_microwave_with_polarisation():
    s1 = get_sensor("S1GRD")
    assert s1.family == "sar"
    for band in s1.bands:
        assert band.kind == "sar"
        assert band.polarisation == band.name
        assert band.wavelength > MICROWAVE_MIN_NM  # ~5.5 cm in nm
        assert band.wavelength == pytest.approx(5.547e7, rel=1e-3)
        assert band.bandwidth == 0.0
        assert band.frequency_ghz == pytest.approx(5.405)
    assert {"VV", "VH"} <= set(s1.band_names)
    assert get_band("S1GRD:vv").name == "VV"


def test_no_optical_band_looks_like_radar():
    for sensor in SENSORS.values():
        for band in sensor.bands:
            if band.kind != "sar":
                assert 300 < band.wavelength < 20_000, band.band_id
                assert band.bandwidth > 0, band.band_id


def test_enmap_has_224_bands_vnir_then_swir():
    enmap = get_sensor("ENMAP")
    assert len(enmap.bands) == 224
    wl = np.array([b.wavelength for b in enmap.bands])
    fwhm = np.array([b.bandwidth for b in enmap.bands])
    vnir, swir = wl[:91], wl[91:]
    assert np.all(np.diff(vnir) > 0) and np.all(np.diff(swir) > 0)
    assert 415 < vnir[0] < 425 and 985 < vnir[-1] < 1000
    assert 895 < swir[0] < 910 and 2440 < swir[-1] < 2450
    assert wl[90] > wl[91]  # the detectors overlap between about 900 and 1000 nm
    assert np.all((fwhm > 4) & (fwhm < 15))
    assert enmap.bands[0].name == "B001" and enmap.band("1").name == "B001"
    assert enmap.nodata == -32768
    assert enmap.is_aux("QL_PIXELMASK") and not enmap.is_aux("SPECTRAL_IMAGE")


def test_aviris_has_200_bands(sample_data):
    aviris = get_sensor("AVIRIS")
    assert len(aviris.bands) == 200
    published = json.loads(
        (sample_data / "indian_pines_aviris" / "wavelengths_nm_from_tensorly.json").read_text()
    )
    assert [b.wavelength for b in aviris.bands] == pytest.approx(published)
    assert not np.all(np.diff(published) > 0)  # spectrometer overlaps: order kept as published


def test_landsat_bands_and_aux_layers():
    landsat = get_sensor("landsat8")
    assert landsat.name == "LANDSAT89"
    assert landsat.band_names == [f"B{i}" for i in range(1, 12)]
    assert landsat.band("B8").gsd == 15.0
    assert {landsat.band(n).kind for n in ("B10", "B11")} == {"thermal"}
    assert landsat.is_aux("BQA") and landsat.is_aux("QA_PIXEL")
    assert not landsat.is_aux("B1")


def test_sensor_aliases_any_case():
    assert get_sensor("s2l2a").name == "S2L2A"
    assert get_sensor("sentinel1").name == "S1GRD"
    assert get_sensor("EnMAP-HSI").name == "ENMAP"


def test_unknown_sensor_error_names_it_and_the_registry():
    with pytest.raises(DataError, match="S3OLCI") as info:
        get_sensor("S3OLCI")
    assert "S2L2A" in str(info.value) and "ENMAP" in str(info.value)


def test_unknown_band_error_names_it_and_the_valid_bands():
    with pytest.raises(DataError, match="'B13'.*S2L2A") as info:
        get_sensor("S2L2A").band("B13")
    assert "B8A" in str(info.value)
    with pytest.raises(DataError, match="B999"):
        get_band("ENMAP:B999")
    with pytest.raises(DataError, match="SENSOR:BAND"):
        get_band("B04")


def test_band_table_rows_carry_identity():
    rows = band_table(get_sensor("S1GRD").select(["VV", "VH"]))
    assert [r["band_id"] for r in rows] == ["S1GRD:VV", "S1GRD:VH"]
    assert {"sensor", "wavelength", "bandwidth", "gsd", "kind", "polarisation"} <= set(rows[0])
