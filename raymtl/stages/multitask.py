"""The multi-task fine-tuning stage: what the shared loop (``raymtl.train.loop``) needs from it.

One stream of padded batches per task (``train_<task>`` Ray Data shards), the task table's
loss per head kind, the validation splits scored per task plus ``overall``.
"""
from __future__ import annotations

import numpy as np
import torch.distributed as dist

from raymtl.analysis.evaluation import predict_batches
from raymtl.analysis.metrics import overall, task_metric
from raymtl.config import MTLConfig
from raymtl.data.multitask import collate
from raymtl.data.streams import cycle_batches
from raymtl.methods.weighting import make_weighting
from raymtl.models.multitask import MultiTaskModel
from raymtl.objectives.multitask import DISTILL_SCHEDULES, task_loss


def validate(module, tasks, rank: int, world: int, shard_eval: bool) -> dict[str, float]:
    """Scores on the validation splits. Batches are divided among ranks and gathered,
    except under ZeRO-3, where every rank must run every forward (parameters are gathered
    collectively) and so each evaluates all batches."""
    import ray.train
    scores = {}
    for t in tasks:
        batches = ray.train.get_dataset_shard(f"val_{t}").iter_batches(batch_size=64, batch_format="numpy")
        mine = (collate(b) for i, b in enumerate(batches) if not shard_eval or i % world == rank)   # as in training
        preds, labels, _ = predict_batches(module, t, mine)
        if shard_eval and world > 1:
            parts = [None] * world
            dist.all_gather_object(parts, (preds, labels))
            preds = np.concatenate([p for p, _ in parts])
            labels = np.concatenate([lab for _, lab in parts])
        scores[t] = task_metric(t, preds, labels)
    return scores


def stream_task(stream: str) -> str:
    """The task (head) a training stream trains: ``sst`` and ``sst_related`` -> ``sst``."""
    return stream.removesuffix("_related")


class MTLStage:
    """Multi-task fine-tuning of one encoder with a head per task (``jobs/mtl.py``); also
    teachers (``jobs/teacher.py``: one task plus a ``<task>_related`` stream) and
    distillation (batches carrying ``teacher`` outputs)."""
    score = "overall"
    validate_at_start = False

    def __init__(self, config: dict):
        self.cfg = MTLConfig.from_dict(config["cfg"])
        self.tasks = list(self.cfg.data.tasks)
        self.sizes: dict[str, int] = config["train_sizes"]

    def build_model(self) -> MultiTaskModel:
        cfg = self.cfg
        model = MultiTaskModel.from_config(cfg.model, self.tasks, seed=cfg.train.seed)
        names = list(self.sizes)
        model.weighting = make_weighting(cfg.train.weighting, names,
                                         {n: cfg.train.task_weights.get(stream_task(n), 1.0) for n in names})
        self.heads = model.heads
        return model

    def streams(self, rank: int, seed: int) -> dict:
        import ray.train
        mb = self.cfg.micro_batch_size()
        return {n: cycle_batches(ray.train.get_dataset_shard(f"train_{n}"), mb, seed, self.cfg.data.bucket_batches)
                for n in self.sizes}

    def loss(self, forward, stream: str, batch: dict, step: int):
        task, d = stream_task(stream), self.cfg.distill
        alpha = DISTILL_SCHEDULES[d.distill_schedule](d.distill_alpha, step, self.cfg.train.steps)
        return task_loss(self.heads[task].kind, forward(task, batch), batch, alpha, d.distill_temperature)

    def validate(self, module, rank: int, world: int) -> dict[str, float]:
        scores = validate(module, self.tasks, rank, world, shard_eval=self.cfg.scale.zero_stage < 3)
        return {**{f"val_{t}": v for t, v in scores.items()}, "overall": overall(scores)}
