"""PERFORMANCE.md target 3: LESS attention against full joint spatial-spectral attention.

Both modules map [B, C+1, N+1, D] tokens to the same shape at the same width: ``LessAttention``
(with the 640 m perception field at 30 m GSD, patch 8, as the encoder applies it to a whole patch
grid: a ``GridField`` window per patch) and a plain multi-head attention over all
(C+1)(N+1) tokens through ``torch.nn.functional.scaled_dot_product_attention`` (qkv, SDPA, proj).
The MLP that follows either is the same per-token cost and is left out.

What is measured, per cell of C x N, batch 1, on ``--threads`` CPU threads (default 1: on a small
shared CPU, OpenMP barriers across busy cores stall the many small ops of LESS by 10-50x, which
would measure the neighbours; both modules get the same threads, so the ratios stay fair):
  * time: median wall time of forward + backward (``out.backward(g)`` with a fixed upstream
    gradient g made beforehand, so no loss buffers are timed or counted).
  * saved: bytes of the tensors autograd keeps for backward after the forward (storages
    counted once, inputs and weights excluded), recorded with ``saved_tensors_hooks``. This is
    the activation memory that a stack of layers multiplies by its depth, and the memory the
    gate's "leaner" is judged on: the input, the output and their gradients are the same size for
    both modules, so the whole-allocator peak of one layer is bounded by them whatever the
    attention does.
  * flops: matmul FLOPs of forward + backward counted by ``torch.utils.flop_counter`` (LESS
    only); with time and memory, its log-log slopes against C and N show how the cost grows.
  * per-token yardstick: the time of one ``nn.Linear(D, D)`` forward + backward over the same
    tokens, an operation that is linear in the token count by construction. On a CPU its time per
    token still rises once the [C+1, N+1, D] tensors outgrow the caches, so the slope of LESS's
    time *relative to the yardstick* separates LESS's algorithmic growth from the machine's.
  * peak: bytes held by torch's CPU allocator during forward + backward above what was held
    before (saved activations plus transient buffers, the output and all gradients), read from
    the running allocation total that ``torch.profiler`` records with ``profile_memory=True``.
    Scratch space that oneDNN/MKL allocate outside torch is not seen.
Full-attention cells above ``--max-full-tokens`` are not run: time and memory are extrapolated by
a non-negative least-squares fit ``a*L + b*L^2`` (L tokens) on the measured full cells, the
projections being linear in L and the attention quadratic, and are marked extrapolated.
On CPU, SDPA dispatches to a fused (flash-style) kernel that never materialises the L x L
attention matrix, so its memory grows about linearly; the table also gives, for reference, the
memory of SDPA's math kernel, which does materialise it (measured up to ``--max-math-tokens``,
then extrapolated the same way).

Usage: ``python perf/less_attention.py [--smoke | --quick] [--out perf/results]``; writes
less_attention.json, .md and .png into --out.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch._C._profiler import _EventType
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from eoforge.models.less import LessAttention, grid_field

from perf_report import machine, now, write_results

FULL = dict(channels=(12, 50, 100, 202), patches=(64, 256, 1024), dim=96, heads=4, k=2, rank=8)
FULL.update(max_full_tokens=16_384, max_math_tokens=7_000, gate=(202, 256), min_time_s=0.5)
# The CPU set's run (perf/run_cpu.py): the same sweep with shorter timings and a smaller
# measured full-attention range (more of it extrapolated), in about a minute.
QUICK = dict(FULL, min_time_s=0.05, max_full_tokens=4_096, max_math_tokens=3_000)
SMOKE = dict(channels=(3, 6), patches=(4, 16), dim=16, heads=2, k=2, rank=2)
SMOKE.update(max_full_tokens=60, max_math_tokens=60, gate=(6, 16), min_time_s=0.0)
PATCH, GSD, RADIUS_M = 8, 30.0, 640.0
GATE_RATIO = 5.0


class FullAttention(nn.Module):
    """Multi-head self-attention over all (C+1)(N+1) tokens through SDPA."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C+1, N+1, D] -> [B, C+1, N+1, D]."""
        shape = x.shape
        b, dim = shape[0], shape[-1]
        qkv = self.qkv(x.reshape(b, -1, dim)).reshape(
            b, -1, 3, self.num_heads, dim // self.num_heads
        )
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, L, d]
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, L, d]
        return self.proj(out.transpose(1, 2).reshape(shape))


