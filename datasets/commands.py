"""The ``eoforge data`` verbs: build WebDataset shards from GeoTIFF folders, datacubes or
EuroSAT class folders; per-band statistics; verify a build. Registered through the
``eoforge.commands`` entry points (setup.cfg); the readers are imported when a verb runs."""

from __future__ import annotations

import argparse
import json

BUILD_EXAMPLES = """examples:
  eoforge data build ~/bigearthnet/S2 shards/s2 --sensor S2L2A --tile-size 120
  eoforge data build ~/enmap shards/enmap --sensor ENMAP --pattern '*SPECTRAL_IMAGE.TIF'
  eoforge data build ~/landsat shards/l8 --sensor LANDSAT89 --bands B2 B3 B4 B5
  eoforge data build ~/cubes/s2.zarr shards/s2cube --sensor S2L2A --variable reflectance
co-registered sensors / time series (one sample per footprint, see --layout):
  eoforge data build ~/SSL4EO-S12 shards/s2s1 --sensor S2L2A --pair S1GRD --layout ssl4eo --time-window-days 15
  eoforge data build ~/BigEarthNet shards/ben --sensor S2L2A --pair S1GRD --layout bigearthnet
  eoforge data build ~/SSL4EO-S12 shards/seasons --sensor S2L2A --layout ssl4eo --series
EuroSAT class folders (MS: S2L1C with B8A stored last; RGB JPEGs: S2RGB8), one sample per image:
  eoforge data build ~/EuroSAT_MS shards/eurosat_ms --layout eurosat"""


