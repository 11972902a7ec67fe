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

Procedure, in-process on the driver (no Ray: an analysis of a few hundred rows):

1. The model the config describes (``encoder``, ``init_from`` a raymtl checkpoint, or with
   ``--smoke`` the tiny random BERT), seeded by ``seed``.
2. Fixed subsets per task: the first ``probe_rows`` training rows and ``probe_val_rows``
   validation rows, split exactly as training carves them (``load_splits``), batches of
   ``batch_size`` rows in a fixed order.
3. Joint phase: ``joint_steps`` steps on all tasks at once (summed, unweighted losses), with the
   training optimizer (AdamW at the peak ``lr`` / ``head_lr``, ``weight_decay``, ``grad_clip``;
   no warm-up). It trains fresh heads so that a task's loss means something, and records the
   gradient cosines.
4. For each A: weights and optimizer state restored to the end of the joint phase,
   ``lookahead_steps`` steps on A alone (dropout seeded the same for every A), then every task's
   validation loss.

Writes ``relations.csv`` (one row per ordered pair), ``relations.json`` (matrices, losses,
settings) and ``relations.png`` (two heat maps) to ``OUTPUT/NAME`` (default ``runs/relations``).
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from raymtl.analysis.evaluation import row_batches
from raymtl.config import SECTIONS, ModelConfig, MTLConfig, RunSettings, _help, _positive, smoke
from raymtl.data.multitask import load_splits
from raymtl.methods.fusion import fused_surrogate, make_fusion
from raymtl.models.device import resolve_device, to_device
from raymtl.models.encoder import tokenizer_source
from raymtl.models.multitask import MultiTaskModel
from raymtl.objectives.multitask import task_loss
from raymtl.train.engine import param_groups


@dataclass
class RelationsConfig:
    joint_steps: int = _help("steps on all tasks jointly before the affinity lookahead; the "
                             "gradient cosines are averaged over them", default=20)
    lookahead_steps: int = _help("steps on one task alone before every task's validation loss "
                                 "is measured again (affinity)", default=5)
    probe_rows: int = _help("training rows per task used (the first of the seeded split)", default=320)
    probe_val_rows: int = _help("validation rows per task whose loss is measured", default=128)

    def __post_init__(self):
        for name in ("joint_steps", "lookahead_steps", "probe_rows", "probe_val_rows"):
            _positive(name, getattr(self, name))


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
        if self.model.train_only_adapters:
            raise ValueError("train_only_adapters=True freezes the shared encoder, whose gradients "
                             "the gradient cosines compare; relations needs it trainable")


def relations_smoke(cfg: RelationsJobConfig | None = None) -> RelationsJobConfig:
    """The tiny random BERT on a few dozen rows per task: seconds."""
    return smoke(cfg or RelationsJobConfig()).replace(joint_steps=4, lookahead_steps=2, probe_rows=32,
                                                      probe_val_rows=16)


# ---------------------------------------------------------------- data and losses
def probe_batches(model, tokenizer, cfg: RelationsJobConfig) -> tuple[dict[str, list], dict[str, list]]:
    """Fixed (train, validation) batches per task; train batches have exactly batch_size rows."""

    r, bs, max_len = cfg.relations, cfg.train.batch_size, cfg.data.max_length
    splits, _ = load_splits(dataclasses.replace(cfg.data, related_sets=()))
    train, val = {}, {}
    for t, (rows, held) in splits.items():
        rows = rows[:r.probe_rows - r.probe_rows % bs]
        if not rows:
            raise ValueError(f"task {t}: fewer than batch_size={bs} training rows")
        train[t] = list(row_batches(model, tokenizer, t, rows, max_len, bs))
        val[t] = list(row_batches(model, tokenizer, t, held[:r.probe_val_rows], max_len, bs))
    return train, val


def task_losses(model, batches: dict[str, dict]) -> dict[str, torch.Tensor]:
    """fp32 loss per task of one batch each, on the model's device."""
    out = {}
    for t, b in batches.items():
        b = to_device(b, model)
        out[t] = task_loss(model.heads[t].kind, model(t, b).float(), b)
    return out