def _step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, extra: tuple) -> None:
    module(x, *extra).backward(grad)


def time_step(
    module: nn.Module, x: torch.Tensor, grad: torch.Tensor, extra: tuple, min_time_s: float
) -> float:
    """Median seconds of forward + backward over >= 3 runs (and >= min_time_s), after a warm-up."""
    _step(module, x, grad, extra)
    times: list[float] = []
    while len(times) < 3 or (sum(times) < min_time_s and len(times) < 20):
        start = time.perf_counter()
        _step(module, x, grad, extra)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_bytes(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, extra: tuple) -> int:
    """Peak CPU-allocator bytes above the starting level during one forward + backward."""
    module.zero_grad(set_to_none=True)
    x.grad = None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _step(module, x, grad, extra)
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation:
            events.append((event.start_time_ns, event.extra_fields))
    events.sort(key=lambda e: e[0])
    first = events[0][1]
    start = first.total_allocated - first.alloc_size
    return max(fields.total_allocated for _, fields in events) - start


def saved_bytes(module: nn.Module, x: torch.Tensor, extra: tuple) -> int:
    """Bytes of the storages autograd saves for backward in one forward, inputs and weights aside."""
    inputs = [x, *(t for t in extra if isinstance(t, torch.Tensor)), *module.parameters()]
    skip = {t.untyped_storage().data_ptr() for t in inputs}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x, *extra)
    return sum(saved.values())


def count_flops(module: nn.Module, x: torch.Tensor, extra: tuple) -> int:
    """Matmul FLOPs of one forward + backward."""
    with FlopCounterMode(display=False) as counter:
        _step(module, x, torch.ones_like(x), extra)
    return counter.get_total_flops()


def fit_linear_quadratic(tokens: list[int], values: list[float]) -> tuple[float, float]:
    """Non-negative least squares for value = a*L + b*L^2, relative errors weighted equally."""
    L = np.asarray(tokens, dtype=float)
    y = np.asarray(values, dtype=float)
    design = np.stack([L, L**2], axis=1) / y[:, None]
    best, best_err = (0.0, 0.0), np.inf
    # Two unknowns: the NNLS optimum is the free solution or one coefficient pinned at 0.
    candidates = [np.linalg.lstsq(design, np.ones_like(y), rcond=None)[0]]
    for keep in (0, 1):
        coef = np.zeros(2)
        coef[keep] = np.linalg.lstsq(design[:, [keep]], np.ones_like(y), rcond=None)[0][0]
        candidates.append(coef)
    for coef in candidates:
        if (coef >= 0).all():
            err = float(np.square(design @ coef - 1).sum())
            if err < best_err:
                best, best_err = (float(coef[0]), float(coef[1])), err
    return best


def loglog_slope(xs: list[float], ys: list[float]) -> float:
    """Slope of log y against log x (the exponent of a power law)."""
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def measure(
    module: nn.Module, x: torch.Tensor, extra: tuple, min_time_s: float, timed: bool = True
) -> dict:
    """Time, peak and saved bytes of one module on one cell."""
    grad = torch.randn_like(x)  # the upstream gradient, made outside the measurements
    result = {"peak_bytes": peak_bytes(module, x, grad, extra)}
    result["saved_bytes"] = saved_bytes(module, x, extra)
    if timed:
        result["time_s"] = time_step(module, x, grad, extra, min_time_s)
    return result


