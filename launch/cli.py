"""The ``eoforge`` command line. Verbs import their implementation lazily, inside functions:
this is the one place launch/ reaches up into pretrain/ and finetune/."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

EXAMPLES = {
    "data build": """examples:
  eoforge data build ~/bigearthnet/S2 shards/s2 --sensor S2L2A --tile-size 120
  eoforge data build ~/enmap shards/enmap --sensor ENMAP --pattern '*SPECTRAL_IMAGE.TIF'
  eoforge data build ~/landsat shards/l8 --sensor LANDSAT89 --bands B2 B3 B4 B5
  eoforge data build ~/cubes/s2.zarr shards/s2cube --sensor S2L2A --variable reflectance
co-registered sensors / time series (one sample per footprint, see --layout):
  eoforge data build ~/SSL4EO-S12 shards/s2s1 --sensor S2L2A --pair S1GRD --layout ssl4eo --time-window-days 15
  eoforge data build ~/BigEarthNet shards/ben --sensor S2L2A --pair S1GRD --layout bigearthnet
  eoforge data build ~/SSL4EO-S12 shards/seasons --sensor S2L2A --layout ssl4eo --series
EuroSAT class folders (MS: S2L1C with B8A stored last; RGB JPEGs: S2RGB8), one sample per image:
  eoforge data build ~/EuroSAT_MS shards/eurosat_ms --layout eurosat""",
    "data stats": "example:\n  eoforge data stats shards/s2      # writes shards/s2/stats.json",
    "data verify": "example:\n  eoforge data verify shards/s2",
    "pretrain": """examples:
  eoforge pretrain                                   # the embedded CPU demo (synthetic S2/S1/EnMAP)
  eoforge pretrain --config mae data.shards=[shards/s2,shards/s1] run_dir=runs/mae
  eoforge pretrain --config my_run.yaml steps=2000 engine.zero_stage=3
Relaunching the same command resumes from the newest checkpoint in run_dir.""",
    "launch slurm": """examples:
  eoforge launch slurm --nodes 2 --gpus-per-node 8 --time 24:00:00 --partition gpu \\
      --profile cluster.yaml -- pretrain --config mae data.shards=[shards/s2] run_dir=runs/mae
  eoforge launch slurm --nodes 1 --gpus-per-node 4 --time 01:00:00 --partition debug --dry-run \\
      -- pretrain --config mae run_dir=runs/try
The script is written to RUN_DIR/launch.sbatch; sbatch it again to resume by hand.""",
    "launch local": """example:
  eoforge launch local --nproc 8 -- pretrain --config mae data.shards=[shards/s2] run_dir=runs/mae""",
    "release build": """examples:
  eoforge release build runs/demo                   # writes runs/demo/release
  eoforge release build runs/mae releases/mae-vit-b""",
    "release import": """example:
  eoforge release import satmae.pth releases/satmae --layout satmae --architecture vit_large_patch16 \\
      --sensor S2L2A --bands B02 B03 B04 B05 B06 B07 B08 B8A B11 B12""",
    "embed": """example:
  eoforge embed --release runs/demo/release scene.tif embeddings.tif --sensor S2L2A""",
    "release verify": "example:\n  eoforge release verify runs/demo/release",
    "eval knn": """example:
  eoforge eval knn --release runs/demo/release --dataset indian_pines:../shared/data/indian_pines_aviris k=20""",
    "eval finetune": """example:
  eoforge eval finetune --release runs/demo/release --dataset eurosat:../shared/data/eurosat_ms_samples epochs=20""",
    "eval segmentation": """example:
  eoforge eval segmentation --release R --dataset indian_pines_map:../shared/data/indian_pines_aviris --frozen""",
    "eval change": """example:
  eoforge eval change --release R --dataset taizhou:../shared/data/landsat_tm_change_detection_taizhou_nanjing""",
    "bench run": """example:
  eoforge bench run suite.yaml --release runs/demo/release --out bench/pines
