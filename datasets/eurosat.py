"""EuroSAT (Helber et al. 2019, doi:10.1109/JSTARS.2019.2918242): scene classification from class
folders, in both of its published forms.

Forms, told apart by the files (or forced with ``form=``):

* ``ms``: EuroSAT MS (``EuroSATallBands``): ``[EuroSAT_MS/]<Class>/<Class>_<id>.tif``, 13-band
  uint16 Sentinel-2 L1C GeoTIFFs without band descriptions. The channels of ``x`` are the file's
  bands in FILE order, which is NOT the canonical Sentinel-2 order: B8A is the LAST band of these
  files (github.com/phelber/EuroSAT issue 7). ``FILE_BANDS`` maps file band 1..13 to the registry
  ids ``S2L1C:B01 .. B12, B8A``.
* ``rgb``: EuroSAT RGB (``EuroSAT.zip``): ``[2750/ | EuroSAT_RGB/]<Class>/<Class>_<id>.jpg``,
  8-bit renderings of B04, B03, B02 without georeference. They are sensor ``S2RGB8`` (bands
  ``R, G, B`` at B04/B03/B02's wavelengths), never Sentinel-2 reflectance, so their statistics
  never mix with reflectance bands on a card.

Scene ids are ``<Class>_<id>`` (the file stem); the two forms share them. The class of an image is
its folder's name; ``class_names`` are the folder names, sorted.

Split rule (``scene_splits``): the split is drawn over EuroSAT's whole id space, not over the files
found, so that a scene lands in the same split in every form and in every subset of EuroSAT. For
each class, ids ``1..CLASS_SIZES[class]`` are permuted by a generator seeded with
``(split_seed, class index in CLASS_SIZES)``; the first ``round(test_fraction * size)`` positions
are test, the next ``round(val_fraction * size)`` validation, the rest train. On the full set the
split is exactly stratified; on a subset it is a stratified draw in expectation (each scene's
chance is the same). ``split="val"`` scores the validation scenes and trains on the rest of train
(test scenes are never read), for choosing recipes; ``split="test"`` trains on train + validation.

Label draws: ``labels_per_class=N`` keeps N training images per class, drawn with ``seed``; the
bench's seeds therefore repeat the label draws (and probe initialisation), never the test split,
which only ``split_seed`` changes. ``split_hash`` follows ``labelled.ids_split_hash`` over the
scene ids. Normalisation statistics come from the pixels of the training images kept.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning

from eoforge.datasets.errors import DataError
from eoforge.datasets.labelled import LabelledSplit, ids_split_hash, normalise_stacks
from eoforge.datasets.sensors import get_sensor

FILE_BANDS = (
    "B01",
    "B02",
    "B03",
    "B04",
    "B05",
    "B06",
    "B07",
    "B08",
    "B09",
    "B10",
    "B11",
    "B12",
    "B8A",
)
RGB_BANDS = ("R", "G", "B")
# Images per class in EuroSAT (27,000 in all); scene ids run 1..size within each class.
CLASS_SIZES = {
    "AnnualCrop": 3000,
    "Forest": 3000,
    "HerbaceousVegetation": 3000,
    "Highway": 2500,
    "Industrial": 2500,
    "Pasture": 2000,
    "PermanentCrop": 2500,
    "Residential": 3000,
    "River": 2500,
    "SeaLake": 3000,
}
SPLITS = ("test", "val")


@dataclass(frozen=True)
class Form:
    """One published form of EuroSAT: its folder names, file extension, sensor and file bands."""

    name: str
    folders: tuple[str, ...]
    suffix: str
    sensor: str
    bands: tuple[str, ...]


FORMS = {
    "ms": Form("ms", ("EuroSAT_MS",), ".tif", "S2L1C", FILE_BANDS),
    "rgb": Form("rgb", ("2750", "EuroSAT_RGB"), ".jpg", "S2RGB8", RGB_BANDS),
}


def find_images(root: str | Path, form: str | None = None) -> tuple[Form, Path, list[Path]]:
    """(the form, its class-folder root, the image files sorted) of EuroSAT under ``root``.

    ``form`` None tells the form by the files: ``.tif`` class folders are MS, ``.jpg`` ones RGB.

    Raises:
        DataError: naming the folder when it holds no EuroSAT images, holds both forms without
            ``form``, or ``form`` is unknown.
    """
    root = Path(root)
    if form is not None and form not in FORMS:
        raise DataError(f"form={form!r}: EuroSAT comes as {' or '.join(FORMS)}")
    if not root.is_dir():
        raise DataError(f"{root} not found; point the dataset at a EuroSAT folder")
    found = {}
    for candidate in [FORMS[form]] if form else FORMS.values():
        for folder in (*(root / name for name in candidate.folders), root):
            paths = sorted(folder.glob(f"*/*{candidate.suffix}"))
            if paths:
                found[candidate.name] = (candidate, folder, paths)
                break
    if not found:
        kinds = " or ".join(
            f"<Class>/*{f.suffix}" for f in ([FORMS[form]] if form else FORMS.values())
        )
        raise DataError(
            f"{root}: no EuroSAT images ({kinds}) found; point the dataset at the folder holding "
            "EuroSAT_MS/ or 2750/ (e.g. ../shared/data/eurosat_rgb)"
        )
    if len(found) > 1:
        raise DataError(f"{root} holds both EuroSAT MS and RGB images; choose one with form=ms|rgb")
    return next(iter(found.values()))


def scene_id(path: Path) -> str:
    """``<Class>_<id>``: the scene's id, shared by its MS and RGB files."""
    return path.stem


