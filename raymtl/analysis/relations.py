"""The task-relationship map's driver and outputs (``raymtl relations``): runs
``raymtl.stages.relations.RelationsStage`` on the shared loop (a joint run, then one lookahead
run per task from its checkpoint) and turns their reports into the two matrices.

Writes ``relations.csv`` (one row per ordered pair), ``relations.json`` (matrices, losses,
settings) and ``relations.png`` (two heat maps) to ``OUTPUT/NAME`` (default ``runs/relations``),
the runs under ``OUTPUT/NAME/runs``.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from raymtl.stages.relations import RelationsJobConfig, RelationsStage
from raymtl.train.trainer import fit_once


def measure(cfg: RelationsJobConfig, say=print) -> dict:
    """Affinity and gradient-cosine matrices (``{A: {B: value}}``) and what they were measured on."""
    tasks, r = list(cfg.data.tasks), cfg.relations
    runs = str(Path(cfg.run.output).expanduser() / cfg.run.name / "runs")
    joint_cfg = cfg.replace(output=runs, name="joint", steps=r.joint_steps, eval_every=r.joint_steps,
                            fusion="sum", fusion_every=1, diagnostics=True, warmup_ratio=0.0, lookahead_task="")
    joint = fit_once(joint_cfg, verbose=False, stage=RelationsStage)
    before = {t: joint[f"val_loss_{t}"] for t in tasks}
    cosine = {a: {b: 1.0 if a == b else joint.get(f"gradcos_{a}_{b}", joint.get(f"gradcos_{b}_{a}"))
                  for b in tasks} for a in tasks}
    say(f"[raymtl] relations: {r.joint_steps} joint steps done")
    affinity, after = {}, {}
    for a in tasks:
        ahead = joint_cfg.replace(name=f"lookahead-{a}", steps=r.joint_steps + r.lookahead_steps,
                                  eval_every=r.joint_steps + r.lookahead_steps, diagnostics=False, lookahead_task=a)
        done = fit_once(ahead, verbose=False, stage=RelationsStage, start_from=joint["best_checkpoint"])
        after[a] = {b: done[f"val_loss_{b}"] for b in tasks}
        affinity[a] = {b: 1.0 - after[a][b] / before[b] for b in tasks}
        say(f"[raymtl] relations: {r.lookahead_steps} steps on {a}: " +
            " ".join(f"L_{b} {before[b]:.4f} -> {after[a][b]:.4f}" for b in tasks))
    return {"tasks": tasks, "affinity": affinity, "gradient_cosine": cosine,
            "val_loss_before": before, "val_loss_after": after,
            "settings": {"encoder": cfg.model.init_from or cfg.model.encoder, "seed": cfg.train.seed,
                         "batch_size": cfg.train.batch_size, "lr": cfg.train.lr, "head_lr": cfg.train.head_lr,
                         **{k: v for k, v in vars(r).items() if k != "lookahead_task"}}}


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
