"""The one per-worker training loop, used by every stage.

``train_loop_per_worker(config)`` runs inside each Ray Train worker. It reads everything
from its ``config`` argument (never from module globals): ``config["stage"]`` is a stage
class (``raymtl.stages.base.Stage``: its type and life cycle are documented there) and
``config["cfg"]`` its nested config dict. A stage supplies what differs between stages; the
loop owns what they share (seeds, DeepSpeed, precision, sampling, weighting and fusion of the
per-stream losses, progress lines, validation/checkpoint/report, resume (as if never stopped:
each stream past the batches trained on, the sampler's and torch's random state); with ``keep_task_best``
each task's own parts at its best, ``raymtl.train.task_best``; every checkpoint carries the
run's validation history, ``metrics_history.json``, read by ``raymtl curves``).
Stages: ``raymtl.stages.multitask.MTLStage`` (multi-task fine-tuning, teachers, distillation)
and ``raymtl.stages.pretrain.PretrainStage`` (MLM + SimCSE further pre-training).
"""
from __future__ import annotations

import json
import math
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import raymtl.train.engine as eng
from raymtl.data.streams import configure_ray_data, prefetched
from raymtl.methods.fusion import PeriodicFusion, fused_surrogate, make_fusion
from raymtl.methods.sam import SAM
from raymtl.methods.sampling import get_sampler
from raymtl.methods.weighting import Fixed
from raymtl.models.device import to_device
from raymtl.models.encoder import tokenizer_source
from raymtl.train.logs import RunLog, model_card
from raymtl.train.task_best import TaskBest

TRAIN_LOG = "train.log"          # rank 0's lines, in the run directory (the driver's quiet console follows it)
_log_file: list[Path] = []


def say(msg: str) -> None:
    """Print once, and append to the run's ``train.log``. (Train V2 patches ``print`` and tees
    it when stdout is wrapped, which doubled every progress line on the driver.)"""
    print(msg, file=sys.__stdout__, flush=True)
    for f in _log_file:
        with open(f, "a") as out:
            out.write(msg + "\n")




class Progress:
    """Progress of one worker: step, examples/s, ETA, per-stream losses (window means).

    Throughput counts training time only (validation and checkpointing excluded); rows and
    useful (non-padding) tokens are this worker's, scaled by the world size for the run.
    The reported throughput (``report``) leaves out the first ``warmup`` steps of a run
    (Ray Data's first blocks, the allocator warming up) unless nothing else was measured.
    """
    warmup = 3

    def __init__(self, total: int, start: int, world: int):
        self.total, self.start, self.world = total, start, world
        self.train_s, self.rows, self.tokens, self.padded, self.losses = 0.0, 0, 0, 0, {}
        self.window, self.startup = self._empty(), self._empty()

    @staticmethod
    def _empty() -> dict:
        return {"s": 0.0, "rows": 0, "tokens": 0, "steps": 0, "data_s": 0.0}

    def update(self, seconds: float, batches: list[dict], losses: dict[str, float], data_s: float = 0.0):
        """``batches``: this worker's collated batches of the step (``input_ids[_b|_c]`` and
        their ``attention_mask``); ``data_s``: of ``seconds``, the time spent waiting for them."""
        rows = sum(len(b["input_ids"]) for b in batches) * self.world
        tokens = sum(int(v.sum()) for b in batches for k, v in b.items()
                     if k.startswith("attention_mask")) * self.world
        self.padded += sum(v.numel() for b in batches for k, v in b.items()
                           if k.startswith("input_ids")) * self.world
        in_startup = self.startup["steps"] < self.warmup
        self.train_s, self.rows, self.tokens = self.train_s + seconds, self.rows + rows, self.tokens + tokens
        window = self.startup if in_startup else self.window
        for k, v in (("s", seconds), ("rows", rows), ("tokens", tokens), ("steps", 1), ("data_s", data_s)):
            window[k] += v
        for t, v in losses.items():
            self.losses.setdefault(t, []).append(v)

    def line(self, step: int) -> str:
        eta = self.train_s / max(step - self.start, 1) * (self.total - step)
        loss = " ".join(f"{t} {np.mean(v):.3f}" for t, v in self.losses.items())
        self.losses = {}
        return (f"[raymtl] step {step}/{self.total} | {self.rows / max(self.train_s, 1e-9):.1f} ex/s | "
                f"{self.tokens / max(self.train_s, 1e-9):.0f} tok/s | eta {eta / 60:.1f} min | loss {loss}")

    def report(self) -> dict[str, float]:
        """Throughput since the last report (then reset), start-up steps left out."""
        w = self.window if self.window["steps"] else self.startup
        s = max(w["s"], 1e-9)
        out = {"examples_per_s": w["rows"] / s, "tokens_per_s": w["tokens"] / s,
               "s_per_step": s / max(w["steps"], 1), "data_wait_fraction": w["data_s"] / s,
               "padding_fraction": 1 - self.tokens / max(self.padded, 1),
               "worker_niceness": os.nice(0)}      # scale.worker_niceness, as the OS applied it
        self.window = self._empty()
        return out


