"""The checkpoint folder of a run: atomic commits, a ``latest`` pointer, torn-checkpoint detection,
safe loading and the universal form that resumes on another world size.

Layout of ``<run>/checkpoints``::

    step_00000100/      a committed checkpoint: DeepSpeed's files + complete.json (its manifest)
    step_00000200/
    .partial-step_00000300/   being written (or left by a run killed while writing it)
    latest              the newest committed tag, written last (DeepSpeed's tools read it too)
    .universal/step_00000200/ the universal form of a checkpoint, made to change world size

A commit is: every rank writes its files into ``.partial-<tag>``; rank 0 writes the manifest
(each file's size, the step and the world size) into it, renames the folder to ``<tag>``
(atomic on one file system), then replaces ``latest``, then removes checkpoints beyond the last K.
A kill at any point leaves the previous checkpoint whole. On resume, a checkpoint without its
manifest, or whose files are missing or of another size than the manifest says, is torn: it is
skipped with a warning naming it, and the one before it is used.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

import torch

MANIFEST = "complete.json"
LATEST = "latest"
PARTIAL_PREFIX = ".partial-"
UNIVERSAL_DIR = ".universal"
# Everything DeepSpeed's ZeRO checkpoints pickle besides tensors and plain containers.
DEEPSPEED_GLOBALS = frozenset(
    {
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.utils.tensor_fragment.fragment_address",
    }
)

log = logging.getLogger("eoforge")


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file that would run code when unpickled (or is no torch checkpoint)."""


@dataclass(frozen=True)
class Checkpoint:
    """A committed checkpoint: its folder, step, and the world size and engine precision that
    wrote it (None where its manifest predates them)."""

    path: Path
    step: int
    world_size: int | None
    precision: str | None = None

    @property
    def tag(self) -> str:
        return self.path.name


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def partial_tag(step: int) -> str:
    return PARTIAL_PREFIX + step_tag(step)


def commit(
    directory: str | Path, step: int, world_size: int, keep_last: int, precision: str | None = None
) -> Path:
    """Rank 0, once every rank has written ``partial_tag(step)``: manifest (step, world size,
    the engine's resolved ``precision``, file sizes), rename, ``latest``, pruning to the last
    ``keep_last``. Returns the committed folder."""
    directory = Path(directory)
    partial, final = directory / partial_tag(step), directory / step_tag(step)
    files = {
        str(p.relative_to(partial)): p.stat().st_size
        for p in sorted(partial.rglob("*"))
        if p.is_file()
    }
    manifest = {"step": step, "world_size": world_size, "precision": precision, "files": files}
    _write_atomic(partial / MANIFEST, json.dumps(manifest, indent=1))
    if final.exists():  # a checkpoint of the same step from before a resume: replaced whole
        shutil.rmtree(final)
    os.replace(partial, final)
    _fsync_dir(directory)
    _write_atomic(directory / LATEST, final.name)
    for old in committed(directory)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def committed(directory: str | Path) -> list[Path]:
    """Committed checkpoint folders (``step_*``), oldest first; torn ones included."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("step_*") if p.is_dir())


def inspect_checkpoint(path: Path) -> tuple[Checkpoint | None, str]:
    """(the checkpoint, "") if ``path`` is whole, else (None, why it is torn)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        return None, f"it has no {MANIFEST}"
    except (OSError, ValueError) as err:
        return None, f"its {MANIFEST} is unreadable ({err})"
    for name, size in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            return None, f"{name} is missing"
        if file.stat().st_size != size:
            return None, f"{name} has {file.stat().st_size} bytes, the manifest says {size}"
    found = Checkpoint(
        path, int(manifest["step"]), manifest.get("world_size"), manifest.get("precision")
    )
    return found, ""


def newest_whole(directory: str | Path, is_main: bool = True) -> Checkpoint | None:
    """The newest checkpoint that is whole. Torn ones and partial folders are reported with a
    warning naming them (and, on the main rank, partial folders are removed)."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    for partial in sorted(directory.glob(PARTIAL_PREFIX + "*")):
        log.warning(f"checkpoint {partial} was never completed (the run died writing it); removed")
        if is_main:
            shutil.rmtree(partial, ignore_errors=True)
    for path in reversed(committed(directory)):
        found, why = inspect_checkpoint(path)
        if found:
            pointer = directory / LATEST
            named = pointer.read_text().strip() if pointer.is_file() else found.tag
            if named != found.tag:
                log.info(f"{pointer} names {named}; resuming {found.tag}")
            return found
        log.warning(f"checkpoint {path} is torn ({why}); falling back to the one before it")
    return None


def vet_pickles(path: Path) -> None:
    """Refuse a checkpoint folder any of whose ``.pt`` files would unpickle more than tensors,
    plain containers and DeepSpeed's own state classes (DeepSpeed's loader unpickles freely).

    Raises:
        UnsafeCheckpointError: naming the file and the objects it would build.
    """
    for file in sorted(path.rglob("*.pt")):
        try:
            found = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(file)))
        except Exception as err:  # not a torch zip archive: a bare pickle, or garbage
            raise UnsafeCheckpointError(
                f"{file} is not a torch checkpoint archive ({err}); refusing to load it"
            ) from None
        if found - DEEPSPEED_GLOBALS:
            raise UnsafeCheckpointError(
                f"{file} would build {sorted(found - DEEPSPEED_GLOBALS)} when unpickled, which can "
                "run arbitrary code; refusing to load it. Remove the file, or resume from a "
                "checkpoint you trust."
            )


def universal_location(checkpoint: Checkpoint) -> tuple[Path, str]:
    """(load dir, tag) of a checkpoint's universal form, for ``load_checkpoint``."""
    return checkpoint.path.parent / UNIVERSAL_DIR, checkpoint.tag


def to_universal(checkpoint: Checkpoint) -> tuple[Path, str]:
    """Convert a ZeRO checkpoint to DeepSpeed's universal form (parameter by parameter, no
    world size baked in) unless done already; returns ``universal_location``. Run on one rank,
    after ``vet_pickles`` (the converter unpickles freely)."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    root, tag = universal_location(checkpoint)
    out = root / tag
    if not (out / "zero").is_dir():
        shutil.rmtree(out, ignore_errors=True)
        log.info(f"converting {checkpoint.path} to a universal checkpoint in {out}")
        ds_to_universal(
            Namespace(
                input_folder=str(checkpoint.path),
                output_folder=str(out),
                num_extract_workers=1,
                num_merge_workers=1,
                keep_temp_folder=False,
                strict=True,
                inject_missing_state=True,
            )
        )
    return root, tag


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.tmp")
    with open(partial, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
