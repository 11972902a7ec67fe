"""Task-relationship map (``raymtl relations``): how training on one task moves another.

For every ordered pair (A, B) of the config's tasks, two measurements on one model:

* inter-task affinity (Fifty et al. 2021, "Efficiently Identifying Task Groupings in
  Multi-Task Learning"): ``affinity[A][B] = 1 - L_B(after k steps on A alone) / L_B(before)``,
  with L_B the loss of B on a fixed validation subset. Positive: training on A lowers B's loss;
  the diagonal is A's own gain. Fifty et al. use a one-step lookahead averaged over training;
  here it is k steps (``lookahead_steps``) from one point, the end of the joint phase below.
* gradient cosine: the mean, over the joint phase's steps, of cos(g_A, g_B) between the two
  tasks' gradients of the shared encoder parameters (the loop's diagnostics:
  ``raymtl.methods.fusion.fused_surrogate``). Symmetric; the diagonal is 1.

Procedure: runs of this stage on the shared loop (``raymtl.train.loop``, Ray Train and
DeepSpeed, one worker), driven by ``raymtl.analysis.relations.measure``:

1. The model the config describes (``encoder``, ``init_from`` a raymtl checkpoint, or with
   ``--smoke`` the tiny random BERT), seeded by ``seed``.
2. Fixed subsets per task: the first ``probe_rows`` training rows and ``probe_val_rows``
   validation rows, split exactly as training carves them (``load_splits``), batches of
   ``batch_size`` rows in a fixed order (``probe_batches``).
3. Joint run: ``joint_steps`` steps on all tasks at once (summed, unweighted losses, the loop's
   gradient diagnostics on), with the training optimizer (AdamW at the constant peak ``lr`` /
   ``head_lr``, ``weight_decay``, ``grad_clip``). It trains fresh heads so that a task's loss
   means something, and its report carries the mean gradient cosines and every task's
   validation loss.
4. For each A, a run that starts from the joint run's checkpoint (weights, optimizer state and
   step): ``lookahead_steps`` steps on A alone (``lookahead_task``; dropout seeded the same for
   every A), then every task's validation loss.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from raymtl.config import SECTIONS, ModelConfig, MTLConfig, RunSettings, _choice, _help, _positive, smoke
from raymtl.data.multitask import batch_from_rows, load_splits
from raymtl.models.device import to_device
from raymtl.models.encoder import tokenizer_source
from raymtl.models.prefixes import text_prefix
from raymtl.objectives.multitask import task_loss
from raymtl.stages.multitask import MTLStage
from raymtl.tasks import TASKS


@dataclass
class RelationsConfig:
    joint_steps: int = _help("steps on all tasks jointly before the affinity lookahead; the "
                             "gradient cosines are averaged over them", default=20)
    lookahead_steps: int = _help("steps on one task alone before every task's validation loss "
                                 "is measured again (affinity)", default=5)
    probe_rows: int = _help("training rows per task used (the first of the seeded split)", default=320)
    probe_val_rows: int = _help("validation rows per task whose loss is measured", default=128)
    lookahead_task: str = _help("set by the driver for a lookahead run: the one task it trains "
                                "(empty: the joint run, every task)", default="")

    def __post_init__(self):
        for name in ("joint_steps", "lookahead_steps", "probe_rows", "probe_val_rows"):
            _positive(name, getattr(self, name))
        if self.lookahead_task:
            _choice("lookahead_task", self.lookahead_task, TASKS)


@dataclass
class RelationsJobConfig(MTLConfig):
    SECTIONS: ClassVar[dict[str, type]] = {**SECTIONS, "relations": RelationsConfig}
    relations: RelationsConfig = _help("the task-relationship map's section", default_factory=RelationsConfig)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(pals=False, task_layers={}))  # measured so
    run: RunSettings = field(default_factory=lambda: RunSettings(name="relations"))

    def __post_init__(self):
        super().__post_init__()
        if len(self.data.tasks) < 2:
            raise ValueError(f"tasks={list(self.data.tasks)}: a relationship map needs at least two tasks")
        if self.relations.probe_rows < self.train.batch_size:
            raise ValueError(f"probe_rows={self.relations.probe_rows} must be >= batch_size="
                             f"{self.train.batch_size} (one training batch per task)")
        if self.scale.num_workers > 1:
            raise ValueError(f"num_workers={self.scale.num_workers}: the relations map trains on one worker")
        if self.relations.lookahead_task and self.relations.lookahead_task not in self.data.tasks:
            raise ValueError(f"lookahead_task={self.relations.lookahead_task!r} is not in tasks={list(self.data.tasks)}")
        if self.model.train_only_adapters:
            raise ValueError("train_only_adapters=True freezes the shared encoder, whose gradients "
                             "the gradient cosines compare; relations needs it trainable")


def relations_smoke(cfg: RelationsJobConfig | None = None) -> RelationsJobConfig:
    """The tiny random BERT on a few dozen rows per task: seconds."""
    return smoke(cfg or RelationsJobConfig()).replace(joint_steps=4, lookahead_steps=2, probe_rows=32,
                                                      probe_val_rows=16, num_workers=1)


# ---------------------------------------------------------------- data and losses
def probe_batches(cfg: RelationsJobConfig) -> tuple[dict[str, list], dict[str, list]]:
    """Fixed (train, validation) batches per task; train batches have exactly batch_size rows."""
    from transformers import AutoTokenizer
    r, bs, max_len = cfg.relations, cfg.train.batch_size, cfg.data.max_length
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source(cfg.model.init_from or cfg.model.encoder))
    splits, _ = load_splits(dataclasses.replace(cfg.data, related_sets=()))
    train, val = {}, {}
    for t, (rows, held) in splits.items():
        mode = cfg.model.mode_of(t) if TASKS[t].is_pair else None
        prefix = text_prefix(t) if cfg.model.task_prefix == "text" else ""
        rows = rows[:r.probe_rows - r.probe_rows % bs]
        if not rows:
            raise ValueError(f"task {t}: fewer than batch_size={bs} training rows")
        held = held[:r.probe_val_rows]
        train[t] = [batch_from_rows(tokenizer, rows[i:i + bs], mode, max_len, prefix) for i in range(0, len(rows), bs)]
        val[t] = [batch_from_rows(tokenizer, held[i:i + bs], mode, max_len, prefix) for i in range(0, len(held), bs)]
    return train, val


@torch.no_grad()
def validation_losses(model, val: dict[str, list]) -> dict[str, float]:
    """Row-weighted mean fp32 loss per task over its fixed validation batches (no dropout)."""
    was = model.training
    model.eval()
    out = {}
    for t, batches in val.items():
        total = 0.0
        for b in batches:
            b = to_device(b, model)
            total += task_loss(model.heads[t].kind, model(t, b).float(), b).item() * len(b["label"])
        out[t] = total / sum(len(b["label"]) for b in batches)
    model.train(was)
    return out


class RelationsStage(MTLStage):
    """The multi-task model and losses on fixed probe batches, at a constant learning rate;
    the joint run trains every task, a lookahead run only ``lookahead_task``; validation is
    every task's loss on its fixed validation batches (``val_loss_<task>``)."""
    name = "relations"
    config_class = RelationsJobConfig
    score = "step"                      # the runs' output is their last checkpoint
    constant_lr = True

    @classmethod
    def prepare(cls, cfg: RelationsJobConfig, verbose: bool = True) -> tuple[dict, dict[str, int]]:
        r = cfg.relations
        trained = [r.lookahead_task] if r.lookahead_task else list(cfg.data.tasks)
        return {}, {t: r.probe_rows for t in trained}      # the probe batches are built in the worker

    @classmethod
    def print_summary(cls, summary) -> None:         # validation losses, not the multi-task scores
        print(f"[raymtl] relations run: {summary.run_dir}", flush=True)

    def streams(self, rank: int, seed: int, skip: dict[str, int] | None = None) -> dict:
        train, self._val = probe_batches(self.cfg)
        start = self.cfg.relations.joint_steps if self.cfg.relations.lookahead_task else 0
        at = skip or {}                  # a checkpoint's own count (the joint run's for a lookahead) or the phase's
        return {t: itertools.islice(itertools.cycle(train[t]), at.get(t, start) % len(train[t]), None)
                for t in self.sizes}

    def validate(self, module, rank: int, world: int) -> dict[str, float]:
        if not hasattr(self, "_val"):
            self._val = probe_batches(self.cfg)[1]
        return {f"val_loss_{t}": v for t, v in validation_losses(module, self._val).items()}


