"""The ``eoforge release`` group and ``eoforge release verify``: the release format is models'.
Registered through the ``eoforge.commands`` entry points (setup.cfg); ``release build`` joins the
group from pretrain/ (it reads runs) and ``release import`` from finetune/ (it needs the sensor
registry of datasets/, which models never imports)."""

from __future__ import annotations

import argparse


def register_release(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``eoforge release``: the group of the release verbs."""
    help_text = "build and verify releases"
    return commands.add_parser("release", help=help_text, description=help_text)


def register_verify(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``eoforge release verify RELEASE``."""
    help_text = "check a release's files, card and hash"
    parser = commands.add_parser(
        "verify",
        help=help_text,
        description=help_text,
        epilog="example:\n  eoforge release verify runs/demo/release",
    )
    parser.add_argument("release")
    parser.set_defaults(run=run_verify)
    return parser


def run_verify(args: argparse.Namespace) -> int:
    """Check a release and print what it holds."""
    from eoforge.models.release import verify_release

    card = verify_release(args.release)
    print(
        f"{args.release}: ok ({len(card['bands'])} bands, {card['steps']} steps, "
        f"sha256 {card['weights_sha256'][:12]}...)"
    )
    return 0
