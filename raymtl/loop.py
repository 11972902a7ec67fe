"""The one per-worker training loop, used by every stage.

``train_loop_per_worker(config)`` runs inside each Ray Train worker. It reads everything
from its ``config`` argument (never from module globals): ``config["cfg"]`` is the nested
``MTLConfig`` dict.
"""
from __future__ import annotations

import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from raymtl.config import MTLConfig
from raymtl.data import collate
from raymtl.evaluation import predict_batches
from raymtl.fusion import fused_surrogate, make_fusion
from raymtl.metrics import overall, task_metric
from raymtl.model import MultiTaskModel, tokenizer_source
from raymtl.objectives import LOSSES
from raymtl.sampling import get_sampler
from raymtl.weighting import make_weighting


def say(msg: str) -> None:
    """Print once. (Train V2 patches ``print`` and tees it when stdout is wrapped, which
    doubled every progress line on the driver.)"""
    print(msg, file=sys.__stdout__, flush=True)


def cycle_batches(shard, batch_size: int, seed: int, bucket: int):
    """Endless stream of padded batches from a Ray Data shard, reshuffled every epoch.

    Length bucketing: a window of ``bucket`` batches is sorted by row length and cut into
    batches, which are then yielded in random order, so a batch pads to a similar length.
    """
    rng = np.random.default_rng(seed)
    epoch = 0
    while True:
        yielded = False
        for window in shard.iter_batches(batch_size=batch_size * bucket, batch_format="numpy",
                                         local_shuffle_buffer_size=4 * batch_size * bucket,
                                         local_shuffle_seed=seed + epoch):
            n = len(window["label"]) // batch_size * batch_size   # drop the ragged tail
            lengths = np.array([len(a) + len(b) for a, b in zip(window["ids_a"], window["ids_b"])])
            order = np.argsort(lengths[:n] + rng.random(n), kind="stable") if bucket > 1 else np.arange(n)
            chunks = [order[i:i + batch_size] for i in range(0, n, batch_size)]
            for j in rng.permutation(len(chunks)):
                yielded = True
                yield collate({k: v[chunks[j]] for k, v in window.items()})
        if not yielded:
            raise ValueError(f"a training shard has fewer rows than one batch ({batch_size}); "
                             "lower batch_size or num_workers")
        epoch += 1


def validate(module, tasks, rank: int, world: int, shard_eval: bool) -> dict[str, float]:
    """Scores on the validation splits. Batches are divided among ranks and gathered,
    except under ZeRO-3, where every rank must run every forward (parameters are gathered
    collectively) and so each evaluates all batches."""
    import ray.train
    scores = {}
    for t in tasks:
        batches = ray.train.get_dataset_shard(f"val_{t}").iter_torch_batches(batch_size=64, collate_fn=collate)
        mine = (b for i, b in enumerate(batches) if not shard_eval or i % world == rank)
        preds, labels, _ = predict_batches(module, t, mine)
        if shard_eval and world > 1:
            parts = [None] * world
            dist.all_gather_object(parts, (preds, labels))
            preds = np.concatenate([p for p, _ in parts])
            labels = np.concatenate([lab for _, lab in parts])
        scores[t] = task_metric(t, preds, labels)
    return scores