Run it again to continue a run that stopped: finished cells are skipped.""",
    "eval linear": """example:
  eoforge eval linear --release runs/demo/release --dataset indian_pines:../shared/data/indian_pines_aviris seed=1""",
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    from eoforge.datasets.errors import DataError
    from eoforge.launch.checkpoints import UnsafeCheckpointError
    from eoforge.launch.config import ConfigError
    from eoforge.models.release import ReleaseError
    from eoforge.models.spectral import UnsupportedBandError

    warnings.showwarning = _show_warning
    try:
        return args.run(args) or 0
    except (
        DataError,
        ConfigError,
        ReleaseError,
        UnsupportedBandError,
        UnsafeCheckpointError,
        FileNotFoundError,
    ) as err:
        print(f"eoforge: error: {err}", file=sys.stderr)
        return 2


def _eval_arguments(command: argparse.ArgumentParser, options: str) -> None:
    """The arguments every ``eoforge eval`` protocol takes; ``options`` lists its key=value
    options for the help."""
    command.add_argument("--release", required=True, help="release folder")
    command.add_argument(
        "--dataset", required=True, help="NAME:ROOT, e.g. indian_pines:/data/indian_pines"
    )
    command.add_argument("--out", help="write the result as JSON here")
    _device_argument(command)
    command.add_argument("options", nargs="*", help=f"key=value options: {options}")


def _device_argument(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--device",
        type=_device,
        help="where the encoder runs: cpu, cuda, cuda:N (default: CUDA when present; features "
        "under bf16 autocast on CUDA, fp32 on the CPU)",
    )


def _device(name: str) -> str:
    """``--device``: a torch device that is present here (argparse turns the error into a usage
    line and exit code 2 before anything runs)."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise argparse.ArgumentTypeError(f"{name!r} is not a device (cpu, cuda, cuda:N)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(
            f"{name}: no CUDA device is present here; use --device cpu"
        )
    return name


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings to a user read as one line each, without the source line that raised them."""
    print(f"eoforge: warning: {message}", file=file or sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eoforge",
        description="Pretrain, release and evaluate multi-sensor Earth-observation foundation models.",
        epilog="Start with `eoforge pretrain` (a CPU demo end to end), then `eoforge <verb> --help`.",
    )
    verbs = parser.add_subparsers(title="commands", metavar="{data,pretrain,launch,release,eval}")

    data = _group(verbs, "data", "turn GeoTIFF folders into WebDataset shards; statistics")
    build = _command(
        data, "data", "build", "GeoTIFF folder or datacube -> WebDataset shards", _data_build
    )
    build.add_argument(
        "src",
        help="folder of GeoTIFFs (searched recursively), or a Zarr/NetCDF datacube with dims "
        "(time, band, y, x) or a folder of them",
    )
    build.add_argument("out", help="shard folder to create")
    build.add_argument(
        "--sensor",
        help="registry sensor, e.g. S2L2A, S2L1C, S1GRD, LANDSAT89, ENMAP (required unless "
        "--layout eurosat declares it)",
    )
    build.add_argument(
        "--bands", nargs="+", help="band names to keep, in file order for multi-band files"
    )
    build.add_argument("--pattern", help="glob for the files to read, e.g. '*SPECTRAL_IMAGE.TIF'")
    build.add_argument(
        "--variable", help="data variable of a datacube (default: the one with a band dimension)"
    )
    build.add_argument(
        "--tile-size",
        type=int,
        help="tile side in pixels (default 128; --layout eurosat: 64, one tile per image)",
    )
    build.add_argument(
        "--shard-size", type=int, default=256, help="samples per shard (default 256)"
    )
    build.add_argument(
        "--gsd", type=float, help="target ground sampling distance in m (default: finest band)"
    )
    build.add_argument("--overwrite", action="store_true", help="replace shards already in OUT")
    quality = build.add_argument_group(
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
    paired = build.add_argument_group(
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
    stats = _command(data, "data", "stats", "per-band statistics next to the shards", _data_stats)
    stats.add_argument("shards", help="shard folder")
    verify = _command(
        data,
        "data",
        "verify",
        "check each shard's sha256 and sample count against the build's manifest, then read "
        "every sample back",
        _data_verify,
    )
    verify.add_argument("shards", help="shard folder")

    pre = _command(verbs, None, "pretrain", "pretrain (no arguments: the embedded demo)", _pretrain)
    pre.add_argument(
        "--config", default="demo", help="YAML file or shipped config name (default: demo)"
    )
    pre.add_argument(
        "overrides", nargs="*", help="key=value overrides, e.g. steps=200 data.batch_size=16"
    )

    launch = _group(verbs, "launch", "start pretraining on a Slurm cluster or on this node")
    slurm = _command(
        launch,
        "launch",
        "slurm",
        "render an sbatch script into the run directory and submit it (requeued and resumed "
        "automatically after the time limit or preemption)",
        _launch_slurm,
    )
    slurm.add_argument("--nodes", type=int, required=True)
    slurm.add_argument("--gpus-per-node", type=int, required=True, help="0 for a CPU job")
    slurm.add_argument(
        "--nproc-per-node", type=int, help="ranks per node (default: the GPUs, or 1 on CPU)"
    )
    slurm.add_argument("--time", required=True, help="time limit, HH:MM:SS or D-HH:MM:SS")
    slurm.add_argument("--partition", required=True)
    slurm.add_argument("--account")
    slurm.add_argument(
        "--profile", help="cluster profile YAML: extra sbatch options, set-up lines, env, srun"
    )
    slurm.add_argument(
        "--signal-grace",
        type=int,
        default=180,
        metavar="S",
        help="seconds before the time limit at which to save and requeue (default 180)",
    )
    slurm.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    slurm.add_argument("command", nargs=argparse.REMAINDER, help="-- pretrain [--config C] ...")
    local = _command(
        launch, "launch", "local", "pretrain with K ranks on this node (torchrun)", _launch_local
    )
    local.add_argument("--nproc", type=int, required=True, help="ranks (one per GPU)")
    local.add_argument("command", nargs=argparse.REMAINDER, help="-- pretrain [--config C] ...")

    release = _group(verbs, "release", "build and verify releases")
    rbuild = _command(
        release, "release", "build", "consolidate a run into a release", _release_build
    )
    rbuild.add_argument("run_dir")
    rbuild.add_argument("out", nargs="?", help="release folder (default: RUN_DIR/release)")
    rverify = _command(
        release, "release", "verify", "check a release's files, card and hash", _release_verify
    )
    rverify.add_argument("release")

    rimport = _command(
        release,
        "release",
        "import",
        "write a release from a published DOFA or SatMAE checkpoint (.pth or .safetensors)",
        _release_import,
    )
    rimport.add_argument("checkpoint")
    rimport.add_argument("out", help="release folder to write")
    rimport.add_argument("--layout", required=True, choices=["dofa", "satmae"])
    rimport.add_argument(
        "--architecture", required=True, help="eoforge encoder name, e.g. vit_base_patch16"
    )
    rimport.add_argument("--sensor", required=True, help="registry sensor of the input bands")
    rimport.add_argument(
        "--bands", nargs="+", help="the model's input bands in its channel order (default: all)"
    )
    rimport.add_argument("--licence", default="other", help="the checkpoint's licence")

    embed = _command(
        verbs,
        None,
        "embed",
        "georeferenced per-patch embeddings of a GeoTIFF, tile by tile",
        _embed,
    )
    embed.add_argument("--release", required=True, help="release folder")
    embed.add_argument("src", help="GeoTIFF to embed")
    embed.add_argument("out", help="GeoTIFF to write (one pixel per patch, one band per feature)")
    embed.add_argument("--sensor", help="registry sensor of the file's bands")
    embed.add_argument("--bands", nargs="+", help="band ids or names of the file's bands, in order")
    embed.add_argument("--window", type=int, help="crop side in patches the encoder sees at once")
    embed.add_argument("--tile", type=int, help="pixels read per tile")
    embed.add_argument("--batch-size", type=int, default=16)
    _device_argument(embed)

    evaluate = _group(verbs, "eval", "downstream protocols on frozen or finetuned encoders")
    linear = _command(evaluate, "eval", "linear", "linear probe on frozen features", _eval_linear)
    _eval_arguments(
        linear, "seed, batch_size, lrs=[...], weight_decays=[...], and the dataset's options"
    )
    knn = _command(evaluate, "eval", "knn", "weighted kNN on frozen features", _eval_knn)
    _eval_arguments(knn, "seed, k, batch_size, and the dataset's options")
    for protocol, help_text in (
        ("finetune", "finetune the encoder with a linear head (layer-wise lr decay)"),
        ("segmentation", "train an UPerNet-style decoder on the encoder; mIoU"),
        ("change", "train a siamese change-detection head on the encoder; F1 and IoU"),
    ):
        trained = _command(evaluate, "eval", protocol, help_text, _eval_trained)
        trained.set_defaults(protocol=protocol)
        trained.add_argument("--frozen", action="store_true", help="train the head only")
        _eval_arguments(
            trained, "seed, epochs, lr, layer_decay, batch_size, and the dataset's options"
        )

    bench = _group(verbs, "bench", "run a benchmark suite over a release; compare results")
    brun = _command(
        bench,
        "bench",
        "run",
        "datasets x protocols x encoders x seeds; resumes where it stopped",
        _bench_run,
    )
    brun.add_argument("suite", help="suite YAML")
    brun.add_argument("--release", required=True, help="release folder")
    brun.add_argument("--out", help="results folder (default: bench/<suite name>)")
    _device_argument(brun)
    bcompare = _command(
        bench, "bench", "compare", "side-by-side table of two results", _bench_compare
    )
    bcompare.add_argument("a", help="results.json")
    bcompare.add_argument("b", help="results.json")
    return parser


def _group(verbs, name: str, help_text: str):
    parser = verbs.add_parser(name, help=help_text, description=help_text)
    return parser.add_subparsers(title=f"{name} commands")


def _command(group, prefix: str | None, name: str, help_text: str, run):
    key = f"{prefix} {name}" if prefix else name
    parser = group.add_parser(
        name,
        help=help_text,
        description=help_text,
        epilog=EXAMPLES.get(key),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(run=run)
    return parser


def _data_build(args) -> int:
    from eoforge.datasets.cubes import is_cube_source
    from eoforge.datasets.errors import DataError
    from eoforge.datasets.ingest import build_shards
    from eoforge.datasets.pairs import build_paired_shards

    if is_cube_source(args.src):
        return _data_build_cube(args)
    if args.layout == "eurosat":
        return _data_build_eurosat(args)
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
        print(json.dumps(summary, indent=2, default=str))
        _print_quality(summary)
        print(f"next: eoforge data stats {args.out}")
        return 0
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
    print(json.dumps(summary, indent=2, default=str))
    _print_quality(summary)
    print(f"next: eoforge data stats {args.out}")
    return 0


def _data_build_eurosat(args) -> int:
    from eoforge.datasets.errors import DataError
    from eoforge.datasets.eurosat import FORMS, build_eurosat_shards

    given = {
        "--pair": args.pair,
        "--series": args.series,
        "--bands": args.bands,
        "--pattern": args.pattern,
        "--gsd": args.gsd,
        "--variable": args.variable,
        "--time-window-days": args.time_window_days,
        "--max-cloud-fraction": args.max_cloud_fraction,
    }
    unused = _given(given)
    if unused:
        raise DataError(
            f"--layout eurosat declares the bands and reads every image; drop {', '.join(unused)}"
        )
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
    print(json.dumps(summary, indent=2, default=str))
    print(f"next: eoforge data stats {args.out}")
    return 0


def _given(flags: dict[str, object]) -> list[str]:
    """The flags of ``flags`` (name -> parsed value) that the command line set."""
    return [name for name, value in flags.items() if value not in (None, False)]


def _print_quality(summary: dict) -> None:
    quality = summary["quality"]
    dropped = quality["tiles_dropped"]
    print(
        f"tiles: {quality['tiles_kept']} kept; dropped {dropped['cloud']} for cloud "
        f"(max {quality['max_cloud_fraction']}), {dropped['nodata']} for nodata "
        f"(max {quality['max_nodata_fraction']}), {summary['tiles_skipped']} below min_valid"
    )


def _data_build_cube(args) -> int:
    from eoforge.datasets.cubes import build_cube_shards
    from eoforge.datasets.errors import DataError

    given = {
        "--pair": args.pair,
        "--series": args.series,
        "--layout": args.layout,
        "--pattern": args.pattern,
        "--gsd": args.gsd,
        "--max-cloud-fraction": args.max_cloud_fraction,
        "--time-window-days": args.time_window_days,
        "--drop-lone-partners": args.drop_lone_partners,
    }
    unused = _given(given)
    if unused:
        raise DataError(
            f"{', '.join(unused)} do(es) not apply to datacubes, which are read on their own grid "
            "one time step per scene; drop them"
        )
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
    print(json.dumps(summary, indent=2, default=str))
    print(f"next: eoforge data stats {args.out}")
    return 0


def _data_stats(args) -> int:
    from eoforge.datasets.stats import compute_stats

    path = compute_stats(args.shards)
    skipped = {k: n for k, n in json.loads(path.read_text())["skipped"].items() if n}
    print(f"wrote {path}" + (f"; bad data left out: {skipped} (see the log)" if skipped else ""))
    return 0


def _data_verify(args) -> int:
    from eoforge.datasets.ingest import verify_shards

    print(json.dumps(verify_shards(args.shards), indent=2, default=str))
    return 0


def _pretrain(args) -> int:
    from eoforge.launch.config import load_config
    from eoforge.launch.distributed import detect_env
    from eoforge.pretrain.config import PretrainConfig, find_config
    from eoforge.pretrain.train import pretrain

    cfg = load_config(PretrainConfig, find_config(args.config), args.overrides)
    _validate(cfg, detect_env().world_size)  # before any process group starts
    run_dir = pretrain(cfg)
    release = run_dir / "release"
    if release.is_dir():
        print(
            f"\nrelease: {release}\nnext steps:\n"
            f"  tensorboard --logdir {run_dir / 'tb'}\n"
            f"  eoforge eval linear --release {release} --dataset indian_pines:PATH/TO/indian_pines_aviris"
        )
    return 0


def _launch_slurm(args) -> int:
    from eoforge.launch.slurm import SlurmJob, load_profile, render_script, submit, write_script

    command, cfg = _pretrain_command(args.command)
    job = SlurmJob(
        run_dir=Path(cfg.run_dir),
        command=command,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        nproc_per_node=args.nproc_per_node,
        time=args.time,
        partition=args.partition,
        account=args.account,
        grace=args.signal_grace,
        profile=load_profile(args.profile),
    )
    _validate(cfg, job.world_size)
    argv = ["eoforge", *args.argv]
    if args.dry_run:
        print(render_script(job, argv), end="")
        return 0
    script = write_script(job, argv)
    job_id = submit(script)
    logs = job.run_dir / "logs"
    print(
        f"submitted job {job_id}: {script}\n"
        f"  job log:   {logs}/slurm-{job_id}.out (every restart appends)\n"
        f"  per node:  {logs}/node<N>-{job_id}.out; per rank: {logs}/rank<R>.log\n"
        f"  resume by hand (after a cancel or a crash): sbatch {script}"
    )
    return 0


def _launch_local(args) -> int:
    import subprocess

    command, cfg = _pretrain_command(args.command)
    _validate(cfg, args.nproc)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd = [*torchrun, f"--nproc_per_node={args.nproc}", "-m", "eoforge.launch.cli", *command]
    return subprocess.run(cmd, check=False).returncode


def _pretrain_command(tokens: list[str]):
    """``-- pretrain ...`` of a launch verb -> (the pretrain arguments every rank runs, the
    loaded config); paths made absolute so the ranks do not depend on their working folder.

    Raises:
        ConfigError: for another verb, new_run=true, or a config that does not load.
    """
    from eoforge.launch.config import ConfigError, load_config
    from eoforge.pretrain.config import PretrainConfig, find_config

    tokens = tokens[1:] if tokens[:1] == ["--"] else tokens
    if tokens[:1] != ["pretrain"]:
        raise ConfigError("name the command to launch after --: -- pretrain [--config C] [k=v ...]")
    args = build_parser().parse_args(tokens)
    config = find_config(args.config).resolve()
    cfg = load_config(PretrainConfig, config, args.overrides)
    if cfg.new_run:
        raise ConfigError(
            "new_run=true would wipe the run at every requeue; remove the run folder instead"
        )
    run_dir = Path(cfg.run_dir).resolve()
    cfg.run_dir = str(run_dir)
    overrides = [o for o in args.overrides if not o.startswith("run_dir=")]
    return ["pretrain", "--config", str(config), *overrides, f"run_dir={run_dir}"], cfg


def _validate(cfg, world_size: int) -> None:
    """The config's own checks for ``world_size`` ranks, as a ConfigError."""
    from eoforge.launch.config import ConfigError
    from eoforge.pretrain.objectives import validate_objective

    try:
        cfg.validate(world_size)
        validate_objective(cfg.objective)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _release_import(args) -> int:
    from eoforge.datasets.sensors import get_sensor
    from eoforge.models.importers import import_release

    sensor = get_sensor(args.sensor)
    chosen = [sensor.band(name) for name in args.bands] if args.bands else list(sensor.bands)
    out = import_release(
        args.checkpoint,
        args.layout,
        args.out,
        architecture=args.architecture,
        bands=[band.to_dict() for band in chosen],
        licence=args.licence,
    )
    print(f"wrote {out}\nnext: eoforge release verify {out}")
    return 0