def peak_rss_mb(device) -> float:
    """Peak resident (host) memory of the largest worker so far, in MiB (collective: every
    rank; the tensor lives on the engine's device so NCCL can reduce it)."""

    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0], device=device)  # KiB->MiB
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return float(peak)


def start_metrics(checkpoint_dir: Path | None) -> dict[str, float]:
    """The ``*_step0`` metrics of a resumed run, from its checkpoint's ``metrics.json``."""
    f = checkpoint_dir / "metrics.json" if checkpoint_dir else None
    if not f or not f.is_file():
        return {}
    return {k: v for k, v in json.loads(f.read_text()).items() if k.endswith("_step0")}


HISTORY = "metrics_history.json"


def start_history(checkpoint_dir: Path | None) -> list[dict]:
    """Every validation report of a resumed run so far, from its checkpoint's history (Ray
    keeps only ``keep_checkpoints`` of the checkpoints; each one carries the whole curve)."""
    f = checkpoint_dir / HISTORY if checkpoint_dir else None
    return json.loads(f.read_text()) if f and f.is_file() else []


def random_state(rng: random.Random, device, world: int) -> list[dict]:
    """Collective: the random state a resumed run needs to go on as if never stopped, one per
    rank (their batches differ in shape, so dropout draws differ): the task sampler's and
    torch's (dropout, MLM masks, SMART noise), on the CPU and on the worker's GPU."""
    state = {"sampler": rng.getstate(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    states = [state] * world
    if world > 1:
        dist.all_gather_object(states, state)
    return states


def set_random_state(states: list[dict], rank: int, rng: random.Random, device) -> None:
    """This rank's state of ``random_state`` (the last one where the run had fewer workers)."""
    state = states[min(rank, len(states) - 1)]
    rng.setstate(state["sampler"])
    torch.set_rng_state(state["torch"].cpu())             # (both setters take CPU byte tensors)
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def stalled(history: list[dict], score: str, patience: int) -> bool:
    """True when the last ``patience`` validations in ``history`` all scored below the best
    before them (early stopping; ``patience`` 0 never stops)."""
    if patience <= 0 or len(history) <= patience:
        return False
    best_before = max(h[score] for h in history[:-patience])
    return all(h[score] <= best_before for h in history[-patience:])


def backward(engine, model, losses: dict[str, torch.Tensor], step: int, shared: list, others: list,
             fuse=None, periodic: PeriodicFusion | None = None) -> dict[str, float]:
    """One step's backward through the engine: the weighted loss sum, or with a fusion method
    its fused gradient of the ``shared`` parameters (each task's own parameters in ``others``
    take their plain gradient). Returns the fusion's diagnostics (gradient cosines, weights)."""
    diag: dict[str, float] = {}
    if fuse is None:
        engine.backward(sum(model.weighting(losses, step).values()))
        return diag
    # fixed task weights scale the method's shares; learned weightings weight its input
    prefs = model.weighting.w if isinstance(model.weighting, Fixed) else None
    fused_in = losses if prefs is not None else model.weighting(losses, step)
    if periodic is not None:
        engine.backward(periodic.loss(fused_in, shared, step, diag, prefs, others=others))
    else:
        engine.backward(fused_surrogate(fused_in, shared, others, fuse, diag, prefs))
    return diag


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    from ray.train import Checkpoint
    from transformers import AutoTokenizer

    # 1. stage, config, seeds, threads ---------------------------------------------------
    stage = config["stage"].from_loop_config(config)
    cfg = stage.cfg
    configure_ray_data(cfg.run.verbose)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    run_dir = config.get("run_dir", "")
    _log_file[:] = [Path(run_dir) / TRAIN_LOG] if rank == 0 and run_dir and "://" not in run_dir else []
    if _log_file:
        _log_file[0].parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, math.ceil(cfg.scale.cpus_per_worker)))   # 1.75 CPUs -> 2 threads
    torch.manual_seed(cfg.train.seed)
    sampler, rng = get_sampler(cfg.train.sampling, cfg.train.sampling_temperature), random.Random(cfg.train.seed)

    # A fresh run's data streams start now, pulled ahead by threads of their own: their start-up
    # (a Ray Data execution per stream) overlaps building the model. A resumed run's streams
    # continue from its step, known once the checkpoint is loaded (section 4).
    # (Train V2 deprecates resume_from_checkpoint: another run's checkpoint comes in the config)
    checkpoint = ray.train.get_checkpoint() or (Checkpoint.from_directory(config["start_from"])
                                                if config.get("start_from") else None)
    streams = None if checkpoint else prefetched(stage.streams(rank, cfg.train.seed + rank))

    # 2. model and DeepSpeed engine ------------------------------------------------------
    model = stage.build_model()          # learnable loss weights train inside the engine too
    weighting = getattr(model, "weighting", None)
    names = list(stage.sizes)
    shared = [p for n, p in model.named_parameters() if n.startswith("encoder.") and p.requires_grad]
    others = [p for n, p in model.named_parameters() if not n.startswith("encoder.") and p.requires_grad]
    fuse = make_fusion(cfg.train.fusion, len(names), cfg.train.cagrad_c) if cfg.train.per_task_gradients() else None
    periodic = (PeriodicFusion(fuse, cfg.train.fusion_every, getattr(model, "own_parameters", dict)(),
                               weigh_owners=cfg.train.weigh_own_params)
                if fuse and cfg.train.fusion_every > 1 else None)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source(cfg.model.init_from or cfg.model.encoder))
    engine = eng.initialize(model, cfg, constant_lr=stage.constant_lr)
    device = engine.device
    if rank == 0:
        precision, why = engine.raymtl_precision
        say(f"[raymtl] training on {world} worker(s), {device.type}, precision {precision} ({why})")
    # With per-stream gradients the loop calls torch.autograd.grad itself, which DeepSpeed's
    # output hooks (engine.__call__) refuse; the plain module forward is equivalent for
    # ZeRO 0-2 (the only stages fusion, SAM and SMART allow), and engine.backward still does the rest.
    forward = engine.module if fuse is not None or cfg.train.sam_rho > 0 or cfg.train.smart_weight > 0 else engine
    sam = (SAM((p for n, p in engine.module.named_parameters() if not n.startswith("weighting.")),
               cfg.train.sam_rho) if cfg.train.sam_rho > 0 else None)
    task_best = TaskBest(model) if cfg.train.keep_task_best and hasattr(model, "own_named_parameters") else None

    # 3. resume from the last checkpoint of this run, if any -----------------------------
    step, initial, history, last, client = 0, {}, [], {}, {}
    drawn = {n: 0 for n in stage.sizes}    # batches the loop has taken from each stream
    if checkpoint:
        with checkpoint.as_directory() as d:
            client = eng.load_checkpoint(engine, Path(d), cfg.train.steps)
            step = client["step"]
            if "stream_batches" in client:   # where the streams and the random state were
                drawn.update(client["stream_batches"])
                set_random_state(client["random_state"], rank, rng, device)
            if periodic is not None and "periodic_fusion" in client:
                periodic.load_state_dict(client["periodic_fusion"])
            if hasattr(weighting, "load_client_state") and "weighting" in client:
                weighting.load_client_state(client["weighting"])
            if task_best is not None and "task_best" in client:
                task_best.load_state_dict(client["task_best"])
            initial, history = start_metrics(Path(d)), start_history(Path(d))
            last = json.loads((Path(d) / "metrics.json").read_text()) if (Path(d) / "metrics.json").is_file() else {}
        if rank == 0:
            say(f"[raymtl] resumed from checkpoint at step {step}")
    elif stage.validate_at_start:
        initial = {f"{k}_step0": v for k, v in stage.validate(engine.module, rank, world).items()}
        if rank == 0:
            say("[raymtl] before training: " + " ".join(f"{k}={v:.4f}" for k, v in initial.items()))
    exact = "stream_batches" in client   # resumed as if never stopped (the same batches, dropout, sampling)
    if not exact:                        # (a checkpoint of before raymtl saved where its streams were: fresh ones)
        rng.seed(cfg.train.seed + step)
    start_step, loss_sum, loss_n, diag_sum, stream_sum = step, 0.0, 0, {}, {}

    def report_checkpoint(metrics: dict, name: str) -> None:
        """Collective: checkpoint the engine, the history so far and a model card; report it to
        Ray Train under ``name``."""
        with tempfile.TemporaryDirectory() as tmp:
            client = {"periodic_fusion": periodic.state_dict()} if periodic else {}
            if hasattr(weighting, "client_state"):           # DWA's loss history
                client["weighting"] = weighting.client_state()
            if task_best is not None:                        # each task's best own parts so far
                client["task_best"] = task_best.state_dict()
            client["stream_batches"], client["random_state"] = dict(drawn), random_state(rng, device, world)
            eng.save_checkpoint(engine, Path(tmp), step, rank, tokenizer, config["cfg"], metrics, client,
                                override=task_best.export() if task_best is not None else None)
            if rank == 0:
                (Path(tmp) / HISTORY).write_text(json.dumps(history))
                (Path(tmp) / "README.md").write_text(model_card(
                    config["cfg"], metrics, getattr(engine.module, "modes", None), config.get("command", "")))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name=name)

    # 4. data: one endless stream of padded batches per name ----------------------------
    if streams is None:                  # resumed: each stream continues past the batches trained on
        streams = prefetched(stage.streams(rank, cfg.train.seed + rank, drawn) if exact
                             else stage.streams(rank, cfg.train.seed + rank + step))
    progress = Progress(cfg.train.steps, step, world)
    run_log = RunLog(config.get("run_dir"), rank, cfg.run.mlflow, config.get("mlflow_run", ""))   # rank 0

    # 5. train --------------------------------------------------------------------------
    engine.train()
    while step < cfg.train.steps:
        t0 = time.perf_counter()
        chosen = sampler(stage.sizes, step, cfg.train.steps, rng)
        window, seen, data_s = {t: 0.0 for t in chosen}, [], 0.0
        for _ in range(cfg.train.grad_accum):
            batches = {}
            for t in chosen:
                t_data = time.perf_counter()
                batches[t] = next(streams[t])            # waits for the data stream, if at all
                drawn[t] += 1
                data_s += time.perf_counter() - t_data
                batches[t] = to_device(batches[t], device)
                seen.append(batches[t])
            if sam is not None:                          # to w + e, the gradient is taken there
                sam_norm = sam.ascend(sum(stage.loss(forward, t, b, step) for t, b in batches.items()))
            losses = {t: stage.loss(forward, t, b, step) for t, b in batches.items()}
            diag = backward(engine, model, losses, step, shared, others, fuse, periodic)
            if sam is not None:                          # back to w before the optimizer steps
                sam.restore()
                diag["sam_grad_norm"] = sam_norm
            for k, v in diag.items():                    # (sum, count): periodic fusion measures
                diag_sum[k] = (diag_sum.get(k, (0.0, 0))[0] + v, diag_sum.get(k, (0.0, 0))[1] + 1)
            engine.step()
            for t, v in losses.items():
                window[t] += v.item() / cfg.train.grad_accum
        step += 1
        loss_sum, loss_n = loss_sum + sum(window.values()), loss_n + 1
        for t, v in window.items():                      # (sum, count): sampling may skip a stream
            stream_sum[t] = (stream_sum.get(t, (0.0, 0))[0] + v, stream_sum.get(t, (0.0, 0))[1] + 1)
        progress.update(time.perf_counter() - t0, seen, window, data_s)
        losses_now = {f"loss_{t}": v for t, v in window.items()}
        run_log.scalars(step, losses_now, mlflow=False)
        if rank == 0:
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                say(progress.line(step))
                run_log.scalars(step, {"lr": engine.get_lr()[0]})
                run_log.scalars(step, losses_now, tensorboard=False)     # MLflow: once per log interval

        # 6. validate, checkpoint, report (every rank: report is a barrier) ------------
        if step % cfg.train.eval_every == 0 or step == cfg.train.steps:
            scores, kept = stage.validate(engine.module, rank, world), ""
            if task_best is not None:                        # the checkpoint's model: own parts at their best
                scores, kept = task_best.validate(engine, stage, scores, step, rank, world)
            metrics = {**scores, **initial, "train_loss": loss_sum / max(loss_n, 1), "step": step,
                       "start_step": start_step, "lr": engine.get_lr()[0],
                       **{f"train_loss_{t}": total / n for t, (total, n) in stream_sum.items()},
                       **progress.report(), **{k: total / n for k, (total, n) in diag_sum.items()},
                       **stage.diagnostics(),
                       "peak_rss_mb": peak_rss_mb(device)}
            loss_sum, loss_n, diag_sum, stream_sum = 0.0, 0, {}, {}
            if rank == 0:
                say("[raymtl] validation step %d: %s" % (step, " ".join(
                    f"{k}={v:.4f}" for k, v in scores.items() if not k.startswith(("live_", "kept_step_")))
                    + (f" (kept: {kept})" if kept else "")))
            history = [h for h in history if h["step"] < step] + [metrics]   # a repeated step replaces
            run_log.scalars(step, metrics)
            run_log.flush()
            report_checkpoint(metrics, f"checkpoint_{step:06d}")
            if stalled(history, stage.score, cfg.train.early_stop):
                if rank == 0:
                    say(f"[raymtl] early stop at step {step}: {stage.score} has not improved for "
                        f"{cfg.train.early_stop} validations (best checkpoint kept)")
                break
    if step == start_step and last:
        # Resumed after its last step (a driver that died after the run's last report, e.g. a
        # Tune trial restored as unfinished): nothing to train; report the last checkpoint's
        # metrics again, so the caller (and Tune's metric check) gets the run's result.
        if rank == 0:
            say(f"[raymtl] nothing left to train at step {step} of {cfg.train.steps}; "
                "reporting the last checkpoint's metrics")
        ray.train.report(last)
    for stream in streams.values():
        stream.close()
    run_log.close()
