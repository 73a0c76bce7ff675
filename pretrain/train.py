"""The pretraining loop: distributed init -> components -> resume -> steps -> checkpoints -> release.

The loop knows the engine and objective protocols only; it never names DeepSpeed or MAE.
Resume is the default: relaunching the same command continues from the newest complete
checkpoint in the run directory, with each rank's data stream continuing from the position it
saved in that checkpoint.
"""

from __future__ import annotations

import shutil
import time
from itertools import islice
from pathlib import Path

import torch

from eoforge.launch.checkpoints import committed, inspect_checkpoint, newest_whole
from eoforge.launch.config import save_config
from eoforge.launch.distributed import (
    any_rank,
    barrier,
    detect_env,
    gather_objects,
    init_distributed,
)
from eoforge.launch.engine import build_engine, refuse_other_precision, resolve_precision
from eoforge.launch.faults import kill_point, poison_loss
from eoforge.launch.guards import NonFiniteGuard
from eoforge.launch.run_logging import TensorBoard, get_logger, reconstruction_grid
from eoforge.launch.rundir import RunDir
from eoforge.launch.signals import StopRequest
from eoforge.models import create_model
from eoforge.pretrain.config import EngineConfig, PretrainConfig
from eoforge.pretrain.contrastive import collapse_warnings
from eoforge.pretrain.data import (
    SampleLog,
    build_stream,
    build_val_stream,
    prepare_shards,
    restore_position,
)
from eoforge.pretrain.objectives import build_objective, objective_label, validate_objective
from eoforge.pretrain.schedule import (
    STALL_WINDOW,
    loss_has_not_moved,
    lr_at,
    peak_lr,
    schedule_warnings,
    stalled_loss_warning,
    step_seed,
)


@torch.no_grad()
def validation_loss(engine, stream, batches: int, seed: int, rank: int) -> float:
    """The objective's mean loss over the first ``batches`` held-out batches of every rank, with
    the masks of batch ``i`` seeded by (seed, i, rank): the same batches and masks every time."""
    total, count = 0.0, 0
    for i, batch in enumerate(islice(stream.epoch_batches(0), batches)):
        torch.manual_seed(step_seed(seed, i, rank, 1))
        total, count = total + engine(batch)["loss"].item(), count + 1
    sums = gather_objects((total, count))
    return sum(t for t, _ in sums) / max(1, sum(n for _, n in sums))


def data_health(stream) -> dict[str, float]:
    """TensorBoard counters of the samples read and the bad ones skipped, summed over every
    rank (``ShardStream.health``; a collective: every rank calls it at the same step)."""
    healths = gather_objects(stream.health())
    samples = sum(h["samples"] for h in healths)
    bad = {reason: sum(h["bad"][reason] for h in healths) for reason in healths[0]["bad"]}
    values = {f"data/bad/{reason}": n for reason, n in bad.items()}
    values.update(
        {"data/samples": samples, "data/bad_fraction": sum(bad.values()) / max(1, samples)}
    )
    return values