def _embed(args) -> int:
    from eoforge.finetune.embed import embed_geotiff

    out = embed_geotiff(
        args.release,
        args.src,
        args.out,
        sensor=args.sensor,
        bands=args.bands,
        window=args.window,
        tile=args.tile,
        batch_size=args.batch_size,
        device=args.device,
    )
    print(f"wrote {out}")
    return 0


def _release_build(args) -> int:
    from eoforge.pretrain.export import build_release

    print(f"wrote {build_release(args.run_dir, args.out)}")
    return 0


def _release_verify(args) -> int:
    from eoforge.models.release import verify_release

    card = verify_release(args.release)
    print(
        f"{args.release}: ok ({len(card['bands'])} bands, {card['steps']} steps, "
        f"sha256 {card['weights_sha256'][:12]}...)"
    )
    return 0


def _eval_knn(args) -> int:
    from eoforge.finetune.evaluate import run_knn

    options = dict(_parse_option(item) for item in args.options)
    run_knn(args.release, args.dataset, out=args.out, device=args.device, **options)
    return 0


def _eval_trained(args) -> int:
    from eoforge.finetune.evaluate import run_trained

    options = dict(_parse_option(item) for item in args.options)
    run_trained(
        args.protocol,
        args.release,
        args.dataset,
        frozen=args.frozen,
        out=args.out,
        device=args.device,
        **options,
    )
    return 0