def register_data(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``eoforge data``: the group of the data verbs."""
    help_text = "turn GeoTIFF folders into WebDataset shards; statistics"
    return commands.add_parser("data", help=help_text, description=help_text)


def register_build(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``eoforge data build SRC OUT``."""
    help_text = "GeoTIFF folder or datacube -> WebDataset shards"
    parser = commands.add_parser(
        "build",
        help=help_text,
        description=help_text,
        epilog=BUILD_EXAMPLES,
    )
    parser.add_argument(
        "src",
        help="folder of GeoTIFFs (searched recursively), or a Zarr/NetCDF datacube with dims "
        "(time, band, y, x) or a folder of them",
    )
    parser.add_argument("out", help="shard folder to create")
    parser.add_argument(
        "--sensor",
        help="registry sensor, e.g. S2L2A, S2L1C, S1GRD, LANDSAT89, ENMAP (required unless "
        "--layout eurosat declares it)",
    )
    parser.add_argument(
        "--bands", nargs="+", help="band names to keep, in file order for multi-band files"
    )
    parser.add_argument("--pattern", help="glob for the files to read, e.g. '*SPECTRAL_IMAGE.TIF'")
    parser.add_argument(
        "--variable", help="data variable of a datacube (default: the one with a band dimension)"
    )
    parser.add_argument(
        "--tile-size",
        type=int,
        help="tile side in pixels (default 128; --layout eurosat: 64, one tile per image)",
    )
    parser.add_argument(
        "--shard-size", type=int, default=256, help="samples per shard (default 256)"
    )
    parser.add_argument(
        "--gsd", type=float, help="target ground sampling distance in m (default: finest band)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in OUT")
    quality = parser.add_argument_group(
        "quality filters",
        "Per tile (of the reference sensor's product in --pair/--series builds; nodata only for "
        "datacubes); kept/dropped counts are printed and stored in index.json. Cloud layers are "
        "the masks shipped next to the bands: S2 cloud_mask/SCL/MSK_CLDPRB, Landsat "
        "BQA/QA_PIXEL, EnMAP QL_QUALITY_CLOUD/CIRRUS.",
    )
    quality.add_argument(
        "--max-cloud-fraction",
        type=float,
        metavar="F",
        help="drop tiles whose cloudy fraction of pixels with data exceeds F (0-1)",
    )
    quality.add_argument(
        "--max-nodata-fraction",
        type=float,
        metavar="F",
        help="drop tiles whose fraction of pixels without any valid band exceeds F (0-1)",
    )
    paired = parser.add_argument_group(
        "multi-sensor / multi-date samples",
        "--sensor is the reference: it anchors each sample and its grid (at --gsd). Products are "
        "grouped by the footprint the layout names (SSL4EO-S12: the location folder under "
        "s1/ s2a/ s2c/; BigEarthNet: the S2 patch an S1 patch's labels json names, else the "
        "<tile>_<row>_<col> in its name). Samples lacking a sensor are kept with present=False.",
    )
    paired.add_argument(
        "--pair",
        nargs="+",
        metavar="SENSOR",
        help="partner sensors reprojected onto the reference's grid, e.g. S1GRD",
    )
    paired.add_argument(
        "--layout",
        choices=["ssl4eo", "bigearthnet", "eurosat"],
        help="how SRC names sensors and footprints; eurosat: EuroSAT MS (S2L1C, B8A stored "
        "last) or RGB JPEGs (S2RGB8) class folders, one sample per image, no --pair/--series",
    )
    paired.add_argument(
        "--time-window-days",
        type=float,
        help="most days between a reference product and its partner (default: any)",
    )
    paired.add_argument(
        "--series",
        action="store_true",
        help="all dates of --sensor at a footprint form one time-series sample [T, C, H, W]",
    )
    paired.add_argument(
        "--drop-lone-partners",
        action="store_true",
        help="leave out partner products no reference product took (default: keep them as "
        "samples lacking the reference)",
    )
    parser.set_defaults(run=run_build)
    return parser


def register_stats(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``eoforge data stats SHARDS``."""
    help_text = "per-band statistics next to the shards"
    parser = commands.add_parser(
        "stats",
        help=help_text,
        description=help_text,
        epilog="example:\n  eoforge data stats shards/s2      # writes shards/s2/stats.json",
    )
    parser.add_argument("shards", help="shard folder")
    parser.set_defaults(run=run_stats)
    return parser


def register_verify(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``eoforge data verify SHARDS``."""
    help_text = (
        "check each shard's sha256 and sample count against the build's manifest, then read "
        "every sample back"
    )
    parser = commands.add_parser(
        "verify",
        help=help_text,
        description=help_text,
        epilog="example:\n  eoforge data verify shards/s2",
    )
    parser.add_argument("shards", help="shard folder")
    parser.set_defaults(run=run_verify)
    return parser


def run_build(args: argparse.Namespace) -> int:
    """Build shards from a GeoTIFF folder, a datacube or EuroSAT class folders, as the flags
    say; a flag that does not apply to the source is an error naming it."""
    from eoforge.datasets.cubes import is_cube_source
    from eoforge.datasets.errors import DataError
    from eoforge.datasets.ingest import build_shards
    from eoforge.datasets.pairs import build_paired_shards

    if is_cube_source(args.src):
        return _build_cube(args)
    if args.layout == "eurosat":
        return _build_eurosat(args)
    if not args.sensor:
        raise DataError("data build needs --sensor (or --layout eurosat, which declares it)")
    if args.variable:
        raise DataError(f"--variable applies to Zarr/NetCDF datacubes, and {args.src} holds none")
    grouped = bool(args.pair or args.series)
    if grouped or args.layout:
        if not (args.layout and grouped):
            raise DataError("--pair/--series and --layout go together: name both")
        if args.bands or args.pattern:
            raise DataError(
                "--bands and --pattern apply to single-sensor builds, not --pair/--series"
            )
        summary = build_paired_shards(
            args.src,
            args.out,
            args.sensor,
            pair=args.pair or (),
            layout=args.layout,
            time_window_days=args.time_window_days,
            series=args.series,
            lone_partners=not args.drop_lone_partners,
            tile_size=args.tile_size or 128,
            shard_size=args.shard_size,
            gsd=args.gsd,
            max_cloud_fraction=args.max_cloud_fraction,
            max_nodata_fraction=args.max_nodata_fraction,
            overwrite=args.overwrite,
        )
        return _report_build(summary, args.out, quality=True)
    if args.time_window_days is not None or args.drop_lone_partners:
        raise DataError("--time-window-days and --drop-lone-partners need --pair and --layout")
    summary = build_shards(
        args.src,
        args.out,
        args.sensor,
        bands=args.bands,
        pattern=args.pattern,
        tile_size=args.tile_size or 128,
        shard_size=args.shard_size,
        gsd=args.gsd,
        max_cloud_fraction=args.max_cloud_fraction,
        max_nodata_fraction=args.max_nodata_fraction,
        overwrite=args.overwrite,
    )
    return _report_build(summary, args.out, quality=True)


def _build_eurosat(args) -> int:
    from eoforge.datasets.errors import DataError
    from eoforge.datasets.eurosat import FORMS, build_eurosat_shards

    _refuse_flags(
        args, ["--pair", "--series", "--bands", "--pattern", "--gsd", "--variable",
               "--time-window-days", "--max-cloud-fraction"],
        "--layout eurosat declares the bands and reads every image; drop {flags}",
    )  # fmt: skip
    form = None
    if args.sensor:
        by_sensor = {f.sensor.upper(): name for name, f in FORMS.items()}
        form = by_sensor.get(args.sensor.upper())
        if form is None:
            raise DataError(
                f"--sensor {args.sensor}: EuroSAT images are {' or '.join(by_sensor)}; "
                "drop --sensor to tell the form by the files"
            )
    summary = build_eurosat_shards(
        args.src,
        args.out,
        form=form,
        tile_size=args.tile_size or 64,
        shard_size=args.shard_size,
        overwrite=args.overwrite,
    )
    return _report_build(summary, args.out, quality=False)


def _refuse_flags(args: argparse.Namespace, flags: list[str], message: str) -> None:
    """DataError with ``message`` (its ``{flags}`` naming them) when the command line set any
    of ``flags`` (``--time-window-days``)."""
    from eoforge.datasets.errors import DataError

    given = [f for f in flags if vars(args)[f[2:].replace("-", "_")] not in (None, False)]
    if given:
        raise DataError(message.format(flags=", ".join(given)))


def _report_build(summary: dict, out: str, quality: bool) -> int:
    """Print a build's summary (with its quality filters' counts if ``quality``) and the next
    step."""
    print(json.dumps(summary, indent=2, default=str))
    if quality:
        counts = summary["quality"]
        dropped = counts["tiles_dropped"]
        print(
            f"tiles: {counts['tiles_kept']} kept; dropped {dropped['cloud']} for cloud "
            f"(max {counts['max_cloud_fraction']}), {dropped['nodata']} for nodata "
            f"(max {counts['max_nodata_fraction']}), {summary['tiles_skipped']} below min_valid"
        )
    print(f"next: eoforge data stats {out}")
    return 0


def _build_cube(args) -> int:
    from eoforge.datasets.cubes import build_cube_shards

    _refuse_flags(
        args, ["--pair", "--series", "--layout", "--pattern", "--gsd", "--max-cloud-fraction",
               "--time-window-days", "--drop-lone-partners"],
        "{flags} do(es) not apply to datacubes, which are read on their own grid one time step "
        "per scene; drop them",
    )  # fmt: skip
    summary = build_cube_shards(
        args.src,
        args.out,
        args.sensor,
        variable=args.variable,
        bands=args.bands,
        tile_size=args.tile_size or 128,
        shard_size=args.shard_size,
        max_nodata_fraction=args.max_nodata_fraction,
        overwrite=args.overwrite,
    )
    return _report_build(summary, args.out, quality=False)


def run_stats(args: argparse.Namespace) -> int:
    """Write the shards' per-band statistics."""
    from eoforge.datasets.stats import compute_stats

    path = compute_stats(args.shards)
    skipped = {k: n for k, n in json.loads(path.read_text())["skipped"].items() if n}
    print(f"wrote {path}" + (f"; bad data left out: {skipped} (see the log)" if skipped else ""))
    return 0


def run_verify(args: argparse.Namespace) -> int:
    """Check the shards against their manifest and print the report."""
    from eoforge.datasets.ingest import verify_shards

    print(json.dumps(verify_shards(args.shards), indent=2, default=str))
    return 0
