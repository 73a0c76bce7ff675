"""The registry of evaluation protocols: ``NAME`` -> its module, imported on first use.

A protocol module defines ``PROTOCOL = Protocol(...)``: its name (the module's), a one-line
summary, the dataset tasks it scores, a dataclass of its ``key=value`` options (checked like a
config: unknown keys and wrong types are errors naming the key; every option dataclass has a
``seed``), and two functions:

* ``run(release, dataset, options, *, device, progress, out, dataset_options) -> dict``: the
  result of ``eoforge eval NAME`` and of ``eoforge.finetune.evaluate.run_protocol``;
* ``cell(split, seed, training) -> dict``: one cell of a bench suite (``{"metrics": {name:
  float}, "details": {...}}`` and what the protocol adds) on a ``bench.PreparedSplit``.

Multilabel is a property of a dataset (its task), not a protocol: ``knn`` and ``finetune`` score
it by mAP. Modules import torch and the scoring code inside their functions, so the command line
reads the registry and the options without them.

Adding a protocol: write ``eoforge/finetune/protocols/<name>.py`` with its ``PROTOCOL``, then add
one line to ``PROTOCOLS``; ``eoforge eval <name>``, bench suites and the tests that run over the
registry pick it up.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

PROTOCOLS = {
    "linear": "eoforge.finetune.protocols.linear",
    "knn": "eoforge.finetune.protocols.knn",
    "finetune": "eoforge.finetune.protocols.finetune",
    "segmentation": "eoforge.finetune.protocols.segmentation",
    "change": "eoforge.finetune.protocols.change",
}


@dataclass(frozen=True)
class Protocol:
    """One evaluation protocol (module docstring).

    Attributes:
        name: its registry name, the name of its module.
        summary: one line for ``eoforge eval --help``.
        tasks: the dataset tasks it scores (``eoforge.datasets.labelled.TASKS``).
        options: dataclass of its options, defaults the protocol's own.
        run: scores a release on a dataset (module docstring).
        cell: scores one prepared bench split (module docstring).
        flags: boolean options offered as ``--<flag>`` on the command line, with their help.
        example: the command line shown under ``eoforge eval NAME --help``.
    """

    name: str
    summary: str
    tasks: tuple[str, ...]
    options: type
    run: Callable[..., dict]
    cell: Callable[..., dict]
    flags: Mapping[str, str] = field(default_factory=dict)
    example: str = ""


def get_protocol(name: str) -> Protocol:
    """The protocol registered as ``name``.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; known protocols: {', '.join(PROTOCOLS)}")
    return importlib.import_module(PROTOCOLS[name]).PROTOCOL