class Progress:
    """Progress of one worker: step, examples/s, ETA, per-task losses (window means).

    Throughput counts training time only (validation and checkpointing excluded); rows and
    useful (non-padding) tokens are this worker's, scaled by the world size for the run.
    """

    def __init__(self, total: int, start: int, world: int):
        self.total, self.start, self.world = total, start, world
        self.train_s, self.rows, self.tokens, self.padded, self.losses = 0.0, 0, 0, 0, {}
        self.window = {"s": 0.0, "rows": 0, "tokens": 0, "steps": 0}

    def update(self, seconds: float, batches: list[dict], losses: dict[str, float]):
        rows = sum(len(b["label"]) for b in batches) * self.world
        tokens = sum(int(b["attention_mask"].sum()) + int(b.get("attention_mask_b", b["label"][:0]).sum())
                     for b in batches) * self.world
        self.padded += sum(b["input_ids"].numel() + (b["input_ids_b"].numel() if "input_ids_b" in b else 0)
                           for b in batches) * self.world
        self.train_s, self.rows, self.tokens = self.train_s + seconds, self.rows + rows, self.tokens + tokens
        for k, v in (("s", seconds), ("rows", rows), ("tokens", tokens), ("steps", 1)):
            self.window[k] += v
        for t, v in losses.items():
            self.losses.setdefault(t, []).append(v)

    def line(self, step: int) -> str:
        eta = self.train_s / max(step - self.start, 1) * (self.total - step)
        loss = " ".join(f"{t} {np.mean(v):.3f}" for t, v in self.losses.items())
        self.losses = {}
        return (f"[raymtl] step {step}/{self.total} | {self.rows / max(self.train_s, 1e-9):.1f} ex/s | "
                f"{self.tokens / max(self.train_s, 1e-9):.0f} tok/s | eta {eta / 60:.1f} min | loss {loss}")

    def report(self) -> dict[str, float]:
        """Throughput since the last report (then reset)."""
        w, s = self.window, max(self.window["s"], 1e-9)
        out = {"examples_per_s": w["rows"] / s, "tokens_per_s": w["tokens"] / s,
               "s_per_step": s / max(w["steps"], 1), "padding_fraction": 1 - self.tokens / max(self.padded, 1)}
        self.window = {"s": 0.0, "rows": 0, "tokens": 0, "steps": 0}
        return out


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    from ray.train import Checkpoint
    from transformers import AutoTokenizer

    from raymtl import engine as eng
    from raymtl.trainer import quiet_ray_data
    quiet_ray_data()

    # 1. config, seeds, threads --------------------------------------------------------
    cfg = MTLConfig.from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.scale.cpus_per_worker)))
    torch.manual_seed(cfg.train.seed)
    tasks = list(cfg.data.tasks)
    sizes = config["train_sizes"]
    sampler, rng = get_sampler(cfg.train.sampling), random.Random(cfg.train.seed)

    # 2. model and DeepSpeed engine ------------------------------------------------------
    model = MultiTaskModel.from_config(cfg.model, tasks, seed=cfg.train.seed)
    # learnable loss weights train with the heads, inside the DeepSpeed engine
    model.weighting = make_weighting(cfg.train.weighting, tasks, cfg.train.task_weights)
    shared = [p for n, p in model.named_parameters() if n.startswith("encoder.") and p.requires_grad]
    others = [p for n, p in model.named_parameters() if not n.startswith("encoder.") and p.requires_grad]
    fuse = make_fusion(cfg.train.fusion, len(tasks)) if cfg.train.per_task_gradients() else None
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source(cfg.model.init_from or cfg.model.encoder))
    engine = eng.initialize(model, cfg)
    device = engine.device
    # With per-task gradients the loop calls torch.autograd.grad itself, which DeepSpeed's
    # output hooks (engine.__call__) refuse; the plain module forward is equivalent for
    # ZeRO 0-2 (the only stages fusion allows), and engine.backward still does the rest.
    forward = engine.module if fuse is not None else engine

    # 3. resume from the last checkpoint of this run, if any -----------------------------
    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            step = eng.load_checkpoint(engine, Path(d), cfg.train.steps)
        if rank == 0:
            say(f"[raymtl] resumed from checkpoint at step {step}")
    rng.seed(cfg.train.seed + step)  # the sampler stream continues deterministically
    start_step, loss_sum, loss_n, diag_sum = step, 0.0, 0, {}

    # 4. data: one endless stream of padded batches per task ----------------------------
    mb = cfg.micro_batch_size()
    streams = {t: cycle_batches(ray.train.get_dataset_shard(f"train_{t}"), mb, cfg.train.seed + rank + step,
                                cfg.data.bucket_batches)
               for t in tasks}
    progress = Progress(cfg.train.steps, step, world)
    heads = model.heads

    # 5. train --------------------------------------------------------------------------
    engine.train()
    while step < cfg.train.steps:
        t0 = time.perf_counter()
        chosen = sampler(sizes, step, cfg.train.steps, rng)
        window, seen = {t: 0.0 for t in chosen}, []
        for _ in range(cfg.train.grad_accum):
            losses = {}
            for t in chosen:
                batch = {k: v.to(device) for k, v in next(streams[t]).items()}
                seen.append(batch)
                out = forward(t, batch)
                losses[t] = LOSSES[heads[t].kind](out, batch["label"])
            weighted = model.weighting(losses, step)
            if fuse is None:
                engine.backward(sum(weighted.values()))
            else:
                diag = {}
                engine.backward(fused_surrogate(weighted, shared, others, fuse, diag))
                for k, v in diag.items():
                    diag_sum[k] = diag_sum.get(k, 0.0) + v / cfg.train.grad_accum
            engine.step()
            for t, v in losses.items():
                window[t] += v.item() / cfg.train.grad_accum
        step += 1
        loss_sum, loss_n = loss_sum + sum(window.values()), loss_n + 1
        progress.update(time.perf_counter() - t0, seen, window)
        if rank == 0:
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                say(progress.line(step))

        # 6. validate, checkpoint, report (every rank: report is a barrier) ------------
        if step % cfg.train.eval_every == 0 or step == cfg.train.steps:
            scores = validate(engine.module, tasks, rank, world, shard_eval=cfg.scale.zero_stage < 3)
            metrics = {**{f"val_{t}": v for t, v in scores.items()}, "overall": overall(scores),
                       "train_loss": loss_sum / max(loss_n, 1), "step": step, "start_step": start_step,
                       "lr": engine.get_lr()[0],
                       **progress.report(), **{k: v / max(loss_n, 1) for k, v in diag_sum.items()}}
            loss_sum, loss_n, diag_sum = 0.0, 0, {}
            if rank == 0:
                say("[raymtl] validation step %d: %s" % (step, " ".join(
                    f"{k}={v:.4f}" for k, v in metrics.items() if k.startswith(("val_", "overall")))))
            with tempfile.TemporaryDirectory() as tmp:
                eng.save_checkpoint(engine, Path(tmp), step, rank, tokenizer, config["cfg"], metrics)
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