def pretrain(cfg: PretrainConfig) -> Path:
    """Run (or resume) pretraining as configured; returns the run directory."""
    dist_env = detect_env()
    cfg.validate(dist_env.world_size)
    validate_objective(cfg.objective)
    run = RunDir(cfg.run_dir)
    log = get_logger(None, dist_env.rank)
    if run.finished and not cfg.new_run:
        log.info(f"run {run.path} is already finished; pass new_run=true to start it afresh")
        return run.path
    dist_env = init_distributed(dist_env)
    if not cfg.new_run:
        # Before the run folder's config is rewritten or anything is built.
        refuse_resume_in_other_precision(run, cfg.engine)
    if dist_env.is_main:
        if cfg.new_run and run.path.exists():
            _clear(run)
        run.create()
        save_config(cfg, run.path / "config.yaml")
        run.write_env(dist_env.world_size)
    barrier()
    log = get_logger(run.logs, dist_env.rank)

    shard_dirs = prepare_shards(cfg.data, is_main=dist_env.is_main)
    barrier()
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank and every relaunch
    encoder = create_model(cfg.model.name, **cfg.model.kwargs)
    objective = build_objective(cfg.objective, encoder)
    accumulation = cfg.accumulation(dist_env.world_size)
    global_batch = cfg.global_batch(dist_env.world_size)
    peak = peak_lr(cfg.optim, global_batch)
    warmup = cfg.optim.warmup(cfg.steps)
    resume = newest_whole(run.checkpoints, is_main=dist_env.is_main)
    # A checkpoint of another world size resumes through the engine's universal form.
    resized = resume is not None and resume.world_size not in (None, dist_env.world_size)
    engine = build_engine(
        cfg.engine.name,
        objective,
        micro_batch=cfg.data.batch_size,
        lr=peak,
        weight_decay=cfg.optim.weight_decay,
        betas=cfg.optim.betas,
        optimizer=cfg.optim.name,
        momentum=cfg.optim.momentum,
        zero_stage=cfg.engine.zero_stage,
        precision=cfg.engine.precision,
        grad_clip=cfg.engine.grad_clip,
        accumulation=accumulation,
        load_universal=resized,
        compile=cfg.engine.compile,
    )
    # Batches are normalised on the training device (see ShardStream's device).
    stream = build_stream(cfg.data, shard_dirs, seed=cfg.seed, device=engine.device)
    val_stream = build_val_stream(cfg.data, stream.normaliser, seed=cfg.seed, device=engine.device)
    state = engine.load(resume) if resume else {}
    step = int(state.get("step", 0))
    log.info(
        f"{'resuming at step ' + str(step) if step else 'starting'}: {cfg.model.name} + "
        f"{objective_label(cfg.objective)}, ZeRO-{cfg.engine.zero_stage} {engine.precision}, world size "
        f"{dist_env.world_size}, global batch {global_batch} ({accumulation} micro-batch(es) per "
        f"step), peak lr {peak:.2e}, warm-up {warmup} steps"
    )
    for message in schedule_warnings(cfg.optim, cfg.steps, global_batch):
        log.warning(message)
    if resized:
        log.info(
            f"{resume.path} was written by {resume.world_size} rank(s); data positions remapped"
        )
    tb = TensorBoard(
        run.tensorboard, enabled=dist_env.is_main, purge_step=step + 1 if step else None
    )
    restore_position(stream, state.get("data", {}).get("ranks"), dist_env.rank)
    batches = stream.iter_batches()
    sample_log = SampleLog(run.logs, dist_env.rank) if cfg.data.log_ids else None
    window_start, window_losses = time.perf_counter(), []
    after_warmup = []  # the logged losses after warm-up, for loss_has_not_moved
    guard = NonFiniteGuard(cfg.engine.nonfinite_limit, int(state.get("nonfinite_skipped", 0)))

    def save(step: int) -> None:
        data = {"ranks": gather_objects(stream.state_dict())}  # each rank's own position
        client = {"step": step, "data": data, "nonfinite_skipped": guard.skipped}
        engine.save(run.checkpoints, step, client, cfg.keep_last)
        log.info(f"saved checkpoint at step {step} in {run.checkpoints}")

    with StopRequest() as stop:
        while step < cfg.steps:
            torch.manual_seed(step_seed(cfg.seed, step, dist_env.rank))
            lr = lr_at(step, peak, warmup, cfg.steps, cfg.optim.min_lr)
            engine.set_lr(lr)
            if hasattr(objective, "set_progress"):
                objective.set_progress(step / cfg.steps)
            done = tried = 0
            while done < accumulation:  # micro-batches of one optimizer step
                batch = next(batches)
                if sample_log:
                    sample_log.write(step, batch)
                losses = engine(batch)
                loss = poison_loss(losses["loss"], step + 1, dist_env.rank, tried)
                tried += 1
                if guard.skip(loss, step + 1):
                    if guard.exhausted:
                        save(step)
                        tb.close()
                        raise FloatingPointError(
                            f"{guard.in_a_row} non-finite losses in a row at step {step + 1} "
                            f"(engine.nonfinite_limit={guard.limit}); the weights of step {step} "
                            f"are saved in {run.checkpoints}. Lower optim.lr or optim.blr, or "
                            "check the data, then relaunch to resume."
                        )
                    continue
                engine.backward_step(loss)
                window_losses.append(loss.detach())
                done += 1
            step += 1
            # Once per optimizer step, not per micro-batch: an EMA updated on each of A
            # micro-batches would move with momentum m^A.
            if hasattr(objective, "after_optimizer_step"):
                objective.after_optimizer_step(engine.full_parameters)
            kill_point("kill", step, dist_env.rank)

            if step % cfg.log_every == 0 or step == cfg.steps:
                values = {k: v.item() for k, v in losses.items()}  # host sync: logging steps only
                # The logged loss is the mean since the last log: one batch is one sensor's.
                values["loss"] = torch.stack(window_losses).mean().item()
                elapsed = time.perf_counter() - window_start
                values.update(
                    lr=lr,
                    grad_norm=engine.grad_norm(),
                    samples_per_s=len(window_losses) * global_batch / accumulation / elapsed,
                )
                values["train/nonfinite_skipped"] = guard.skipped
                values.update(data_health(stream))
                tb.scalars(step, values)
                log.info(
                    f"step {step}/{cfg.steps} loss {values['loss']:.4f} lr {lr:.2e} "
                    f"{values['samples_per_s']:.1f} samples/s"
                )
                for message in collapse_warnings(values, step):
                    log.warning(message)
                if step > warmup and len(after_warmup) < STALL_WINDOW:
                    after_warmup.append(values["loss"])
                    if loss_has_not_moved(after_warmup):
                        log.warning(stalled_loss_warning(after_warmup, cfg.optim, global_batch))
                window_start, window_losses = time.perf_counter(), []
            if val_stream and step % cfg.data.val_every == 0:
                val = validation_loss(
                    engine, val_stream, cfg.data.val_batches, cfg.seed, dist_env.rank
                )
                tb.scalars(step, {"val/loss": val})
                log.info(f"step {step}/{cfg.steps} val/loss {val:.4f}")
            if step % cfg.image_every == 0 or step == cfg.steps:
                for sensor, images in engine.preview(batch).items():
                    tb.image(step, f"reconstruction/{sensor}", reconstruction_grid(images))

            # Every rank stops at the same step, whichever of them the signal reached.
            stopping = any_rank(stop.requested) or step == cfg.stop_at
            if step % cfg.save_every == 0 or step == cfg.steps or stopping:
                save(step)
            if stopping:
                log.info(f"stopping at step {step} (signal or stop_at); relaunch to resume")
                tb.close()
                return run.path
    tb.close()
    barrier()
    if dist_env.is_main:
        run.mark_finished(step)
        if cfg.release.export:
            from eoforge.pretrain.export import build_release

            out = build_release(run.path)
            log.info(f"release written to {out}")
    barrier()
    return run.path


def refuse_resume_in_other_precision(run: RunDir, engine: EngineConfig) -> None:
    """The newest whole checkpoint of ``run``, if any, must resume in ``engine``'s precision
    (``eoforge.launch.engine.refuse_other_precision``); checked without touching the run."""
    for path in reversed(committed(run.checkpoints)):
        found, _ = inspect_checkpoint(path)
        if found:
            refuse_other_precision(found, resolve_precision(engine.precision, engine.zero_stage))
            return


def _clear(run: RunDir) -> None:
    for folder in (run.checkpoints, run.tensorboard, run.logs, run.release):
        shutil.rmtree(folder, ignore_errors=True)
    run.finished_marker.unlink(missing_ok=True)