def run_cells(cfg: dict) -> list[dict]:
    """Measure every C x N cell (full attention only up to the token caps)."""
    torch.manual_seed(0)
    cells = []
    for c in cfg["channels"]:
        for n in cfg["patches"]:
            side = int(round(n**0.5))
            tokens = (c + 1) * (n + 1)
            x = torch.randn(1, c + 1, n + 1, cfg["dim"], requires_grad=True)
            field = grid_field((side, side), torch.tensor([PATCH * GSD]), RADIUS_M)
            less = LessAttention(cfg["dim"], cfg["heads"], cfg["k"], cfg["rank"])
            full = FullAttention(cfg["dim"], cfg["heads"])
            cell = {"C": c, "N": n, "tokens": tokens}
            cell["less"] = measure(less, x, (None, field), cfg["min_time_s"])
            cell["less"]["flops"] = count_flops(less, x, (None, field))
            yardstick = nn.Linear(cfg["dim"], cfg["dim"])
            cell["yardstick_s"] = time_step(
                yardstick, x, torch.randn_like(x), (), cfg["min_time_s"]
            )
            cell["less"]["time_vs_yardstick"] = cell["less"]["time_s"] / cell["yardstick_s"]
            if tokens <= cfg["max_full_tokens"]:
                cell["full"] = {**measure(full, x, (), cfg["min_time_s"]), "extrapolated": False}
            if tokens <= cfg["max_math_tokens"]:
                with sdpa_kernel(SDPBackend.MATH):
                    cell["full_math"] = measure(full, x, (), 0.0, timed=False)
                cell["full_math"]["extrapolated"] = False
            cells.append(cell)
            print(
                f"C={c:4d} N={n:5d} tokens={tokens:7d}  LESS {cell['less']['time_s'] * 1e3:9.1f} ms"
                + (f"  full {cell['full']['time_s'] * 1e3:9.1f} ms" if "full" in cell else ""),
                flush=True,
            )
    return cells


def extrapolate(cells: list[dict], key: str, metrics: tuple[str, ...]) -> dict:
    """Fill ``cell[key]`` where it was not measured; returns the fitted coefficients."""
    measured = [cell for cell in cells if key in cell]
    fits = {}
    for metric in metrics:
        a, b = fit_linear_quadratic(
            [cell["tokens"] for cell in measured], [cell[key][metric] for cell in measured]
        )
        fits[metric] = {
            "a_per_token": a,
            "b_per_token_sq": b,
            "measured_loglog_slope": loglog_slope(
                [cell["tokens"] for cell in measured], [cell[key][metric] for cell in measured]
            ),
        }
    for cell in cells:
        if key not in cell:
            L = cell["tokens"]
            cell[key] = {
                m: fits[m]["a_per_token"] * L + fits[m]["b_per_token_sq"] * L**2 for m in metrics
            }
            cell[key]["extrapolated"] = True
    return fits


METRICS = ("time_s", "peak_bytes", "saved_bytes", "flops", "time_vs_yardstick")
LINEAR_SLOPE = 1.15  # the gate's "linear": log-log slope of FLOPs and saved memory at most this


def less_slopes(cells: list[dict], cfg: dict) -> dict:
    """Log-log slopes of LESS time and memory against C (per N) and against N (per C)."""
    grid = {(cell["C"], cell["N"]): cell["less"] for cell in cells}
    slopes: dict[str, dict] = {"vs_C": {}, "vs_N": {}}
    for n in cfg["patches"]:
        rows = [grid[(c, n)] for c in cfg["channels"]]
        slopes["vs_C"][f"N={n}"] = {
            m: loglog_slope(cfg["channels"], [r[m] for r in rows]) for m in METRICS
        }
    for c in cfg["channels"]:
        rows = [grid[(c, n)] for n in cfg["patches"]]
        slopes["vs_N"][f"C={c}"] = {
            m: loglog_slope(cfg["patches"], [r[m] for r in rows]) for m in METRICS
        }
    return slopes


def _verdict(ratio: float) -> str:
    return f"{ratio:.1f}x ({'PASS' if ratio >= GATE_RATIO else 'FAIL'})"