@torch.no_grad()
def validation_losses(model, val: dict[str, list]) -> dict[str, float]:
    """Row-weighted mean loss per task over its fixed validation batches (no dropout)."""
    was = model.training
    model.eval()
    out = {}
    for t, batches in val.items():
        total = sum(task_losses(model, {t: b})[t].item() * len(b["label"]) for b in batches)
        out[t] = total / sum(len(b["label"]) for b in batches)
    model.train(was)
    return out


def optimizer(model, cfg: MTLConfig) -> torch.optim.Optimizer:
    """The training optimizer's settings (``raymtl.train.engine.param_groups``), at peak learning rates."""
    groups, lrs = param_groups(model, cfg)
    return torch.optim.AdamW([{**g, "lr": lr} for g, lr in zip(groups, lrs)], lr=cfg.train.lr)


def step(model, opt, losses: dict[str, torch.Tensor], shared, heads, grad_clip: float,
         diagnostics: dict | None = None) -> None:
    """One optimizer step on the summed losses; with ``diagnostics``, also the cosines between
    the tasks' gradients of ``shared`` (``fused_surrogate`` with plain sum: the same update)."""
    if diagnostics is None:
        sum(losses.values()).backward()
    else:
        fused_surrogate(losses, shared, heads, make_fusion("sum", len(losses)), diagnostics).backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


# ---------------------------------------------------------------- the measurement
def measure(cfg: RelationsJobConfig, say=print) -> dict:
    """Affinity and gradient-cosine matrices (``{A: {B: value}}``) and what they were measured on."""
    from transformers import AutoTokenizer

    tasks, r, seed = list(cfg.data.tasks), cfg.relations, cfg.train.seed
    torch.manual_seed(seed)
    model = MultiTaskModel.from_config(cfg.model, tasks, seed=seed)
    model.to(resolve_device("cuda" if cfg.scale.use_gpu else "cpu"))   # in-process: one device
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source(cfg.model.init_from or cfg.model.encoder))
    train, val = probe_batches(model, tokenizer, cfg)
    shared = [p for n, p in model.named_parameters() if n.startswith("encoder.") and p.requires_grad]
    heads = [p for n, p in model.named_parameters() if not n.startswith("encoder.") and p.requires_grad]
    opt = optimizer(model, cfg)
    model.train()

    # 1. joint phase: every task every step; cosines of the shared-encoder gradients
    cos_sum: dict[str, float] = {}
    for s in range(r.joint_steps):
        diag: dict[str, float] = {}
        batches = {t: train[t][s % len(train[t])] for t in tasks}
        step(model, opt, task_losses(model, batches), shared, heads, cfg.train.grad_clip, diag)
        for k, v in diag.items():
            if k.startswith("gradcos_"):
                cos_sum[k] = cos_sum.get(k, 0.0) + v / r.joint_steps
        if (s + 1) % 5 == 0 and s + 1 < r.joint_steps:
            say(f"[raymtl] relations: joint step {s + 1}/{r.joint_steps}")
    cosine = {a: {b: 1.0 if a == b else cos_sum.get(f"gradcos_{a}_{b}", cos_sum.get(f"gradcos_{b}_{a}"))
                  for b in tasks} for a in tasks}
    say(f"[raymtl] relations: {r.joint_steps} joint steps done")

    # 2. lookahead from the end of the joint phase, one task at a time
    before = validation_losses(model, val)
    start_model, start_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    affinity, after = {}, {}
    for a in tasks:
        model.load_state_dict(start_model)
        opt.load_state_dict(copy.deepcopy(start_opt))      # loading aliases same-device tensors
        torch.manual_seed(seed + 1)
        for s in range(r.lookahead_steps):
            batch = train[a][(r.joint_steps + s) % len(train[a])]
            step(model, opt, task_losses(model, {a: batch}), shared, heads, cfg.train.grad_clip)
        after[a] = validation_losses(model, val)
        affinity[a] = {b: 1.0 - after[a][b] / before[b] for b in tasks}
        say(f"[raymtl] relations: {r.lookahead_steps} steps on {a}: " +
            " ".join(f"L_{b} {before[b]:.4f} -> {after[a][b]:.4f}" for b in tasks))
    model.load_state_dict(start_model)
    return {"tasks": tasks, "affinity": affinity, "gradient_cosine": cosine,
            "val_loss_before": before, "val_loss_after": after,
            "settings": {"encoder": cfg.model.init_from or cfg.model.encoder, "seed": seed,
                         "batch_size": cfg.train.batch_size, "lr": cfg.train.lr, "head_lr": cfg.train.head_lr,
                         **vars(r)}}


