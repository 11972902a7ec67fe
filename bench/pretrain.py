"""Does further pre-training pay? Each choice of objectives, then the default multi-task recipe from it.

    .venv/bin/python bench/pretrain.py --seed 1                  # none, sup, mlm-sup: ~45 min here
    .venv/bin/python bench/pretrain.py --choices sup --pretrain-steps 400
    .venv/bin/python bench/pretrain.py --smoke                   # tiny model, ~2 min

Per choice, one further pre-training run (``jobs/pretrain.py``: ``recipes.pretrain()`` with the
choice's objective weights and head warm-up, ``--pretrain-steps`` steps, validated at its start and end), then
the default multi-task run (``python jobs/mtl.py``: ``recipes.mtl()``) from its checkpoint,
same seed. Choices (``CHOICES``):

* ``none``: no pre-training, the default encoder (the baseline; with ``--output`` shared with
  ``bench/sampling.py`` its ``temperature-s<seed>`` run is read back);
* ``sup``: supervised SimCSE on the NLI triplets alone;
* ``mlm-sup``: MLM (weight 0.1) with its head warmed up first (``--head-warmup-steps``, encoder
  frozen) + supervised SimCSE (``python jobs/pretrain.py``'s recipe);
* ``stage``: the stage's own defaults (a fresh MLM head at weight 0.1, unsupervised SimCSE on
  Wiki sentences, supervised SimCSE; the recipe before 2026-12-03).

It prints zero-shot STS Pearson and held-out MLM perplexity before and after pre-training, the
pre-training minutes and the multi-task validation scores, and writes
``docs/results/pretrain-s<seed>.md``. Runs that finished before under --output are read back.
"""
import argparse
import json
import sys
import time
from pathlib import Path

from raymtl import recipes
from raymtl.config import smoke
from raymtl.stages.pretrain import pretrain_smoke
from raymtl.tasks import TASKS
from raymtl.train.trainer import fit_once

sys.path.insert(0, str(Path(__file__).resolve().parent))    # bench/report.py, also when loaded by path
import report  # noqa: E402

OBJECTIVES = ("mlm_weight", "simcse_unsup_weight", "simcse_sup_weight", "head_warmup_steps")
CHOICES = {                           # those PretrainConfig fields per choice; None: no pre-training
    "none": None,
    "sup": (0.0, 0.0, 1.0, 0),
    "mlm-sup": (0.1, 0.0, 1.0, "WARMUP"),       # recipes.pretrain()
    "stage": (0.1, 1.0, 1.0, 0),                # PretrainConfig's own defaults
}