def markdown(result: dict) -> str:
    cfg, gate, machine = result["config"], result["gate"], result["machine"]
    mib = 2**-20
    lines = [
        "# LESS attention vs full joint attention (SDPA), forward + backward",
        "",
        f"Machine: {machine['processor'] or machine['machine']}, {machine['cpu_count']} CPUs "
        f"({machine['torch_threads']} torch thread(s)), torch {machine['torch']}, {result['date']}. "
        f"D={cfg['dim']}, H={cfg['heads']}, k={cfg['k']}, r={cfg['rank']}, batch 1, "
        f"perception field {RADIUS_M:.0f} m at {GSD:.0f} m GSD, patch {PATCH}. "
        "*peak*: torch CPU-allocator peak during forward + backward above the starting level; "
        "*saved*: tensors kept for backward (inputs and weights aside). "
        "`*` = extrapolated (a*L + b*L^2 fit on the measured cells), not run.",
        "",
        "| C | N | tokens | LESS ms | full ms | time × | LESS peak MiB | full peak MiB | peak × "
        "| LESS saved MiB | full saved MiB | saved × | full math-kernel peak MiB |",
        "|" + "---:|" * 13,
    ]
    for cell in result["cells"]:
        less, full, math_ = cell["less"], cell["full"], cell["full_math"]
        star = "*" if full["extrapolated"] else ""
        math_star = "*" if math_["extrapolated"] else ""
        lines.append(
            f"| {cell['C']} | {cell['N']} | {cell['tokens']} | {less['time_s'] * 1e3:.1f} "
            f"| {full['time_s'] * 1e3:.1f}{star} | {cell['ratio_time']:.1f}{star} "
            f"| {less['peak_bytes'] * mib:.1f} | {full['peak_bytes'] * mib:.1f}{star} "
            f"| {cell['ratio_memory']:.1f}{star} "
            f"| {less['saved_bytes'] * mib:.1f} | {full['saved_bytes'] * mib:.1f}{star} "
            f"| {cell['ratio_saved']:.1f}{star} | {math_['peak_bytes'] * mib:.0f}{math_star} |"
        )
    how = "extrapolated" if gate["full_extrapolated"] else "measured"
    lines += [
        "",
        f"**Gate** at C={gate['C']}, N={gate['N']} (full attention {how}), needs {GATE_RATIO:.0f}x: "
        f"faster {_verdict(gate['ratio_time'])}; leaner in activation memory (saved for "
        f"backward) {_verdict(gate['ratio_saved'])}. For information, the whole-allocator peak "
        f"of one layer (input, output and gradients included, the same for both) is "
        f"{gate['ratio_memory']:.1f}x lower, and {gate['ratio_memory_math']:.0f}x lower than "
        "with SDPA's math kernel, which materialises the attention matrix.",
        "",
        f"**Linear growth**: LESS's FLOPs and saved memory have log-log slopes <= {LINEAR_SLOPE} "
        f"against C and against N, and its time relative to a per-token Linear at most "
        f"{LINEAR_SLOPE - 1:.2f} above flat: {'PASS' if gate['linear_pass'] else 'FAIL'} "
        f"(largest slopes: FLOPs {gate['max_slope_flops']:.2f}, saved "
        f"{gate['max_slope_saved']:.2f}, time / yardstick {gate['max_slope_relative']:.2f}; "
        f"raw wall time {gate['max_slope_time']:.2f}).",
        "",
        "LESS log-log slopes (1 = linear; for time / yardstick, 0 = grows like a per-token op):",
        "",
        "| against | at | FLOPs | saved | peak | time | time / yardstick |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for axis, rows in (("C", result["less_slopes"]["vs_C"]), ("N", result["less_slopes"]["vs_N"])):
        for at, slope in rows.items():
            lines.append(
                f"| {axis} | {at} | {slope['flops']:.2f} | {slope['saved_bytes']:.2f} "
                f"| {slope['peak_bytes']:.2f} | {slope['time_s']:.2f} "
                f"| {slope['time_vs_yardstick']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = sorted(result["cells"], key=lambda cell: cell["tokens"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    panels = (
        ("time_s", 1e3, "forward + backward (ms)"),
        ("peak_bytes", 2**-20, "peak memory (MiB)"),
        ("saved_bytes", 2**-20, "saved for backward (MiB)"),
    )
    tokens = [cell["tokens"] for cell in cells]
    for ax, (metric, scale, label) in zip(axes, panels, strict=True):
        ax.plot(tokens, [cell["less"][metric] * scale for cell in cells], "o", label="LESS")
        series = [("full", "s", "full (SDPA)")]
        if metric == "peak_bytes":
            series.append(("full_math", "^", "full (SDPA math kernel)"))
        for key, marker, name in series:
            measured = [c for c in cells if not c[key]["extrapolated"]]
            guessed = [c for c in cells if c[key]["extrapolated"]]
            line = ax.plot(
                [c["tokens"] for c in measured],
                [c[key][metric] * scale for c in measured],
                marker,
                label=name,
            )[0]
            ax.plot(
                [c["tokens"] for c in guessed],
                [c[key][metric] * scale for c in guessed],
                marker,
                mfc="none",
                color=line.get_color(),
                label=name + ", extrapolated",
            )
        ax.set(xscale="log", yscale="log", xlabel="tokens (C+1)(N+1)", ylabel=label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"LESS vs full attention, D={result['config']['dim']}, CPU, batch 1")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, runs in seconds")
    parser.add_argument("--quick", action="store_true", help="shorter timings, about a minute")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    cfg = dict(SMOKE if args.smoke else QUICK if args.quick else FULL)

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        cells = run_cells(cfg)
    finally:
        torch.set_num_threads(threads)
    fits = {
        "full": extrapolate(cells, "full", ("time_s", "peak_bytes", "saved_bytes")),
        "full_math": extrapolate(cells, "full_math", ("peak_bytes", "saved_bytes")),
    }
    for cell in cells:
        cell["ratio_time"] = cell["full"]["time_s"] / cell["less"]["time_s"]
        cell["ratio_memory"] = cell["full"]["peak_bytes"] / cell["less"]["peak_bytes"]
        cell["ratio_saved"] = cell["full"]["saved_bytes"] / cell["less"]["saved_bytes"]
    gate_cell = next(cell for cell in cells if (cell["C"], cell["N"]) == tuple(cfg["gate"]))
    gate = {
        "C": gate_cell["C"],
        "N": gate_cell["N"],
        "full_extrapolated": gate_cell["full"]["extrapolated"],
        "ratio_time": gate_cell["ratio_time"],
        "ratio_memory": gate_cell["ratio_memory"],
        "ratio_saved": gate_cell["ratio_saved"],
        "ratio_memory_math": gate_cell["full_math"]["peak_bytes"] / gate_cell["less"]["peak_bytes"],
    }
    slopes = less_slopes(cells, cfg)
    every = [row for axis in slopes.values() for row in axis.values()]
    gate["max_slope_flops"] = max(row["flops"] for row in every)
    gate["max_slope_saved"] = max(row["saved_bytes"] for row in every)
    gate["max_slope_time"] = max(row["time_s"] for row in every)
    gate["max_slope_relative"] = max(row["time_vs_yardstick"] for row in every)
    gate["faster_pass"] = gate["ratio_time"] >= GATE_RATIO
    gate["leaner_pass"] = gate["ratio_saved"] >= GATE_RATIO
    gate["linear_pass"] = (
        max(gate["max_slope_flops"], gate["max_slope_saved"]) <= LINEAR_SLOPE
        and gate["max_slope_relative"] <= LINEAR_SLOPE - 1
    )
    result = {
        "benchmark": "less_attention",
        "smoke": args.smoke,
        "quick": args.quick,
        "date": now(),
        "machine": machine(args.threads),
        "config": {**cfg, "patch": PATCH, "gsd": GSD, "radius_m": RADIUS_M, "batch": 1},
        "memory_measure": {
            "peak_bytes": "peak torch CPU-allocator bytes above the starting level during one "
            "forward + backward (torch.profiler profile_memory running total)",
            "saved_bytes": "bytes of tensors saved for backward by one forward (saved_tensors_hooks, "
            "storages deduplicated, inputs and weights excluded); the gate's activation memory",
        },
        "cells": cells,
        "fits": fits,
        "less_slopes": slopes,
        "gate": gate,
    }
    write_results(args.out, "less_attention", result, markdown)
    plot(result, args.out / "less_attention.png")
    return result


if __name__ == "__main__":
    main()
