"""Where the time goes: a torch.profiler profile of one eoforge MAE pretraining step.

The step is the training loop's (``eoforge.pretrain.train``), without DeepSpeed: fetch the next
batch from a ``ShardStream`` and move it to the device (``to_device``, as the engine does), seed
torch for the step, ``MAE(vit_base_patch16)`` forward (bf16 autocast on a GPU, fp32 on a CPU),
backward, gradient clipping at 1.0 and a fused AdamW step over the engine's parameter groups
(``eoforge.launch.engine.param_groups``). The batches are real: the 7 Sentinel-2 L2A GeoTIFFs of
``../shared/data/hydro_s2l2a_patches`` (12 bands), built into shards of ``img``-pixel tiles in a
temporary folder with ``build_shards`` + ``compute_stats`` (as ``perf/data_pipeline.py`` does)
and read by a ``ShardStream`` with one worker process (the worker's decoding overlaps the step;
what the step waits for is the "data wait").

Phases are ``torch.profiler.record_function`` ranges this script wraps around the step's parts
(the library carries no profiling code): data wait, tokenizer (``encoder.tokenize``: the
spectrum-aware patch projection plus positions), encoder (``encoder.encode``), decoder + loss
(``MAE.decode``, the reconstruction head and ``MAE.loss``), the rest of the forward (masking,
token glue), backward, optimizer (clip + AdamW + zero_grad). A phase's time is the wall time of
its ranges on a CPU; on a GPU it is the device time of the kernels launched inside them (shares
are of the step's device time), with the ranges' CPU time beside it. The top 10 operators are
ranked by self time (device time on a GPU).

Two checks (PERFORMANCE.md target 1's levers):

1. The tokenizer projects all bands in one batched operation: the matmul-family operator calls
   (matmul, linear, mm, bmm, einsum, conv, ...; an operator inside another counted one is not
   counted again) of ``SpectrumAwarePatchEmbed`` forward and backward are counted for 4, 12 and
   200 bands, and must not depend on the band count.
2. No host synchronisation in forward + backward + optimizer: ``aten::_local_scalar_dense``
   (every ``.item()``/``bool()``/``float()`` of a tensor), ``aten::nonzero`` (a data-dependent
   shape) and device-to-host copies, located to file:line through the profiler's Python stacks.
   Must be zero. On a CPU the fused AdamW kernel reads its per-parameter step counter with an
   ``aten::item`` of a CPU tensor inside ``aten::_fused_adamw_`` (the CUDA kernel reads it on
   the device); those reads are counted apart and not as host syncs.

Usage: ``python perf/profile_step.py [--smoke] [--out perf/results] [--threads 1]
[--shards DIR]``; writes profile_step.json and .md into --out. On a CPU the step runs at base
width on 128 x 128 tiles (batch 4); on a GPU at 224 x 224 (batch 64).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import re
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, profile, record_function

from eoforge.datasets.reader import ShardStream
from eoforge.datasets.stats import Normaliser
from eoforge.launch.engine import param_groups, to_device
from eoforge.models.registry import create_model
from eoforge.models.spectral import SpectrumAwarePatchEmbed
from eoforge.pretrain.mae import MAE
from eoforge.pretrain.schedule import step_seed
from eoforge.pretrain.views import sensor_views

from perf_report import machine, now, write_results

DATA, TOKENIZER, ENCODER, DECODER = "data wait", "tokenizer", "encoder", "decoder + loss"
FORWARD, BACKWARD, OPTIMIZER, STEP = "forward", "backward", "optimizer", "step"
FORWARD_OTHER, OTHER = "forward, other (masking, glue)", "other (seeding)"
PHASES = (DATA, TOKENIZER, ENCODER, DECODER, FORWARD_OTHER, BACKWARD, OPTIMIZER, OTHER)
LABELS = {DATA, TOKENIZER, ENCODER, DECODER, FORWARD, BACKWARD, OPTIMIZER, STEP}

MATMUL_OPS = {
    "aten::matmul", "aten::linear", "aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm",
    "aten::addbmm", "aten::einsum", "aten::mv", "aten::addmv", "aten::dot", "aten::tensordot",
    "aten::conv1d", "aten::conv2d", "aten::conv3d", "aten::convolution", "aten::_convolution",
}  # fmt: skip
SCALAR_READ, NONZERO = "aten::_local_scalar_dense", "aten::nonzero"
FUSED_OPTIMIZERS = {"aten::_fused_adamw_", "aten::_fused_adam_"}
BAND_COUNTS = (4, 12, 200)
PYTHON_FRAME = re.compile(r"^[^<].*\(\d+\): ")  # "path/file.py(123): function"

CPU = dict(
    model="vit_base_patch16", img=128, batch=4, decoder_dim=512, decoder_depth=8,
    decoder_heads=16, warmup=2, steps=5, copies=1, shard_size=8, tokenizer_img=32,
)  # fmt: skip
GPU = dict(CPU, img=224, batch=64, warmup=5, steps=10, copies=10, shard_size=32)
SMOKE = dict(
    model="vit_test_patch8", img=128, batch=2, decoder_dim=32, decoder_depth=1,
    decoder_heads=4, warmup=1, steps=1, copies=1, shard_size=8, tokenizer_img=16,
)  # fmt: skip


def labelled(label: str, fn: Callable) -> Callable:
    """``fn`` run inside a ``record_function(label)`` range."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)

    return wrapped


