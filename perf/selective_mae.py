"""PERFORMANCE.md target 2: SelectiveMAE step throughput against MAE at the same encoder.

Three training steps are timed side by side in one process, on the same synthetic 12-band
Sentinel-2 batch (random pixels: the step does the same work whatever they hold):

* ``selective_mae``: ``eoforge.pretrain.selective_mae.SelectiveMAE`` (encoder on 15% of the
  patches, 8 cross-attention decoder blocks on 25%), HOG scoring and PSTS selection inside the
  step, ``set_progress`` advanced every step so all selection phases are visited;
* ``mae``: ``eoforge.pretrain.mae.MAE`` (75% masking, 8 self-attention decoder blocks over all
  patches), the same encoder and decoder widths;
* ``ref_mae``: ``RefMAE`` from ``../shared/bench/ref_mae.py`` (imported by path, ``--ref``), the
  plain reference recipe at the same shapes (eager on a CPU, where compiling is not what is
  measured; ``torch.compile``d on a GPU, with ``ref_mae_eager`` beside it).

A step is forward + backward + ``AdamW.step`` + ``zero_grad``: fp32 on a CPU, bf16 autocast and
fused AdamW on a GPU (ViT-B/16, 224^2, batch 256, as PERFORMANCE.md). The models are timed in
rounds, the order rotating every round so drift and thermal state fall on all of them alike;
each round times ``--steps`` steps of each model, and the figure per model is the median over
rounds. Ratios are of those medians. Gate (PERFORMANCE.md): SelectiveMAE >= 1.4x the
throughput of MAE (CPU) or of the compiled reference MAE (GPU); goal 2.0x.

Usage: ``python perf/selective_mae.py [--smoke] [--out perf/results] [--threads 1]``; writes
selective_mae.json and .md into --out.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from eoforge.models.spectral import SMARTIES_RANGES
from eoforge.models.vit import SpectralViT
from eoforge.pretrain.mae import MAE
from eoforge.pretrain.selective_mae import SelectiveMAE

from perf_report import machine, now, write_results

REPO_ROOT = Path(__file__).resolve().parents[1]
REF_MAE = REPO_ROOT.parent / "shared" / "bench" / "ref_mae.py"
GATE, GOAL = 1.4, 2.0
ADAMW = dict(lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)  # MAE's published settings

FULL = dict(
    img=128, patch=16, bands=12, batch=4, dim=384, depth=12, heads=6,
    decoder_dim=512, decoder_depth=8, decoder_heads=16, rounds=9, steps=1, warmup=1,
)  # fmt: skip
GPU = dict(
    img=224, patch=16, bands=12, batch=256, dim=768, depth=12, heads=12,
    decoder_dim=512, decoder_depth=8, decoder_heads=16, rounds=5, steps=10, warmup=3,
)  # fmt: skip
SMOKE = dict(
    img=32, patch=8, bands=12, batch=2, dim=64, depth=2, heads=4,
    decoder_dim=32, decoder_depth=1, decoder_heads=4, rounds=2, steps=1, warmup=1,
)  # fmt: skip
# The 12 Sentinel-2 L2A bands of the spectral ranges (B01-B12 with B8A, without B10).
S2_BANDS = [(r.name.removeprefix("S2_"), (r.lo + r.hi) / 2) for r in SMARTIES_RANGES[:12]]


def s2_batch(cfg: dict) -> dict:
    """A batch in the batch contract: view "S2L2A" [B, bands, img, img] of random pixels."""
    b, c, s = cfg["batch"], cfg["bands"], cfg["img"]
    image = torch.randn(b, c, s, s, generator=torch.Generator().manual_seed(0))
    bands = S2_BANDS[:c]
    return {
        "S2L2A": {
            "image": image,
            "valid": torch.ones_like(image, dtype=torch.bool),
            "band_ids": [f"S2L2A:{name}" for name, _ in bands],
            "wavelengths": torch.tensor([wl for _, wl in bands]).expand(b, -1),
            "bandwidths": torch.full((b, c), 20.0),
            "gsd": torch.full((b,), 10.0),
        },
        "meta": {},
    }


def encoder(cfg: dict) -> SpectralViT:
    torch.manual_seed(0)  # the same encoder weights under every objective
    return SpectralViT(cfg["patch"], cfg["dim"], cfg["depth"], cfg["heads"])


def decoder(cfg: dict) -> dict:
    return {k: cfg[k] for k in ("decoder_dim", "decoder_depth", "decoder_heads")}


def load_ref_mae(path: Path):
    """``RefMAE`` from the reference script, or None where it is absent."""
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location("ref_mae", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.RefMAE


def reference(ref_cls, cfg: dict) -> nn.Module:
    """The reference MAE at the shapes of ``cfg``, seeded like the encoders here (on the CPU)."""
    torch.manual_seed(0)
    return ref_cls(
        img=cfg["img"], patch=cfg["patch"], chans=cfg["bands"], dim=cfg["dim"],
        depth=cfg["depth"], heads=cfg["heads"], ddim=cfg["decoder_dim"],
        ddepth=cfg["decoder_depth"], dheads=cfg["decoder_heads"],
    )  # fmt: skip


def train_step(
    model: nn.Module, loss_fn: Callable[[], torch.Tensor], device: torch.device
) -> Callable[[], None]:
    """One forward + backward + AdamW step of ``model`` (MAE's published optimiser settings);
    bf16 autocast and the fused AdamW on a GPU."""
    gpu = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), **ADAMW, fused=gpu)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch of ``s2_batch`` with its tensors on ``device``."""
    view = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch["S2L2A"].items()}
    return {"S2L2A": view, "meta": batch["meta"]}