def scene_splits(
    ids: list[str], *, split_seed: int = 0, test_fraction: float = 0.2, val_fraction: float = 0.2
) -> np.ndarray:
    """The split of each scene id: an array of ``"train"``, ``"val"`` or ``"test"`` (module
    docstring's rule).

    Raises:
        DataError: naming an id that is not ``<Class>_<n>`` with a EuroSAT class and n in range.
    """
    if not (0 < test_fraction < 1 and 0 <= val_fraction < 1 and test_fraction + val_fraction < 1):
        raise ValueError(
            f"test_fraction={test_fraction} and val_fraction={val_fraction} must be fractions "
            "summing to less than 1"
        )
    positions = {}
    for index, (name, size) in enumerate(CLASS_SIZES.items()):
        order = np.random.default_rng([split_seed, index]).permutation(size)  # position -> id - 1
        where = np.empty(size, dtype=np.int64)
        where[order] = np.arange(size)
        positions[name] = (where, round(test_fraction * size), round(val_fraction * size))
    out = []
    for sid in ids:
        name, _, number = sid.rpartition("_")
        if (
            name not in CLASS_SIZES
            or not number.isdigit()
            or not 1 <= int(number) <= CLASS_SIZES[name]
        ):
            raise DataError(
                f"{sid!r} is not a EuroSAT scene id (<Class>_<1..class size>, classes "
                f"{', '.join(CLASS_SIZES)}); rename the file or use the folder_csv dataset"
            )
        where, n_test, n_val = positions[name]
        position = where[int(number) - 1]
        out.append("test" if position < n_test else "val" if position < n_test + n_val else "train")
    return np.array(out)


def load_eurosat(
    root: str | Path,
    *,
    form: str | None = None,
    split: str = "test",
    split_seed: int = 0,
    test_fraction: float = 0.2,
    val_fraction: float = 0.2,
    labels_per_class: int | None = None,
    seed: int = 0,
) -> LabelledSplit:
    """Read EuroSAT class folders under ``root`` and split them by scene (module docstring).

    Args:
        root: folder holding ``EuroSAT_MS/``, ``2750/`` or ``EuroSAT_RGB/`` (or one of them).
        form: ``"ms"`` or ``"rgb"``; None tells it by the files.
        split: ``"test"`` scores the test scenes; ``"val"`` the validation scenes (recipes).
        split_seed: seeds the scene split; the same for every form.
        test_fraction, val_fraction: shares of EuroSAT's scenes in test and validation.
        labels_per_class: training images kept per class (None: all of the split's).
        seed: draws those training images.

    Returns:
        A ``"classification"`` split: x [N, C, 64, 64] float32 (MS: 13 bands in file order; RGB:
        R, G, B).

    Raises:
        DataError: naming the folder, the file whose band count or size differs, the split left
            empty, or the class with fewer training images than ``labels_per_class``.
    """
    if split not in SPLITS:
        raise DataError(f"split={split!r}: score one of {', '.join(SPLITS)}")
    kind, folder, paths = find_images(root, form)
    ids = [scene_id(p) for p in paths]
    assigned = scene_splits(
        ids, split_seed=split_seed, test_fraction=test_fraction, val_fraction=val_fraction
    )
    scored = assigned == split
    training = assigned == "train" if split == "val" else assigned != "test"
    class_names = sorted({p.parent.name for p in paths})
    labels = np.array([class_names.index(p.parent.name) for p in paths], dtype=np.int64)
    train = np.flatnonzero(training)
    if labels_per_class is not None:
        train = _draw_labels(train, labels, labels_per_class, class_names, seed, folder)
    test = np.flatnonzero(scored)
    for name, chosen in (("training", train), (split, test)):
        if not len(chosen):
            raise DataError(
                f"{folder}: the {name} split of these {len(paths)} images is empty at "
                f"test_fraction={test_fraction}, val_fraction={val_fraction}; use more images "
                "or larger fractions"
            )
    images = _read_all([paths[i] for i in (*train, *test)], kind)  # [N, C, H, W]
    sensor = get_sensor(kind.sensor)
    bands = [sensor.band(name) for name in kind.bands]
    band_ids = [band.band_id for band in bands]
    x_train, x_test, stats = normalise_stacks(
        images[: len(train)], images[len(train) :], band_ids, folder
    )
    names = [p.relative_to(folder).as_posix() for p in paths]
    train_ids, test_ids = [names[i] for i in train], [names[i] for i in test]
    return LabelledSplit(
        x_train=x_train,
        y_train=labels[train],
        x_test=x_test,
        y_test=labels[test],
        band_ids=band_ids,
        wavelengths=np.array([band.wavelength for band in bands], dtype=np.float32),
        class_names=class_names,
        task="classification",
        split_hash=ids_split_hash([ids[i] for i in train], [ids[i] for i in test]),
        stats=stats,
        train_ids=train_ids,
        test_ids=test_ids,
    )