# ---------------------------------------------------------------- output
def format_matrices(res: dict) -> str:
    """Both matrices as markdown tables (rows: the task trained on / A, columns: B)."""
    tasks, k, j = res["tasks"], res["settings"]["lookahead_steps"], res["settings"]["joint_steps"]
    out = []
    for key, title in (("affinity", f"inter-task affinity 1 - L_B(after {k} steps on A) / L_B(before)"),
                       ("gradient_cosine", f"gradient cosine cos(g_A, g_B), mean over {j} joint steps")):
        out += [f"{title} (rows: A, columns: B)", "", "| A \\ B | " + " | ".join(tasks) + " |",
                "|---" * (len(tasks) + 1) + "|"]
        out += [f"| {a} | " + " | ".join(f"{res[key][a][b]:+.4f}" for b in tasks) + " |" for a in tasks]
        out.append("")
    return "\n".join(out)


def heat_map(res: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks, s = res["tasks"], res["settings"]
    fig, axes = plt.subplots(1, 2, figsize=(4.2 * 2 + 1, 4))
    panels = (("affinity", f"affinity: 1 - L_B after {s['lookahead_steps']} steps on A / before"),
              ("gradient_cosine", f"gradient cosine, mean over {s['joint_steps']} joint steps"))
    for ax, (key, title) in zip(axes, panels):
        m = np.array([[res[key][a][b] for b in tasks] for a in tasks])
        off = m[~np.eye(len(tasks), dtype=bool)] if key == "gradient_cosine" else m
        lim = max(float(np.abs(off).max()), 1e-6)           # centre the colours on 0
        im = ax.imshow(m, cmap="coolwarm", vmin=-lim, vmax=lim)
        for i in range(len(tasks)):
            for j in range(len(tasks)):
                ax.text(j, i, f"{m[i, j]:+.3f}", ha="center", va="center", fontsize=9)
        ax.set_xticks(range(len(tasks)), tasks)
        ax.set_yticks(range(len(tasks)), tasks)
        ax.set(xlabel="B (loss / gradient of)", ylabel="A (trained on)", title=title)
        ax.title.set_fontsize(9)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(f"task relations ({Path(str(s['encoder'])).name}, seed {s['seed']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write(res: dict, out: Path) -> dict[str, Path]:
    """relations.csv, relations.json and relations.png in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "relations.csv", "json": out / "relations.json", "png": out / "relations.png"}
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["a", "b", "affinity", "gradient_cosine"])
        for a in res["tasks"]:
            for b in res["tasks"]:
                w.writerow([a, b, f"{res['affinity'][a][b]:.6f}", f"{res['gradient_cosine'][a][b]:.6f}"])
    paths["json"].write_text(json.dumps(res, indent=2) + "\n")
    heat_map(res, paths["png"])
    return paths


def run(cfg: RelationsJobConfig, say=print) -> tuple[dict, dict[str, Path]]:
    """Measure, then write to ``OUTPUT/NAME``; returns the result and the written paths."""
    res = measure(cfg, say)
    bad = [(k, a, b) for k in ("affinity", "gradient_cosine") for a in res["tasks"] for b in res["tasks"]
           if not math.isfinite(res[k][a][b])]
    if bad:
        raise RuntimeError(f"non-finite relations {bad}: a loss diverged or was zero; lower lr or check the data")
    return res, write(res, Path(cfg.run.output).expanduser() / cfg.run.name)
