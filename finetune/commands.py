"""The verbs that use releases: ``eoforge eval <protocol>`` (one per registered protocol,
``eoforge.finetune.protocols``), ``eoforge bench run|compare``, ``eoforge embed`` and
``eoforge release import``. Registered through the ``eoforge.commands`` entry points (setup.cfg);
torch and the scoring code are imported when a verb runs."""

from __future__ import annotations

import argparse
import typing
from dataclasses import fields
from pathlib import Path

from eoforge.finetune.protocols import PROTOCOLS, get_protocol

EMBED_EXAMPLES = """example:
  eoforge embed --release runs/demo/release scene.tif embeddings.tif --sensor S2L2A"""

BENCH_RUN_EXAMPLES = """example:
  eoforge bench run suite.yaml --release runs/demo/release --out bench/pines
Run it again to continue a run that stopped: finished cells are skipped."""

RELEASE_IMPORT_EXAMPLES = """example:
  eoforge release import satmae.pth releases/satmae --layout satmae --architecture vit_large_patch16 \\
      --sensor S2L2A --bands B02 B03 B04 B05 B06 B07 B08 B8A B11 B12"""


def register_eval(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``eoforge eval``, with one verb per registered protocol."""
    help_text = "downstream protocols on frozen or finetuned encoders"
    group = commands.add_parser("eval", help=help_text, description=help_text)
    protocols = group.add_subparsers(title="eval commands")
    for name in PROTOCOLS:
        protocol = get_protocol(name)
        parser = _command(
            protocols, name, protocol.summary, f"example:\n  {protocol.example}", run_eval
        )
        parser.set_defaults(protocol=name)
        for flag, flag_help in protocol.flags.items():
            parser.add_argument(f"--{flag}", action="store_true", help=flag_help)
        parser.add_argument("--release", required=True, help="release folder")
        parser.add_argument(
            "--dataset", required=True, help="NAME:ROOT, e.g. indian_pines:/data/indian_pines"
        )
        parser.add_argument("--out", help="write the result as JSON here")
        _device_argument(parser)
        parser.add_argument(
            "options",
            nargs="*",
            help=f"key=value options: {option_names(protocol)}, and the dataset's options",
        )
    return group


def option_names(protocol) -> str:
    """The ``key=value`` options of ``protocol`` for its help (lists shown as ``key=[...]``)."""
    hints = typing.get_type_hints(protocol.options)
    names = []
    for option in fields(protocol.options):
        if option.name in protocol.flags:
            continue
        kinds = typing.get_args(hints[option.name]) or (hints[option.name],)
        is_list = any(typing.get_origin(kind) is list for kind in kinds)
        names.append(f"{option.name}=[...]" if is_list else option.name)
    return ", ".join(names)


def run_eval(args: argparse.Namespace) -> int:
    """Run the protocol of the verb with its ``key=value`` options and flags."""
    from eoforge.finetune.evaluate import run_protocol
    from eoforge.launch.config import key_values

    options = key_values(args.options)
    options |= {flag: True for flag in get_protocol(args.protocol).flags if getattr(args, flag)}
    run_protocol(
        args.protocol, args.release, args.dataset, out=args.out, device=args.device, **options
    )
    return 0


def register_bench(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``eoforge bench``: the group of the bench verbs."""
    help_text = "run a benchmark suite over a release; compare results"
    return commands.add_parser("bench", help=help_text, description=help_text)


def register_bench_run(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``eoforge bench run SUITE --release R``."""
    parser = _command(
        commands,
        "run",
        "datasets x protocols x encoders x seeds; resumes where it stopped",
        BENCH_RUN_EXAMPLES,
        run_bench,
    )
    parser.add_argument("suite", help="suite YAML")
    parser.add_argument("--release", required=True, help="release folder")
    parser.add_argument("--out", help="results folder (default: bench/<suite name>)")
    _device_argument(parser)
    return parser


def run_bench(args: argparse.Namespace) -> int:
    """Run (or continue) a suite and print its table."""
    from eoforge.finetune.bench import load_suite, run_suite

    suite = load_suite(args.suite)
    out = Path(args.out or Path("bench") / suite.name)
    results = run_suite(suite, args.release, out, device=args.device)
    print((out / "results.md").read_text(), end="")
    print(f"{len(results['cells'])} cells; results in {out}/results.{{json,csv,md,png}}")
    return 0


def register_bench_compare(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``eoforge bench compare A B``."""
    parser = _command(
        commands, "compare", "side-by-side table of two results", None, run_bench_compare
    )
    parser.add_argument("a", help="results.json")
    parser.add_argument("b", help="results.json")
    return parser


def run_bench_compare(args: argparse.Namespace) -> int:
    """Print the side-by-side table of two results."""
    from eoforge.finetune.bench import compare

    print(compare(args.a, args.b), end="")
    return 0


def register_embed(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``eoforge embed --release R SRC OUT``."""
    parser = _command(
        commands,
        "embed",
        "georeferenced per-patch embeddings of a GeoTIFF, tile by tile",
        EMBED_EXAMPLES,
        run_embed,
    )
    parser.add_argument("--release", required=True, help="release folder")
    parser.add_argument("src", help="GeoTIFF to embed")
    parser.add_argument("out", help="GeoTIFF to write (one pixel per patch, one band per feature)")
    parser.add_argument("--sensor", help="registry sensor of the file's bands")
    parser.add_argument(
        "--bands", nargs="+", help="band ids or names of the file's bands, in order"
    )
    parser.add_argument("--window", type=int, help="crop side in patches the encoder sees at once")
    parser.add_argument("--tile", type=int, help="pixels read per tile")
    parser.add_argument("--batch-size", type=int, default=16)
    _device_argument(parser)
    return parser


def run_embed(args: argparse.Namespace) -> int:
    """Write the embeddings GeoTIFF."""
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


def register_release_import(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``eoforge release import CHECKPOINT OUT``: it resolves ``--sensor``'s bands through the
    sensor registry of datasets/, which models/ (the release format's home) never imports."""
    parser = _command(
        commands,
        "import",
        "write a release from a published DOFA or SatMAE checkpoint (.pth or .safetensors)",
        RELEASE_IMPORT_EXAMPLES,
        run_release_import,
    )
    parser.add_argument("checkpoint")
    parser.add_argument("out", help="release folder to write")
    parser.add_argument("--layout", required=True, choices=["dofa", "satmae"])
    parser.add_argument(
        "--architecture", required=True, help="eoforge encoder name, e.g. vit_base_patch16"
    )
    parser.add_argument("--sensor", required=True, help="registry sensor of the input bands")
    parser.add_argument(
        "--bands", nargs="+", help="the model's input bands in its channel order (default: all)"
    )
    parser.add_argument("--licence", default="other", help="the checkpoint's licence")
    return parser


def run_release_import(args: argparse.Namespace) -> int:
    """Write the release of a published checkpoint."""
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


def _command(commands, name: str, help_text: str, epilog: str | None, run):
    # eval's verbs are registered here, not by the command line: their examples keep their lines.
    parser = commands.add_parser(
        name,
        help=help_text,
        description=help_text,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(run=run)
    return parser


def _device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
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
