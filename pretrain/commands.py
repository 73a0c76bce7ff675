"""The ``eoforge pretrain`` and ``eoforge release build`` verbs (a release is built from a run).
Registered through the ``eoforge.commands`` entry points (setup.cfg); training code is imported
when a verb runs.

``pretrain`` can be launched on several ranks (``eoforge launch``): its parser's defaults carry
``launch_command(args, world_size)``, which checks the config for that world size and returns the
arguments every rank runs."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

PRETRAIN_EXAMPLES = """examples:
  eoforge pretrain                                   # the embedded CPU demo (synthetic S2/S1/EnMAP)
  eoforge pretrain --config mae data.shards=[shards/s2,shards/s1] run_dir=runs/mae
  eoforge pretrain --config my_run.yaml steps=2000 engine.zero_stage=3
Relaunching the same command resumes from the newest checkpoint in run_dir."""

RELEASE_BUILD_EXAMPLES = """examples:
  eoforge release build runs/demo                   # writes runs/demo/release
  eoforge release build runs/mae releases/mae-vit-b"""


def register_pretrain(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``eoforge pretrain [--config C] [key=value ...]``."""
    help_text = "pretrain (no arguments: the embedded demo)"
    parser = commands.add_parser(
        "pretrain",
        help=help_text,
        description=help_text,
        epilog=PRETRAIN_EXAMPLES,
    )
    parser.add_argument(
        "--config", default="demo", help="YAML file or shipped config name (default: demo)"
    )
    parser.add_argument(
        "overrides", nargs="*", help="key=value overrides, e.g. steps=200 data.batch_size=16"
    )
    parser.set_defaults(run=run_pretrain, launch_command=launch_command)
    return parser


def register_release_build(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``eoforge release build RUN_DIR [OUT]``."""
    help_text = "consolidate a run into a release"
    parser = commands.add_parser(
        "build",
        help=help_text,
        description=help_text,
        epilog=RELEASE_BUILD_EXAMPLES,
    )
    parser.add_argument("run_dir")
    parser.add_argument("out", nargs="?", help="release folder (default: RUN_DIR/release)")
    parser.set_defaults(run=run_release_build)
    return parser


def run_pretrain(args: argparse.Namespace) -> int:
    """Pretrain as configured, on the ranks this process was started with."""
    from eoforge.launch.distributed import detect_env
    from eoforge.pretrain.train import pretrain

    cfg = loaded_config(args.config, args.overrides)
    validate_for(cfg, detect_env().world_size)  # before any process group starts
    run_dir = pretrain(cfg)
    release = run_dir / "release"
    if release.is_dir():
        print(
            f"\nrelease: {release}\nnext steps:\n"
            f"  tensorboard --logdir {run_dir / 'tb'}\n"
            f"  eoforge eval linear --release {release} --dataset indian_pines:PATH/TO/indian_pines_aviris"
        )
    return 0


def launch_command(args: argparse.Namespace, world_size: int) -> tuple[list[str], Path]:
    """The ``pretrain`` arguments every one of ``world_size`` ranks runs, and the run folder;
    paths are made absolute so the ranks do not depend on their working folder.

    Raises:
        ConfigError: for new_run=true, or a config that does not load or does not hold for
            ``world_size`` ranks.
    """
    from eoforge.launch.config import ConfigError
    from eoforge.pretrain.config import find_config
    from eoforge.pretrain.schedule import schedule_warnings

    config = find_config(args.config).resolve()
    cfg = loaded_config(config, args.overrides)
    if cfg.new_run:
        raise ConfigError(
            "new_run=true would wipe the run at every requeue; remove the run folder instead"
        )
    validate_for(cfg, world_size)
    # Said here too: a submitted job's rank logs are read only later.
    for message in schedule_warnings(cfg.optim, cfg.steps, cfg.global_batch(world_size)):
        warnings.warn(message, stacklevel=1)
    run_dir = Path(cfg.run_dir).resolve()
    overrides = [o for o in args.overrides if not o.startswith("run_dir=")]
    return ["pretrain", "--config", str(config), *overrides, f"run_dir={run_dir}"], run_dir


def loaded_config(config: str | Path, overrides: list[str]):
    """The pretraining config ``config`` (a file or a shipped name) with ``overrides``.

    Raises:
        ConfigError: naming an unknown key or one of the wrong type.
    """
    from eoforge.launch.config import load_config
    from eoforge.pretrain.config import PretrainConfig, find_config

    return load_config(PretrainConfig, find_config(str(config)), overrides)


def validate_for(cfg, world_size: int) -> None:
    """Everything checkable before a run starts, for ``world_size`` ranks: the config's own
    checks, the model, its tokenizer and the objective with their options, and the shards. A
    failure is one line naming the key (ConfigError, or DataError for the shards)."""
    from eoforge.launch.config import ConfigError
    from eoforge.models.registry import check_model
    from eoforge.pretrain.data import check_shards
    from eoforge.pretrain.objectives import validate_objective

    try:
        cfg.validate(world_size)
        check_model(cfg.model.name, cfg.model.kwargs)
        validate_objective(cfg.objective)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    check_shards(cfg.data, world_size)


def run_release_build(args: argparse.Namespace) -> int:
    """Write the release of a run."""
    from eoforge.pretrain.export import build_release

    print(f"wrote {build_release(args.run_dir, args.out)}")
    return 0