def _bench_run(args) -> int:
    from eoforge.finetune.bench import load_suite, run_suite

    suite = load_suite(args.suite)
    out = Path(args.out or Path("bench") / suite.name)
    results = run_suite(suite, args.release, out, device=args.device)
    print((out / "results.md").read_text(), end="")
    print(f"{len(results['cells'])} cells; results in {out}/results.{{json,csv,md,png}}")
    return 0


def _bench_compare(args) -> int:
    from eoforge.finetune.bench import compare

    print(compare(args.a, args.b), end="")
    return 0


def _eval_linear(args) -> int:
    from eoforge.finetune.evaluate import run_linear

    options = dict(_parse_option(item) for item in args.options)
    run_linear(args.release, args.dataset, out=args.out, device=args.device, **options)
    return 0


def _parse_option(item: str) -> tuple[str, object]:
    key, sep, value = item.partition("=")
    if not sep:
        raise SystemExit(f"eoforge: error: option {item!r} is not of the form key=value")
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    if value.startswith("[") and value.endswith("]"):  # a list, e.g. lrs=[0.3,1,3]
        import yaml

        try:
            return key, yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise SystemExit(f"eoforge: error: option {item!r} is not a list: {err}") from err
    return key, {"none": None, "true": True, "false": False}.get(value.lower(), value)


if __name__ == "__main__":
    sys.exit(main())