def pretrain_minutes(m: dict) -> float:
    return m.get("s_per_step", 0.0) * m.get("step", 0) / 60


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--choices", default="none,sup,mlm-sup", help=f"comma-separated, of {list(CHOICES)}")
    p.add_argument("--seed", type=int, default=1, help="training seed of both stages (the split seed stays the config's)")
    p.add_argument("--pretrain-steps", type=int, default=200)
    p.add_argument("--head-warmup-steps", type=int, default=100, help="MLM head warm-up of the mlm-sup choice")
    p.add_argument("--output", default="runs/bench-pretrain")
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args(argv)
    choices = a.choices.split(",")
    if not choices or any(c not in CHOICES for c in choices):
        p.error(f"--choices {a.choices!r}: choose from {list(CHOICES)}")
    if a.pretrain_steps <= 0 or a.head_warmup_steps < 0:
        p.error("--pretrain-steps must be > 0 and --head-warmup-steps >= 0")
    out = str(Path(a.output).resolve())
    base = pretrain_smoke(recipes.pretrain()) if a.smoke else recipes.pretrain()
    steps = min(a.pretrain_steps, base.train.steps) if a.smoke else a.pretrain_steps
    warmup = min(a.head_warmup_steps, 4) if a.smoke else a.head_warmup_steps
    started, rows = report.now(), []
    for choice in choices:
        t0 = time.perf_counter()
        fields = CHOICES[choice]
        pre = {}
        mtl = recipes.mtl()
        mtl = (smoke(mtl) if a.smoke else mtl).replace(output=out, seed=a.seed)
        if fields is None:
            mtl = mtl.replace(name=f"temperature-s{a.seed}")        # bench/sampling.py's name for this run
        else:
            fields = {k: warmup if v == "WARMUP" else v for k, v in zip(OBJECTIVES, fields)}
            try:
                cfg = base.replace(steps=steps, eval_every=steps, seed=a.seed, output=out,
                                   name=f"pretrain-{choice}-{steps}steps-s{a.seed}", **fields)
            except ValueError as e:
                p.error(str(e))
            pre = fit_once(cfg)
            warm = Path(out) / f"{cfg.run.name}-head" / "best_metrics.json"       # the head warm-up's run
            warm = json.loads(warm.read_text()) if warm.is_file() else {}
            pre["warmup_minutes"] = pretrain_minutes(warm)
            pre["perplexities"] = [warm["mlm_perplexity_step0"]] if warm else []    # the fresh head's
            pre["perplexities"] += [pre["mlm_perplexity_step0"], pre["mlm_perplexity"]]
            mtl = mtl.replace(init_from=pre["best_checkpoint"], name=f"mtl-from-{choice}-{steps}steps-s{a.seed}")
        m = fit_once(mtl)
        rows.append((choice, pre, m, (time.perf_counter() - t0) / 60))
        print(f"[bench] {choice}: " + " ".join(f"{k}={m[k]:.4f}" for k in ("val_sst", "val_quora", "val_sts", "overall"))
              + (f" zero-shot STS {pre['sts_zero_shot_step0']:.4f} -> {pre['sts_zero_shot']:.4f}" if pre else ""),
              flush=True)
    base_overall = next((m["overall"] for c, _, m, _ in rows if c == "none"), None)
    tasks = list(TASKS)
    lines = [f"{mtl.model.encoder} encoder, seed {a.seed} (split seed {mtl.data.split_seed}); pre-training: "
             f"`recipes.pretrain()` ({base.train.batch_size} rows per objective per step, "
             f"{steps} steps, the choice's objective weights), then `python jobs/mtl.py`'s recipe from its "
             "checkpoint; scores: the multi-task run's best validation; zero-shot STS: cosine Pearson on the STS "
             "validation split before -> after pre-training; MLM perplexity on held-out Wiki paragraphs (before -> after the head warm-up, if any, -> after); pre-train "
             "min: training minutes of the stage (with the head warm-up); wall min: this invocation's minutes "
             "per choice (runs read back take none)", "",
             "| choice | pre-train steps | pre-train min | zero-shot STS | MLM perplexity | "
             + " | ".join(tasks) + " | overall | vs none | wall min |",
             "|---|---|---|---|---|" + "---|" * len(tasks) + "---|---|---|"]
    for choice, pre, m, wall in rows:
        if pre:
            cells = [str(pre["step"]), f"{pretrain_minutes(pre) + pre['warmup_minutes']:.1f}",
                     f"{pre['sts_zero_shot_step0']:.4f} -> {pre['sts_zero_shot']:.4f}",
                     " -> ".join(f"{x:.0f}" for x in pre["perplexities"])]
        else:
            cells = ["0", "0", "-", "-"]
        delta = f"{m['overall'] - base_overall:+.4f}" if base_overall is not None else "-"
        lines.append(f"| {choice} | " + " | ".join(cells) + " | " + " | ".join(f"{m[f'val_{t}']:.4f}" for t in tasks)
                     + f" | {m['overall']:.4f} | {delta} | {wall:.1f} |")
    report.publish(lines, f'pretrain-s{a.seed}', 'Further pre-training choices and the multi-task result (bench/pretrain.py)', 'bench/pretrain.py', argv, started, a.smoke)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
