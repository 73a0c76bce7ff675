"""The ``eoforge`` command line: discovers the verbs each layer declares and dispatches to them.

A verb is an entry point of the group ``eoforge.commands`` (setup.cfg; another installed package
adds verbs the same way). Its name is the verb's words joined by dots (``data.build``), its value a
function ``register(commands)`` that adds the verb's parser to ``commands`` (an argparse
subparsers action) with plain argparse and returns it. A group (``data``) is a parser whose verbs
join it; the help of every verb keeps the line breaks of its description and epilog (the
examples). A verb's parser carries ``run(args) -> exit code`` in its defaults, and a verb that can
run on several ranks also ``launch_command(args, world_size)`` (``eoforge.launch.commands``).
Parents are registered before their verbs, in the order of ``HELP_ORDER``. Verb modules
import their implementation (torch, readers) inside ``run``, so ``--help`` stays light.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from importlib.metadata import entry_points

GROUP = "eoforge.commands"
# The order of the help: a user's workflow. Verbs not listed here (another package's) follow,
# by name; parents always come before their verbs.
HELP_ORDER = (
    "data", "data.build", "data.stats", "data.verify", "pretrain", "launch", "launch.slurm",
    "launch.local", "release", "release.build", "release.verify", "release.import", "embed",
    "eval", "bench", "bench.run", "bench.compare",
)  # fmt: skip


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
        if args.debug or os.environ.get("EOFORGE_DEBUG") == "1":
            raise
        print(f"eoforge: error: {err}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    """The ``eoforge`` parser with every registered verb; ``parser.verbs`` maps each verb's
    words (``("data", "build")``) to its parser."""
    parser = argparse.ArgumentParser(
        prog="eoforge",
        description="Pretrain, release and evaluate multi-sensor Earth-observation foundation models.",
        epilog="Start with `eoforge pretrain` (a CPU demo end to end), then `eoforge <verb> --help`.",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of an error (also EOFORGE_DEBUG=1)",
    )
    found = sorted(entry_points(group=GROUP), key=_help_position)
    top = [ep.name for ep in found if "." not in ep.name]
    subcommands = {(): parser.add_subparsers(title="commands", metavar=f"{{{','.join(top)}}}")}
    parser.verbs = {}
    for ep in found:
        words = tuple(ep.name.split("."))
        parent = words[:-1]
        if parent not in subcommands:
            # The first verb of a group opens the group's list of commands.
            subcommands[parent] = parser.verbs[parent].add_subparsers(
                title=f"{' '.join(parent)} commands"
            )
        verb = ep.load()(subcommands[parent])
        verb.formatter_class = argparse.RawDescriptionHelpFormatter  # examples keep their lines
        parser.verbs[words] = verb
    return parser


def _help_position(ep) -> tuple:
    listed = ep.name in HELP_ORDER
    return (ep.name.count("."), not listed, HELP_ORDER.index(ep.name) if listed else 0, ep.name)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings to a user read as one line each, without the source line that raised them."""
    print(f"eoforge: warning: {message}", file=file or sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