def build_steps(cfg: dict, ref_path: Path, device: torch.device) -> dict[str, Callable[[], None]]:
    batch = to_device(s2_batch(cfg), device)
    selective = SelectiveMAE(encoder(cfg), **decoder(cfg)).to(device)
    mae = MAE(encoder(cfg), **decoder(cfg)).to(device)
    counter = {"step": 0}

    def selective_loss() -> torch.Tensor:
        # Cycle through the training fractions so every selection phase is timed.
        selective.set_progress((counter["step"] % 10) / 10)
        counter["step"] += 1
        return selective(batch)["loss"]

    steps = {
        "selective_mae": train_step(selective, selective_loss, device),
        "mae": train_step(mae, lambda: mae(batch)["loss"], device),
    }
    ref_cls = load_ref_mae(ref_path)
    if ref_cls is not None:
        images = batch["S2L2A"]["image"]
        ref = reference(ref_cls, cfg).to(device)
        if device.type == "cuda":
            compiled = torch.compile(ref)
            steps["ref_mae"] = train_step(ref, lambda: compiled(images, 0.75), device)
            eager = reference(ref_cls, cfg).to(device)  # its own weights and optimizer
            steps["ref_mae_eager"] = train_step(eager, lambda: eager(images, 0.75), device)
        else:
            steps["ref_mae"] = train_step(ref, lambda: ref(images, 0.75), device)
    return steps


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_rounds(
    steps: dict[str, Callable[[], None]], cfg: dict, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per step of each model in every round, the model order rotating per round."""
    for step in steps.values():
        for _ in range(cfg["warmup"]):
            step()
    names = list(steps)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(cfg["rounds"]):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync(device)
            start = time.perf_counter()
            for _ in range(cfg["steps"]):
                steps[name]()
            sync(device)
            samples[name].append((time.perf_counter() - start) / cfg["steps"])
    return samples


def markdown(result: dict) -> str:
    cfg, machine, gate = result["config"], result["machine"], result["gate"]
    lines = [
        f"# SelectiveMAE vs MAE, training step (forward + backward + AdamW), {result['device']}",
        "",
        f"Machine: {machine['processor'] or machine['machine']}, {machine['cpu_count']} CPUs "
        f"({machine['torch_threads']} torch thread(s)), {result['device']}, torch "
        f"{machine['torch']}, "
        f"{result['date']}. Encoder ViT D={cfg['dim']}, depth {cfg['depth']}, {cfg['heads']} "
        f"heads, patch {cfg['patch']}; decoder {cfg['decoder_dim']} x {cfg['decoder_depth']} "
        f"({cfg['decoder_heads']} heads); batch {cfg['batch']} x {cfg['bands']} bands x "
        f"{cfg['img']}^2 px ({result['patches']} patches), {result['precision']}. Median over "
        f"{cfg['rounds']} interleaved rounds of {cfg['steps']} step(s).",
        "",
        "| model | ms / step | img/s | x ref_mae | range over rounds (ms) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in result["models"].items():
        vs_ref = f"{row['vs_ref']:.2f}" if "vs_ref" in row else "n/a"
        lines.append(
            f"| {name} | {row['step_s'] * 1e3:.1f} | {row['img_per_s']:.1f} | {vs_ref} "
            f"| {min(row['samples_s']) * 1e3:.1f}-{max(row['samples_s']) * 1e3:.1f} |"
        )
    verdict = "PASS" if gate["pass"] else "FAIL"
    goal = "reached" if gate["speedup"] >= GOAL else "not reached"
    lines += [
        "",
        f"**Gate**: SelectiveMAE is {gate['speedup']:.2f}x {gate['against']}'s throughput per step "
        f"(needs {GATE}x): {verdict}. Goal {GOAL}x: {goal}. Per round (paired): "
        f"{min(gate['speedup_per_round']):.2f}x-{max(gate['speedup_per_round']):.2f}x.",
    ]
    if "ref_mae" not in result["models"]:
        lines.append("The reference MAE script was not found; its column is n/a.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, runs in seconds")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--ref", type=Path, default=REF_MAE, help="path of ref_mae.py")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    gpu = device.type == "cuda"
    cfg = dict(SMOKE if args.smoke else GPU if gpu else FULL)

    threads = torch.get_num_threads()
    if not gpu:
        torch.set_num_threads(args.threads)
    try:
        samples = time_rounds(build_steps(cfg, args.ref, device), cfg, device)
    finally:
        torch.set_num_threads(threads)
    models = {}
    for name, times in samples.items():
        step_s = statistics.median(times)
        models[name] = {"step_s": step_s, "img_per_s": cfg["batch"] / step_s, "samples_s": times}
    if "ref_mae" in models:
        for row in models.values():
            row["vs_ref"] = models["ref_mae"]["step_s"] / row["step_s"]
    # On a GPU the yardstick is the compiled reference (PERFORMANCE.md); on a CPU, eoforge's MAE.
    against = "ref_mae" if gpu and "ref_mae" in models else "mae"
    speedup = models[against]["step_s"] / models["selective_mae"]["step_s"]
    result = {
        "benchmark": "selective_mae",
        "smoke": args.smoke,
        "date": now(),
        "device": torch.cuda.get_device_name() if gpu else "CPU",
        "precision": (
            ("bf16 autocast, ref_mae compiled" if "ref_mae" in models else "bf16 autocast")
            if gpu
            else "fp32, eager"
        ),
        "machine": machine(torch.get_num_threads() if gpu else args.threads),
        "config": cfg,
        "patches": (cfg["img"] // cfg["patch"]) ** 2,
        "models": models,
        "gate": {
            "speedup": speedup,
            "against": against,
            # Rounds interleave the models, so each round's ratio is a paired measurement.
            "speedup_per_round": [
                m / s
                for m, s in zip(
                    models[against]["samples_s"], models["selective_mae"]["samples_s"], strict=True
                )
            ],
            "gate": GATE,
            "goal": GOAL,
            "pass": speedup >= GATE,
        },
    }
    name = "selective_mae_gpu" if gpu else "selective_mae"
    write_results(args.out, name, result, markdown)
    return result


if __name__ == "__main__":
    main()
