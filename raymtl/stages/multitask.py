"""The multi-task fine-tuning stage: what the shared loop (``raymtl.train.loop``) needs from it.

One stream of padded batches per task (``train_<task>`` Ray Data shards), the task table's
loss per head kind, the validation splits scored per task plus ``overall``.
"""
from __future__ import annotations

import numpy as np
import torch.distributed as dist

from raymtl.analysis.evaluation import format_table, predict_batches
from raymtl.analysis.metrics import overall, task_metric
from raymtl.config import MTLConfig
from raymtl.data.multitask import collate, tokenized_datasets
from raymtl.data.streams import cycle_batches
from raymtl.methods.smart import SMART
from raymtl.methods.weighting import make_weighting
from raymtl.models.encoder import tokenizer_source
from raymtl.models.heads import head_kind
from raymtl.models.multitask import MultiTaskModel
from raymtl.models.prefixes import text_prefix
from raymtl.objectives.multitask import get_distill_schedule, task_loss
from raymtl.stages.base import Stage
from raymtl.stages.distill import attach_teacher_outputs
from raymtl.tasks import TASKS


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


def prepare_data(cfg: MTLConfig, verbose: bool = True) -> tuple[dict, dict[str, int]]:
    """Every task through the prepare pass (``raymtl.data.multitask.prepare_task``: read,
    checked, split and tokenized in Ray Data, cached); teacher outputs attached. Returns the
    datasets (training streamed from the shards) and the training rows per stream (a task,
    or ``<task>_related`` for its related rows)."""
    modes = {t: (cfg.model.mode_of(t) if TASKS[t].is_pair else None) for t in cfg.data.tasks}
    prefixes = {t: text_prefix(t) for t in cfg.data.tasks} if cfg.model.task_prefix == "text" else {}
    datasets, sizes = tokenized_datasets(cfg.data, tokenizer_source(cfg.model.init_from or cfg.model.encoder),
                                         modes, prefixes, seed=cfg.train.seed, verbose=verbose)
    if cfg.distill.teacher_outputs:
        datasets = attach_teacher_outputs(datasets, cfg)
    return datasets, sizes


class MTLStage(Stage):
    """Multi-task fine-tuning of one encoder with a head per task (``jobs/mtl.py``); also
    teachers (``jobs/teacher.py``: one task plus a ``<task>_related`` stream) and
    distillation (batches carrying ``teacher`` outputs)."""
    name = "mtl"
    config_class = MTLConfig
    score = "overall"

    def __init__(self, cfg: MTLConfig, sizes: dict[str, int]):
        super().__init__(cfg, sizes)
        self.tasks = list(cfg.data.tasks)
        # the head kind per task, as the data was tokenized for it (build_model checks the model agrees)
        self.kinds = {t: head_kind(TASKS[t], cfg.model.mode_of(t) if TASKS[t].is_pair else None) for t in self.tasks}
        self.smart: SMART | None = None          # build_model hooks it into the model's embeddings

    @classmethod
    def prepare(cls, cfg: MTLConfig, verbose: bool = True) -> tuple[dict, dict[str, int]]:
        return prepare_data(cfg, verbose)

    @classmethod
    def print_summary(cls, summary) -> None:
        if summary.best_metrics:
            scores = {k[4:]: v for k, v in summary.best_metrics.items() if k.startswith("val_")}
            if {"sst", "quora", "sts"} <= set(scores):      # (a task or two alone: no comparable overall)
                scores["overall"] = summary.best_metrics["overall"]
            print(f"\n[raymtl] best checkpoint (step {summary.best_metrics.get('step')}) validation scores:")
            print(format_table(scores))
        super().print_summary(summary)

    def build_model(self) -> MultiTaskModel:
        cfg = self.cfg
        model = MultiTaskModel.from_config(cfg.model, self.tasks, seed=cfg.train.seed)
        differ = {t: (h.kind, self.kinds[t]) for t, h in model.heads.items() if h.kind != self.kinds[t]}
        if differ:
            raise ValueError(f"init_from {cfg.model.init_from}: its heads {', '.join(f'{t}={m}' for t, (m, _) in differ.items())} "
                             f"differ from the pair_mode this run tokenizes for ({', '.join(f'{t}={k}' for t, (_, k) in differ.items())}); "
                             "set pair_mode to the checkpoint's")
        names = list(self.sizes)
        model.weighting = make_weighting(cfg.train.weighting, names,
                                         {n: cfg.train.task_weights.get(stream_task(n), 1.0) for n in names},
                                         cfg.train.dwa_window, cfg.train.dwa_temperature)
        self.smart = (SMART(model.encoder.get_input_embeddings(), cfg.train.smart_weight)
                      if cfg.train.smart_weight > 0 else None)
        return model

    def streams(self, rank: int, seed: int, skip: dict[str, int] | None = None) -> dict:
        import ray.train
        mb, skip = self.cfg.micro_batch_size(), skip or {}
        return {n: cycle_batches(ray.train.get_dataset_shard(f"train_{n}"), mb, seed, self.cfg.data.bucket_batches,
                                 skip=skip.get(n, 0)) for n in self.sizes}

    def loss(self, forward, stream: str, batch: dict, step: int):
        task, d = stream_task(stream), self.cfg.distill
        alpha = get_distill_schedule(d.distill_schedule)(d.distill_alpha, step, self.cfg.train.steps)
        output = forward(task, batch).float()
        loss = task_loss(self.kinds[task], output, batch, alpha, d.distill_temperature)
        if self.smart is None:
            return loss
        return loss + self.smart.regulariser(lambda: forward(task, batch).float(), output, self.kinds[task])

    def diagnostics(self) -> dict[str, float]:
        """``smart_term``: SMART's weighted regulariser, mean per task batch."""
        return {"smart_term": self.smart.take_mean()} if self.smart is not None and self.smart.count else {}

    def validate(self, module, rank: int, world: int, only: list[str] | None = None,
                 known: dict[str, float] | None = None) -> dict[str, float]:
        """``only``: score these tasks alone and take the others' scores from ``known`` (an
        earlier result of this method) into ``overall``."""
        scores = validate(module, only or self.tasks, rank, world, shard_eval=self.cfg.scale.zero_stage < 3)
        scores = {**{t: known[f"val_{t}"] for t in self.tasks if t not in scores}, **scores} if only else scores
        return {**{f"val_{t}": scores[t] for t in self.tasks}, "overall": overall(scores)}