def instrument(mae: MAE) -> MAE:
    """Label the phases of ``mae``'s forward (instance attributes: the classes stay untouched)."""
    encoder = mae.encoder
    encoder.tokenize = labelled(TOKENIZER, encoder.tokenize)
    encoder.encode = labelled(ENCODER, encoder.encode)
    mae.decode = labelled(DECODER, mae.decode)
    mae.head.forward = labelled(DECODER, mae.head.forward)
    mae.loss = labelled(DECODER, mae.loss)
    return mae


def build_data(cfg: dict, work: Path) -> Path:
    """Shards of ``cfg["img"]``-pixel tiles of the real S2 GeoTIFFs, with stats.json."""
    # Imported here: ingest needs rasterio, which a machine given --shards may lack.
    from data_pipeline import PATCHES, SAMPLE_DATA, link_sources

    from eoforge.datasets.ingest import build_shards
    from eoforge.datasets.stats import compute_stats

    link_sources(SAMPLE_DATA / PATCHES, work / "src", cfg["copies"])
    out = work / "shards"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DN 0 (S2 nodata) pixels over water are reported
        build_shards(
            work / "src", out, "S2L2A", tile_size=cfg["img"], shard_size=cfg["shard_size"],
            min_valid=0.0, overwrite=True, progress=False,
        )  # fmt: skip
    compute_stats(out, progress=False)
    return out


