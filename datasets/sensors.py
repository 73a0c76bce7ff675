"""Sensor and band registry: the single source of band identity in eoforge.

Every band has a registry key ``band_id`` of the form ``"<SENSOR>:<BAND>"`` (``"S2L2A:B8A"``,
``"S1GRD:VV"``), a centre wavelength and bandwidth in nanometres, its native ground sampling
distance, and its sensor's scale/offset/units/nodata. These numbers travel with every sample
(see the sample contract in ``eoforge.datasets.reader``) so models never import this module.

SAR convention: a SAR band's ``wavelength`` is the radar wavelength in nm (Sentinel-1 C band,
5.405 GHz -> 55.47 mm = 5.547e7 nm), ``kind`` is ``"sar"``, ``polarisation`` names the transmit/
receive pair and ``frequency_ghz`` the carrier. ``bandwidth`` is 0 for SAR: a radar band is
identified by polarisation and frequency, not by a spectral interval. Anything above 1e6 nm is
therefore microwave and can never be mistaken for an optical band.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from eoforge.datasets.errors import DataError
from eoforge.datasets.spectral_tables import (
    AVIRIS_FWHM_NM,
    AVIRIS_INDIAN_PINES_WAVELENGTHS,
    ENMAP_BANDS,
)

SPEED_OF_LIGHT_M_S = 299_792_458.0
MICROWAVE_MIN_NM = 1e6  # 1 mm: everything longer is radar, never optical


@dataclass(frozen=True)
class Band:
    """One band of one sensor.

    Attributes:
        name: canonical band name within the sensor (``"B8A"``, ``"VV"``).
        sensor: registry name of the sensor (``"S2L2A"``).
        wavelength: centre wavelength in nm (SAR: radar wavelength in nm).
        bandwidth: full width at half maximum in nm (0 for SAR).
        gsd: native ground sampling distance in metres (None where it varies, e.g. RGB).
        kind: ``"optical"``, ``"thermal"`` or ``"sar"``.
        aliases: other spellings accepted when matching file or band names.
        polarisation: SAR polarisation (``"VV"``), else None.
        frequency_ghz: SAR carrier frequency, else None.
    """

    name: str
    sensor: str
    wavelength: float
    bandwidth: float
    gsd: float | None
    kind: str = "optical"
    aliases: tuple[str, ...] = ()
    polarisation: str | None = None
    frequency_ghz: float | None = None

    @property
    def band_id(self) -> str:
        return f"{self.sensor}:{self.name}"

    def to_dict(self) -> dict:
        """The band-table row written into shard metadata and release cards."""
        return {
            "band_id": self.band_id,
            "sensor": self.sensor,
            "name": self.name,
            "wavelength": self.wavelength,
            "bandwidth": self.bandwidth,
            "gsd": self.gsd,
            "kind": self.kind,
            "polarisation": self.polarisation,
        }


@dataclass(frozen=True)
class Sensor:
    """A sensor (or product level) with its bands in canonical file order.

    Attributes:
        name: registry key, also the prefix of every band_id.
        family: ``"optical"``, ``"sar"`` or ``"hyperspectral"``.
        bands: bands in the product's canonical order (the order of multi-band files).
        scale, offset: physical value = DN * scale + offset.
        units: physical units after scale/offset.
        nodata: nodata value of the raw files, or None.
        aux: file-name tokens of non-spectral layers that readers skip (quality masks).
        aliases: other names accepted for the sensor.
        source: where the band numbers come from.
    """

    name: str
    family: str
    bands: tuple[Band, ...]
    scale: float = 1.0
    offset: float = 0.0
    units: str = "DN"
    nodata: float | None = None
    aux: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    source: str = ""
    _lookup: dict[str, Band] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        for band in self.bands:
            for key in (band.name, *band.aliases):
                self._lookup[key.upper()] = band

    @property
    def band_names(self) -> list[str]:
        return [b.name for b in self.bands]

    def find(self, name: str) -> Band | None:
        """The band called ``name`` (any alias, any case), or None."""
        return self._lookup.get(name.strip().upper())

    def band(self, name: str) -> Band:
        """The band called ``name``; raises DataError naming it and the valid names."""
        band = self.find(name)
        if band is None:
            raise DataError(
                f"unknown band {name!r} for sensor {self.name}; known bands: "
                f"{_summarise(self.band_names)}"
            )
        return band

    def select(self, names: Iterable[str] | None) -> list[Band]:
        """Bands by name in the given order (all bands when ``names`` is None)."""
        return list(self.bands) if names is None else [self.band(n) for n in names]

    def is_aux(self, token: str) -> bool:
        return any(token.upper().startswith(a.upper()) for a in self.aux)


def _summarise(names: Sequence[str], limit: int = 16) -> str:
    if len(names) <= limit:
        return ", ".join(names)
    return f"{', '.join(names[: limit // 2])}, ..., {', '.join(names[-limit // 2 :])} ({len(names)} bands)"


def _sentinel2(level: str) -> Sensor:
    # Sentinel-2A MSI spectral response (ESA, S2-SRF COPE-GSEG-EOPG-TN-15-0007 v3.2): centre, FWHM, GSD.
    table = [
        ("B01", 442.7, 21.0, 60.0),
        ("B02", 492.4, 66.0, 10.0),
        ("B03", 559.8, 36.0, 10.0),
        ("B04", 664.6, 31.0, 10.0),
        ("B05", 704.1, 15.0, 20.0),
        ("B06", 740.5, 15.0, 20.0),
        ("B07", 782.8, 20.0, 20.0),
        ("B08", 832.8, 106.0, 10.0),
        ("B8A", 864.7, 21.0, 20.0),
        ("B09", 945.1, 20.0, 60.0),
        ("B10", 1373.5, 31.0, 60.0),
        ("B11", 1613.7, 91.0, 20.0),
        ("B12", 2202.4, 175.0, 20.0),
    ]
    if level == "L2A":  # the cirrus band carries no surface signal and is not in L2A products
        table = [row for row in table if row[0] != "B10"]
    name = f"S2{level}"
    bands = tuple(Band(n, name, wl, bw, gsd, aliases=_s2_aliases(n)) for n, wl, bw, gsd in table)
    return Sensor(
        name=name,
        family="optical",
        bands=bands,
        scale=1e-4,
        units="reflectance",
        nodata=0,
        aux=("cloud_mask", "SCL", "MSK_", "CLD"),  # cloud/quality layers next to the bands
        aliases=(f"sentinel2_{level.lower()}", f"sentinel-2-{level.lower()}", f"MSI{level}"),
        source="ESA Sentinel-2A spectral response functions, COPE-GSEG-EOPG-TN-15-0007 v3.2",
    )


def _s2_aliases(name: str) -> tuple[str, ...]:
    if name == "B8A":
        return ("B08A", "B8a")
    return (name.replace("B0", "B"),) if name.startswith("B0") else ()


def _sentinel1() -> Sensor:
    freq = 5.405
    wavelength_nm = SPEED_OF_LIGHT_M_S / (freq * 1e9) * 1e9
    bands = tuple(
        Band(
            pol,
            "S1GRD",
            wavelength_nm,
            0.0,
            10.0,
            kind="sar",
            polarisation=pol,
            frequency_ghz=freq,
            aliases=(pol.lower(),),
        )
        for pol in ("VV", "VH", "HH", "HV")
    )
    return Sensor(
        name="S1GRD",
        family="sar",
        bands=bands,
        units="dB (sigma0)",
        nodata=None,
        aliases=("sentinel1", "sentinel-1-grd", "S1"),
        source="ESA Sentinel-1 SAR user guide: C band, 5.405 GHz, IW GRDH 10 m pixels",
    )


def _landsat89() -> Sensor:
    # OLI/TIRS band passes (USGS Landsat 8-9 Data Users Handbook v1.0, table 2-1): centre, FWHM, GSD.
    table = [
        ("B1", 443.0, 16.0, 30.0, "optical"),
        ("B2", 482.0, 60.0, 30.0, "optical"),
        ("B3", 561.4, 57.0, 30.0, "optical"),
        ("B4", 654.6, 37.0, 30.0, "optical"),
        ("B5", 864.7, 28.0, 30.0, "optical"),
        ("B6", 1608.9, 85.0, 30.0, "optical"),
        ("B7", 2200.7, 187.0, 30.0, "optical"),
        ("B8", 589.5, 173.0, 15.0, "optical"),
        ("B9", 1373.4, 21.0, 30.0, "optical"),
        ("B10", 10895.0, 590.0, 100.0, "thermal"),
        ("B11", 12005.0, 1010.0, 100.0, "thermal"),
    ]
    bands = tuple(
        Band(n, "LANDSAT89", wl, bw, gsd, kind=kind, aliases=(f"B0{n[1:]}", f"SR_{n}", f"ST_{n}"))
        for n, wl, bw, gsd, kind in table
    )
    return Sensor(
        name="LANDSAT89",
        family="optical",
        bands=bands,
        units="DN (Level-1)",
        nodata=0,
        aux=("BQA", "QA_PIXEL", "QA_RADSAT", "SAA", "SZA", "VAA", "VZA"),
        aliases=("landsat8", "landsat9", "L8", "L9", "LC08", "LC09", "OLI_TIRS"),
        source="USGS Landsat 8-9 OLI/TIRS Collection 2 Data Users Handbook, table 2-1",
    )


def _landsat_tm_etm(
    name: str, table: Sequence[tuple], aliases: tuple[str, ...], source: str
) -> Sensor:
    # Rows (band, band-pass start, end in um, GSD, kind): centre = middle of the pass, bandwidth
    # = its width, as the handbooks publish passes rather than response centroids.
    bands = tuple(
        Band(
            n,
            name,
            round((lo + hi) * 500.0, 3),
            round((hi - lo) * 1000.0, 3),
            gsd,
            kind=kind,
            aliases=(f"B0{n[1:]}",),
        )
        for n, lo, hi, gsd, kind in table
    )
    return Sensor(
        name=name,
        family="optical",
        bands=bands,
        units="DN (Level-1)",
        nodata=0,
        aux=("BQA", "QA_PIXEL", "MTL"),
        aliases=aliases,
        source=source,
    )


def _landsat5_tm() -> Sensor:
    table = [
        ("B1", 0.45, 0.52, 30.0, "optical"),
        ("B2", 0.52, 0.60, 30.0, "optical"),
        ("B3", 0.63, 0.69, 30.0, "optical"),
        ("B4", 0.76, 0.90, 30.0, "optical"),
        ("B5", 1.55, 1.75, 30.0, "optical"),
        ("B6", 10.40, 12.50, 120.0, "thermal"),
        ("B7", 2.08, 2.35, 30.0, "optical"),
    ]
    return _landsat_tm_etm(
        "LANDSAT5TM",
        table,
        ("landsat5", "landsat4", "L5", "LT05", "TM"),
        "USGS Landsat 4-5 Thematic Mapper (TM) Level-1 Data Format Control Book: band passes",
    )


def _landsat7_etm() -> Sensor:
    table = [
        ("B1", 0.45, 0.515, 30.0, "optical"),
        ("B2", 0.525, 0.605, 30.0, "optical"),
        ("B3", 0.63, 0.69, 30.0, "optical"),
        ("B4", 0.775, 0.90, 30.0, "optical"),
        ("B5", 1.55, 1.75, 30.0, "optical"),
        ("B6", 10.40, 12.50, 60.0, "thermal"),
        ("B7", 2.09, 2.35, 30.0, "optical"),
        ("B8", 0.52, 0.90, 15.0, "optical"),
    ]
    return _landsat_tm_etm(
        "LANDSAT7ETM",
        table,
        ("landsat7", "L7", "LE07", "ETM+", "ETM"),
        "USGS Landsat 7 (L7) Data Users Handbook: ETM+ band passes",
    )


def _numbered(sensor: str, rows: Sequence[tuple[float, float]], gsd: float) -> tuple[Band, ...]:
    return tuple(
        Band(f"B{i + 1:03d}", sensor, wl, fwhm, gsd, aliases=(f"B{i + 1}", str(i + 1)))
        for i, (wl, fwhm) in enumerate(rows)
    )


def _enmap() -> Sensor:
    return Sensor(
        name="ENMAP",
        family="hyperspectral",
        bands=_numbered("ENMAP", ENMAP_BANDS, 30.0),
        scale=1e-4,
        units="reflectance",
        nodata=-32768,
        aux=("QL_",),
        aliases=("enmap_l2a", "EnMAP-HSI"),
        source="EnMAP HSI spectral characterisation (see eoforge.datasets.spectral_tables)",
    )


def _aviris_indian_pines() -> Sensor:
    rows = [(wl, AVIRIS_FWHM_NM) for wl in AVIRIS_INDIAN_PINES_WAVELENGTHS]
    return Sensor(
        name="AVIRIS",
        family="hyperspectral",
        bands=_numbered("AVIRIS", rows, 20.0),
        units="DN",
        nodata=None,
        aliases=("aviris_indian_pines", "indian_pines"),
        source="AVIRIS Indian Pines corrected cube, 200 bands (see eoforge.datasets.spectral_tables)",
    )


def _rgb() -> Sensor:
    bands = (
        Band("R", "RGB", 665.0, 60.0, None, aliases=("red",)),
        Band("G", "RGB", 560.0, 60.0, None, aliases=("green",)),
        Band("B", "RGB", 490.0, 60.0, None, aliases=("blue",)),
    )
    return Sensor(
        name="RGB",
        family="optical",
        bands=bands,
        units="DN",
        nodata=None,
        aliases=("rgb", "truecolour", "truecolor"),
        source="generic camera: Sentinel-2-like centres (B04/B03/B02), 60 nm passbands",
    )


def _s2_rgb8() -> Sensor:
    # 8-bit true-colour renderings of Sentinel-2 (EuroSAT RGB): display values, not reflectance,
    # so they get a sensor of their own and their statistics never mix with S2 reflectance bands.
    s2 = {b.name: b for b in _sentinel2("L1C").bands}
    bands = tuple(
        Band(name, "S2RGB8", s2[s2_name].wavelength, s2[s2_name].bandwidth, 10.0, aliases=aliases)
        for name, s2_name, aliases in (
            ("R", "B04", ("red", "B04")),
            ("G", "B03", ("green", "B03")),
            ("B", "B02", ("blue", "B02")),
        )
    )
    return Sensor(
        name="S2RGB8",
        family="optical",
        bands=bands,
        units="DN (8-bit rendering)",
        nodata=None,
        aliases=("sentinel2_rgb8", "eurosat_rgb"),
        source="Sentinel-2 B04/B03/B02 rendered to 8 bit (EuroSAT RGB); centres and FWHM of S2A",
    )


def _build_registry() -> dict[str, Sensor]:
    sensors = [
        _sentinel2("L1C"),
        _sentinel2("L2A"),
        _sentinel1(),
        _landsat89(),
        _landsat5_tm(),
        _landsat7_etm(),
        _enmap(),
        _aviris_indian_pines(),
        _rgb(),
        _s2_rgb8(),
    ]
    return {s.name: s for s in sensors}


SENSORS: dict[str, Sensor] = _build_registry()


def get_sensor(name: str) -> Sensor:
    """The sensor registered as ``name`` or one of its aliases (case-insensitive)."""
    key = name.strip().upper()
    for sensor in SENSORS.values():
        if key == sensor.name.upper() or key in (a.upper() for a in sensor.aliases):
            return sensor
    raise DataError(f"unknown sensor {name!r}; registered sensors: {', '.join(SENSORS)}")


def get_band(band_id: str) -> Band:
    """The band for a registry key ``"SENSOR:BAND"`` (aliases accepted on both sides)."""
    sensor_name, sep, band_name = band_id.partition(":")
    if not sep:
        raise DataError(f"band id {band_id!r} is not of the form 'SENSOR:BAND' (e.g. 'S2L2A:B8A')")
    return get_sensor(sensor_name).band(band_name)


def band_table(bands: Iterable[Band]) -> list[dict]:
    """Rows for shard metadata and release cards."""
    return [b.to_dict() for b in bands]
