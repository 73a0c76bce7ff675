"""Run the CPU benchmark set and print one table: every PERFORMANCE.md target that a CPU can
measure, each through its own script (which writes its own JSON and Markdown into --out).

| target | script |
|---|---|
| 1. pretraining step (ratios; the gate is on a GPU: perf/gpu_check.sh) | mae_step.py |
| 2. SelectiveMAE against MAE and the reference MAE | selective_mae.py |
| 3. LESS attention against full attention | less_attention.py (``--quick`` here) |
| 4. data pipeline (reader per CPU core, ingest) | data_pipeline.py (``--copies 12`` here) |
| 5. scaling on paper | scaling.py |
| where the time goes | profile_step.py |

Every script writes into --out (default ``perf/results/cpu_set``, beside, not over, the full
runs' results), and so does the summary: run_cpu.json and run_cpu.md, with each script's seconds.

Usage: ``python perf/run_cpu.py [--out perf/results] [--smoke]``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Callable
from pathlib import Path

from perf_report import machine, now, write_results

PERF = Path(__file__).resolve().parent
COLUMNS = ("target", "measure", "result", "script", "seconds")


def _mae_step(r: dict) -> list[tuple[str, str, str]]:
    m = r["measured"]
    return [
        ("1", "eoforge MAE step vs reference ZeRO-2 (img/s)", f"{m['ratio_to_ref_zero2']:.2f}x"),
        ("1", "eoforge MAE step vs plain reference (img/s)", f"{m['ratio_to_ref_plain']:.2f}x"),
    ]


def _selective(r: dict) -> list[tuple[str, str, str]]:
    g = r["gate"]
    verdict = "PASS" if g["pass"] else "FAIL"
    return [("2", "SelectiveMAE vs MAE per step", f"{g['speedup']:.2f}x (gate 1.4x: {verdict})")]


def _less(r: dict) -> list[tuple[str, str, str]]:
    g = r["gate"]
    verdict = "PASS" if g["faster_pass"] and g["leaner_pass"] and g["linear_pass"] else "FAIL"
    return [
        (
            "3",
            f"LESS vs full attention at C={g['C']}, N={g['N']}",
            f"{g['ratio_time']:.1f}x faster, {g['ratio_saved']:.1f}x leaner ({verdict})",
        )
    ]


def _data(r: dict) -> list[tuple[str, str, str]]:
    g = r["gate"]
    verdict = "PASS" if g["pass"] else "FAIL"
    return [
        (
            "4",
            "reader per CPU core vs raw tar read",
            f"{g['reader_ratio']:.2f}x (gate 0.5: {verdict})",
        ),
        ("4", "ingest vs rasterio read", f"{g['ingest_ratio']:.2f}x"),
    ]


def _scaling(r: dict) -> list[tuple[str, str, str]]:
    check = r["measured_check"]
    sizes = ", ".join(f"{m['name']} {m['params']['total'] / 1e6:.0f}M" for m in r["models"])
    return [
        ("5", "models sized (encoder + MAE decoder)", sizes),
        (
            "5",
            f"{check['model']} model states + activations at batch {check['batch']} vs H100 peak",
            f"{check['estimate_gib']:.2f} vs {check['measured_gib']:.2f} GiB ({check['ratio']:.2f}x)",
        ),
    ]


def _headline(r: dict) -> list[tuple[str, str, str]]:
    return [("-", r["benchmark"], "see its table")]


# (module, arguments, summary of its result)
SET: list[tuple[str, list[str], Callable[[dict], list]]] = [
    ("mae_step", [], _mae_step),
    ("selective_mae", [], _selective),
    ("less_attention", ["--quick"], _less),
    ("data_pipeline", ["--copies", "12"], _data),
    ("scaling", [], _scaling),
    ("profile_step", [], _headline),
]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PERF / "results" / "cpu_set")
    parser.add_argument("--smoke", action="store_true", help="every script at tiny sizes")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(PERF))
    rows, runs = [], []
    for name, extra, summary in SET:
        if not (PERF / f"{name}.py").is_file():
            continue
        module = importlib.import_module(name)
        start = time.perf_counter()
        options = ["--smoke"] if args.smoke else extra
        result = module.main([*options, "--out", str(args.out)])
        seconds = time.perf_counter() - start
        runs.append({"script": f"{name}.py", "options": options, "seconds": seconds})
        rows += [(*row, f"{name}.py", seconds) for row in summary(result)]
    result = {
        "benchmark": "run_cpu",
        "smoke": args.smoke,
        "date": now(),
        "machine": machine(),
        "runs": runs,
        "rows": [dict(zip(COLUMNS, r, strict=True)) for r in rows],
        "total_seconds": sum(r["seconds"] for r in runs),
    }
    write_results(args.out, "run_cpu_smoke" if args.smoke else "run_cpu", result, markdown)
    return result


def markdown(result: dict) -> str:
    lines = [
        f"# CPU benchmark set, {result['date']}",
        "",
        f"{result['machine']['processor']}, {result['machine']['cpu_count']} CPUs, torch "
        f"{result['machine']['torch']}; {result['total_seconds']:.0f} s in all. Each script's "
        "own table is beside this one.",
        "",
        "| target | measure | result | script | s |",
        "|---|---|---|---|---:|",
        *(
            f"| {r['target']} | {r['measure']} | {r['result']} | {r['script']} | {r['seconds']:.0f} |"
            for r in result["rows"]
        ),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