def build_step(
    cfg: dict, shards: Path, device: torch.device
) -> tuple[Callable[[], None], MAE, Iterator[dict]]:
    """The training step (module docstring) over a stream of ``shards``; returns the step, the
    instrumented objective and the batch iterator it draws from."""
    torch.manual_seed(0)
    encoder = create_model(cfg["model"])
    decoder = {k: cfg[k] for k in ("decoder_dim", "decoder_depth", "decoder_heads")}
    mae = instrument(MAE(encoder, **decoder)).to(device)
    optimizer = torch.optim.AdamW(param_groups(mae, 0.05), lr=1.5e-4, betas=(0.9, 0.95), fused=True)
    stream = ShardStream(
        shards,
        Normaliser.from_file(shards / "stats.json"),
        batch_size=cfg["batch"],
        num_workers=1,
        rank=0,
        world_size=1,
        device=device if device.type != "cpu" else None,
    )
    batches = stream.iter_batches()
    autocast = (
        functools.partial(torch.autocast, device.type, dtype=torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext
    )
    counter = {"step": 0}

    def step() -> None:
        with record_function(STEP):
            with record_function(DATA):
                batch = to_device(next(batches), device)
            torch.manual_seed(step_seed(0, counter["step"], 0))
            counter["step"] += 1
            with record_function(FORWARD), autocast():
                loss = mae(batch)["loss"]
            with record_function(BACKWARD):
                loss.backward()
            with record_function(OPTIMIZER):
                torch.nn.utils.clip_grad_norm_(mae.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

    return step, mae, batches


def activities(device: torch.device) -> list[ProfilerActivity]:
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_steps(step: Callable[[], None], steps: int, device: torch.device) -> profile:
    with profile(activities=activities(device)) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    return prof


def phase_times(prof: profile, steps: int, device: torch.device) -> dict[str, dict]:
    """ms per step of every phase (CPU wall time; device time of its kernels on a GPU)."""
    totals = {e.key: e for e in prof.key_averages() if e.key in LABELS}

    def ms(label: str, attr: str) -> float:
        event = totals.get(label)
        return getattr(event, attr) / 1e3 / steps if event is not None else 0.0

    times = {}
    for attr, key in (("cpu_time_total", "ms"), ("device_time_total", "device_ms")):
        if key == "device_ms" and device.type != "cuda":
            continue
        t = {label: ms(label, attr) for label in LABELS}
        t[FORWARD_OTHER] = t[FORWARD] - t[TOKENIZER] - t[ENCODER] - t[DECODER]
        t[OTHER] = t[STEP] - t[DATA] - t[FORWARD] - t[BACKWARD] - t[OPTIMIZER]
        times[key] = {phase: t[phase] for phase in PHASES} | {"step": t[STEP]}
    return times


def top_operators(prof: profile, steps: int, device: torch.device, n: int = 10) -> list[dict]:
    """The ``n`` aten operators with the most self time (device time on a GPU) per step."""
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    ops = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    ops.sort(key=lambda e: getattr(e, attr), reverse=True)
    return [
        {"name": e.key, "calls": e.count / steps, "self_ms": getattr(e, attr) / 1e3 / steps}
        for e in ops[:n]
    ]


def ancestors(event: FunctionEvent) -> list[str]:
    names, parent = [], event.cpu_parent
    while parent is not None:
        names.append(parent.name)
        parent = parent.cpu_parent
    return names


def outermost_matmuls(events: list[FunctionEvent]) -> dict[str, int]:
    """{operator: calls} of matmul-family operators not nested in another one."""
    counts: dict[str, int] = {}
    for e in events:
        if e.name in MATMUL_OPS and not MATMUL_OPS.intersection(ancestors(e)):
            counts[e.name] = counts.get(e.name, 0) + 1
    return counts


def tokenizer_op_counts(embed: torch.nn.Module, side: int) -> dict[int, dict]:
    """Matmul-family operator calls of one forward and backward of the tokenizer ``embed``
    (``(images, band_ids, wavelengths) -> tokens``) on ``side``-pixel images, per band count
    (hyperspectral-like bands evenly spread over 420-2400 nm)."""
    counts = {}
    for bands in BAND_COUNTS:
        band_ids = [f"HSI:B{i:03d}" for i in range(bands)]
        wavelengths = torch.linspace(420.0, 2400.0, bands).expand(2, -1)  # [B, C]
        images = torch.randn(2, bands, side, side)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bands between ranges are interpolated, by design
            embed(images, band_ids, wavelengths)  # resolves and caches the band -> range weights
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with record_function(FORWARD):
                tokens = embed(images, band_ids, wavelengths)  # [B, N, D]
            with record_function(BACKWARD):
                tokens.square().mean().backward()
        events = prof.events()
        counts[bands] = {
            phase: outermost_matmuls([e for e in events if phase in ancestors(e)])
            for phase in (FORWARD, BACKWARD)
        }
    return counts


def call_site(event: FunctionEvent) -> str:
    """The innermost Python frame outside torch (``file(line): function``) that led to
    ``event``: the nearest enclosing Python-function event of a ``with_stack`` profile, or a
    frame of the event's own stack where the profiler records stacks per operator."""
    while event is not None:
        frames = [event.name, *event.stack] if PYTHON_FRAME.match(event.name) else event.stack
        frames = [f for f in frames if not f.startswith("torch/") and "/torch/" not in f]
        if frames:
            return frames[0]
        event = event.cpu_parent
    return "unknown"


def host_syncs(step: Callable[[], None], device: torch.device) -> dict:
    """Host synchronisations in the forward, backward and optimizer phases of one ``step``
    (module docstring, check 2), each located by phase, operator and file:line."""
    with profile(activities=activities(device), with_stack=True) as prof:
        step()
        synchronize(device)
    found, fused_counter_reads = [], 0
    for e in prof.events():
        if e.name not in (SCALAR_READ, NONZERO):
            continue
        chain = ancestors(e)
        phase = next((label for label in chain if label in (FORWARD, BACKWARD, OPTIMIZER)), None)
        if phase is None:
            continue  # data wait: reads of host tensors before the batch reaches the device
        if device.type == "cpu" and FUSED_OPTIMIZERS.intersection(chain):
            fused_counter_reads += 1
            continue
        ops = [name for name in chain if name.startswith("aten::") or name in LABELS]
        found.append({"op": e.name, "phase": phase, "inside": ops[:3], "at": call_site(e)})
    copies = sum("Memcpy DtoH" in e.name for e in prof.events())
    return {
        "count": len(found) + copies,
        "scalar_reads": sum(f["op"] == SCALAR_READ for f in found),
        "nonzero": sum(f["op"] == NONZERO for f in found),
        "device_to_host_copies": copies,
        "where": found,
        "fused_optimizer_counter_reads": fused_counter_reads,
    }


def markdown(result: dict) -> str:
    cfg, mach, times = result["config"], result["machine"], result["phases"]
    gpu = "device_ms" in times
    basis = times["device_ms" if gpu else "ms"]
    step_ms = basis["step"]
    lines = [
        f"# Where the time goes: one MAE pretraining step, {result['device']}",
        "",
        f"Machine: {mach['processor'] or mach['machine']}, {mach['cpu_count']} CPUs "
        f"({mach['torch_threads']} torch thread(s)), torch {mach['torch']}, {result['date']}. "
        f"MAE({cfg['model']}), decoder {cfg['decoder_dim']} x {cfg['decoder_depth']} "
        f"({cfg['decoder_heads']} heads), 75% masking; batch {cfg['batch']} x "
        f"{result['bands']} bands x {cfg['img']}^2 px of real S2 L2A tiles from a ShardStream "
        f"(1 worker), {result['precision']}, eager, fused AdamW; mean of {cfg['steps']} "
        f"profiled steps after {cfg['warmup']} warm-up steps. Profiled step "
        f"{step_ms:.1f} ms.",
        "",
        "| phase | ms / step | share |" + (" CPU ms / step |" if gpu else ""),
        "|---|---:|---:|" + ("---:|" if gpu else ""),
    ]
    for phase in PHASES:
        ms = basis[phase]
        extra = f" {times['ms'][phase]:.2f} |" if gpu else ""
        lines.append(f"| {phase} | {ms:.2f} | {ms / step_ms:.1%} |{extra}")
    lines += [
        "",
        "| top operators (self time) | calls / step | self ms / step | share of step |",
        "|---|---:|---:|---:|",
    ]
    for op in result["top_operators"]:
        lines.append(
            f"| `{op['name']}` | {op['calls']:.0f} | {op['self_ms']:.2f} | "
            f"{op['self_ms'] / step_ms:.1%} |"
        )
    tok, sync = result["tokenizer_ops"], result["host_syncs"]
    lines += [
        "",
        "| tokenizer bands | matmul-family calls, forward | backward |",
        "|---:|---|---|",
    ]
    for bands, counts in tok["per_bands"].items():
        fwd, bwd = (
            ", ".join(f"{n} x{c}" for n, c in sorted(counts[p].items()))
            for p in (FORWARD, BACKWARD)
        )
        lines.append(f"| {bands} | {fwd} | {bwd} |")
    lines += [
        "",
        f"**Check 1**: the tokenizer's matmul-family calls do not grow with the band count "
        f"({', '.join(map(str, BAND_COUNTS))} bands): {'PASS' if tok['constant'] else 'FAIL'}.",
        f"**Check 2**: host synchronisations in forward + backward + optimizer: {sync['count']} "
        f"({sync['scalar_reads']} scalar reads, {sync['nonzero']} nonzero, "
        f"{sync['device_to_host_copies']} device-to-host copies): "
        f"{'PASS' if sync['count'] == 0 else 'FAIL'}.",
    ]
    for f in sync["where"]:
        lines.append(f"- `{f['op']}` in {f['phase']} ({' < '.join(f['inside'])}) at {f['at']}")
    if sync["fused_optimizer_counter_reads"]:
        lines.append(
            f"Not counted: {sync['fused_optimizer_counter_reads']} reads of the CPU step "
            "counters inside the CPU fused AdamW kernel (on a GPU the kernel reads them on the "
            "device)."
        )
    lines.append(f"First batch (worker start, not in the step): {result['first_batch_ms']:.0f} ms.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, runs in seconds")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--shards", type=Path, help="shards (with stats.json) to read instead")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = dict(SMOKE if args.smoke else GPU if device.type == "cuda" else CPU)

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with tempfile.TemporaryDirectory(prefix="eoforge-profile-") as work:
            shards = args.shards or build_data(cfg, Path(work))
            step, mae, batches = build_step(cfg, shards, device)
            start = time.perf_counter()
            first = next(batches)  # starts the worker: reported apart from the step
            first_ms = (time.perf_counter() - start) * 1e3
            for _ in range(cfg["warmup"]):
                step()
            prof = profile_steps(step, cfg["steps"], device)
            syncs = host_syncs(step, device)
        embed = mae.encoder.patch_embed
        torch.manual_seed(0)
        tokenizer = SpectrumAwarePatchEmbed(embed.patch_size, embed.embed_dim)
        per_bands = tokenizer_op_counts(tokenizer, cfg["tokenizer_img"])
    finally:
        torch.set_num_threads(threads)
    result = {
        "benchmark": "profile_step",
        "smoke": args.smoke,
        "date": now(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "machine": machine(args.threads),
        "config": cfg,
        "bands": len(sensor_views(first)[0][1]["band_ids"]),
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "phases": phase_times(prof, cfg["steps"], device),
        "top_operators": top_operators(prof, cfg["steps"], device),
        "first_batch_ms": first_ms,
        "tokenizer_ops": {
            "per_bands": per_bands,
            "constant": all(c == per_bands[BAND_COUNTS[0]] for c in per_bands.values()),
        },
        "host_syncs": syncs,
    }
    write_results(args.out, "profile_step", result, markdown)
    return result


if __name__ == "__main__":
    main()