def _draw_labels(
    train: np.ndarray, labels: np.ndarray, per_class: int, class_names: list[str], seed: int, folder
) -> np.ndarray:
    """Sorted indices of ``per_class`` training images per class, drawn with ``seed``."""
    if per_class < 1:
        raise DataError(f"labels_per_class={per_class} must be at least 1")
    rng = np.random.default_rng(seed)
    kept = []
    for c, name in enumerate(class_names):
        members = train[labels[train] == c]
        if len(members) < per_class:
            raise DataError(
                f"{folder}: class {name} has {len(members)} training images, fewer than "
                f"labels_per_class={per_class}; lower it"
            )
        kept.append(rng.choice(members, per_class, replace=False))
    return np.sort(np.concatenate(kept))


def _read_all(paths: list[Path], kind: Form) -> np.ndarray:
    arrays = [read_image(p, kind) for p in paths]
    for path, array in zip(paths, arrays, strict=True):
        if array.shape != arrays[0].shape:
            raise DataError(f"{path} is {array.shape}, but {paths[0]} is {arrays[0].shape}")
    return np.stack(arrays)


def read_image(path: Path, kind: Form) -> np.ndarray:
    """One EuroSAT file -> [C, H, W] in its stored dtype, checked against the form's band count."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # the JPEGs carry no georeference
        with rasterio.open(path) as ds:
            if ds.count != len(kind.bands):
                raise DataError(
                    f"{path} has {ds.count} bands; EuroSAT {kind.name.upper()} files hold "
                    f"{len(kind.bands)} ({', '.join(kind.bands)} in file order)"
                )
            return ds.read()


def build_eurosat_shards(
    src: str | Path,
    out: str | Path,
    *,
    form: str | None = None,
    tile_size: int = 64,
    shard_size: int = 256,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """``eoforge data build --layout eurosat``: EuroSAT images as unlabelled pretraining shards.

    The layout preset declares what the files cannot say: MS files are sensor ``S2L1C`` with their
    bands in ``FILE_BANDS`` order (B8A last), RGB JPEGs sensor ``S2RGB8`` (R, G, B) at 10 m. One
    sample per image at the default ``tile_size`` of 64.

    Args:
        src: a EuroSAT folder in either form (``find_images``).
        out: shard folder to create.
        form: ``"ms"`` or ``"rgb"``; None tells it by the files.
        tile_size, shard_size, overwrite, progress: as ``ingest.build_shards``.

    Returns:
        ``ingest.build_shards``'s summary, with ``form``.
    """
    from eoforge.datasets.ingest import build_shards

    kind, folder, _ = find_images(src, form)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # the JPEGs carry no georeference
        summary = build_shards(
            folder,
            out,
            kind.sensor,
            bands=list(kind.bands),
            extensions=(kind.suffix,),
            tile_size=tile_size,
            shard_size=shard_size,
            overwrite=overwrite,
            progress=progress,
        )
    return summary | {"form": kind.name}
