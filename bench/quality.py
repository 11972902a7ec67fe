"""Multi-task vs single-task quality on the same budget: is one model as good as three?

    .venv/bin/python bench/quality.py                          # 3 seeds x 6 runs, ~12-15 min per run here, ~1 h the hour preset's
    .venv/bin/python bench/quality.py --seeds 1 --steps 150    # a cheaper look
    .venv/bin/python bench/quality.py --best '' --presets mtl,hour   # single-task, merged, the two recipes
    .venv/bin/python bench/quality.py --smoke                  # tiny model, ~3 min

For every seed (training seed and validation split seed alike) it trains, with the same
encoder, steps and rows per task per step, so every task sees the same number of training
examples in every run:

* three single-task models (``--tasks sst``, ``--tasks quora``, ``--tasks sts``; plain
  encoders, ``--no-pals --task-layers ''``),
* those three merged into one model (``raymtl merge``: task arithmetic, TIES-merging),
* the multi-task model with ``--fusion sum``, and with each ``--best`` setup (default
  ``imtl_g:10+pals=sts+layers=sst``, raymtl's default: ``--fusion imtl_g --fusion-every 10``
  with PALs for STS and SST's own top half of the encoder; ``METHOD:N`` fuses every N steps,
  plain ``METHOD`` every step; a setup runs the plain encoder unless it adds to it: ``+pals``
  gives every task PALs, ``+pals=sts`` (``+pals=sst/sts``) those tasks only, ``+layers``
  (``+layers=sst``) own copies of the encoder's top half, ``+prefix`` a learned task prefix;
  several setups, comma-separated),
* the multi-task model of each ``--presets`` recipe (default ``hour``, the one-hour recipe of
  ``raymtl.recipes``: its own steps, validation and early stop, not ``--steps``),
* with ``--single-presets``, three single-task models on each such recipe's budget (its steps,
  validation, early stop and precision; one task per step, so the three together cost what the
  round-robin recipe does): the same-compute baseline a recipe is compared with,

and prints each task's validation metric and the overall score as mean ± half-range over
seeds, then each setup minus its baseline with a paired bootstrap 95 % interval of the mean
over seeds (``raymtl.analysis.compare``: every model's predictions on its seed's validation
rows, resampled row by row). A run that finished before under --output is read back, not retrained.
"""
import argparse
import re
import statistics
import sys
from pathlib import Path

import numpy as np

import raymtl
from raymtl.analysis.compare import compare, mean_over
from raymtl.analysis.metrics import overall
from raymtl.config import MTLConfig, smoke
from raymtl.data.multitask import load_splits
from raymtl.methods.merging import MERGE_METHODS, merge
from raymtl.recipes import PLAIN_ENCODER, SUM_LOSS, preset
from raymtl.train.trainer import fit_once

sys.path.insert(0, str(Path(__file__).resolve().parent))    # bench/report.py, also when loaded by path
import report  # noqa: E402

TASKS = ("sst", "quora", "sts")


# addon -> (label, overrides, how =TASKS narrows it to some tasks)
ADDONS = {"pals": ("PALs", {"pals": True, "pal_tasks": ()}, lambda tasks: {"pal_tasks": tasks}),
          "layers": ("own top half", {"task_layers": {t: "half" for t in TASKS}},
                     lambda tasks: {"task_layers": {t: "half" for t in tasks}}),
          "prefix": ("learned task prefix", {"task_prefix": "learned"}, None)}


def parse_setup(spec: str) -> tuple[str, str, dict]:
    """``METHOD[:N][+ADDON[=TASKS]...]`` -> (run-name tag, table label, config overrides); e.g.
    ``imtl_g:10+pals`` is IMTL-G fused every 10 steps with PALs for every task,
    ``imtl_g:10+pals=sts+layers=sst`` raymtl's default."""
    method, *addons = spec.split("+")
    fusion, _, every = method.partition(":")
    try:
        every = int(every or 1)
    except ValueError:
        raise ValueError(f"--best {spec!r}: N in METHOD:N must be an integer") from None
    unknown = [a for a in addons if a.partition("=")[0] not in ADDONS]
    if unknown:
        raise ValueError(f"--best {spec!r}: unknown addon(s) {unknown}; valid: {sorted(ADDONS)}")
    tag, label = (f"{fusion}-every{every}", f"{fusion}, fused every {every} steps") if every > 1 else (fusion, fusion)
    over = {"fusion": fusion, "fusion_every": every, **PLAIN_ENCODER}    # addons say what the setup adds
    for a in addons:
        name, _, only = a.partition("=")
        what, adds, narrow = ADDONS[name]
        tag, label = f"{tag}-{name}", f"{label}, {what}"
        over.update(adds)
        if only and narrow is None:
            raise ValueError(f"--best {spec!r}: +{name} takes no =TASKS (only "
                             f"{', '.join('+' + n for n, addon in ADDONS.items() if addon[2])} do)")
        if only:                                   # pals=sts: PALs for these tasks only
            tasks = tuple(only.split("/"))
            tag, label = f"{tag}-{'-'.join(tasks)}", f"{label} ({'/'.join(tasks)} only)"
            over.update(narrow(tasks))
    return tag, label, over


def merged_scores(seeded: MTLConfig, checkpoints: list[str], method: str, out: Path) -> dict[str, float]:
    """The single-task checkpoints merged into one (``raymtl merge``), scored on the seed's
    validation splits; a merge made before is read back."""
    if not (out / "merge.json").is_file():
        merge(checkpoints, out, method, say=lambda m: None)
    splits, _ = load_splits(seeded.data)
    return raymtl.load(out, device="cpu").evaluate({t: val for t, (_, val) in splits.items()})


SINGLE = "single-task (3 models)"


def single_on_budget(name: str) -> str:
    """The row of the single-task models trained on preset ``name``'s budget."""
    return f"single-task (3 models), --preset {name}'s budget"


def runs_for_seed(base: MTLConfig, seed: int, setups: list[tuple[str, str, dict]],
                  presets: dict[str, MTLConfig], single_presets: dict[str, MTLConfig] | None = None
                  ) -> tuple[dict[str, dict[str, float]], dict[str, list[str]]]:
    """Scores per setup (single-task, the single-task models merged, each multi-task
    ``parse_setup``, then each preset's multi-task run, then the single-task models on each of
    ``single_presets``' budgets) for one seed, and each setup's checkpoints (one, or one per task)."""
    seeded = base.replace(seed=seed, split_seed=seed)
    out, ckpts = {}, {}

    def add(setup: str, runs: list[dict]) -> None:      # one run for all tasks, or one per task in TASKS' order
        out[setup] = {t: runs[i if len(runs) > 1 else 0][f"val_{t}"] for i, t in enumerate(TASKS)}
        ckpts[setup] = [m["best_checkpoint"] for m in runs]

    add(SINGLE, [fit_once(seeded.replace(tasks=(t,), name=f"single-{t}-s{seed}", **SUM_LOSS, **PLAIN_ENCODER))
                 for t in TASKS])                                        # plain: nothing to fuse
    for method in MERGE_METHODS:
        merged = Path(base.run.output) / f"merged-{method}-s{seed}"
        scores = merged_scores(seeded, ckpts[SINGLE], method, merged)
        add(f"single-task models merged ({method})", [{**{f"val_{t}": scores[t] for t in TASKS},
                                                       "best_checkpoint": str(merged)}])
    for tag, label, over in setups:
        add(f"multi-task, {label}", [fit_once(seeded.replace(name=f"mtl-{tag}-s{seed}", **over))])
    for name, cfg in presets.items():
        add(f"multi-task, --preset {name}", [fit_once(cfg.replace(output=base.run.output, seed=seed, split_seed=seed,
                                                                  name=f"preset-{name}-s{seed}"))])
    for name, cfg in (single_presets or {}).items():      # (one task: its best checkpoint is its best parts)
        add(single_on_budget(name), [fit_once(cfg.replace(output=base.run.output, seed=seed, split_seed=seed, tasks=(t,),
                                                          name=f"single-{t}-{name}-s{seed}", keep_task_best=False,
                                                          **SUM_LOSS, **PLAIN_ENCODER)) for t in TASKS])
    return out, ckpts


def predictions(seeded: MTLConfig, ckpts: dict[str, list[str]]) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """Every setup's predictions on the seed's validation rows (a task from the checkpoint that
    has its head), and the rows' labels: what ``raymtl.analysis.compare`` resamples."""
    splits, _ = load_splits(seeded.data)
    rows = {t: splits[t][1] for t in TASKS}
    preds = {}
    for setup, dirs in ckpts.items():
        preds[setup] = {}
        for d in dirs:
            m = raymtl.load(d, device="cpu")
            preds[setup].update({t: m.predict_rows(t, rows[t]) for t in m.tasks if t in rows})
    return preds, {t: np.asarray([r["label"] for r in rows[t]]) for t in TASKS}


def baseline(setup: str, rows: dict) -> str:
    """What a row is set against: a preset's own-budget single-task models where they ran."""
    name = setup.removeprefix("multi-task, --preset ")
    return single_on_budget(name) if name != setup and single_on_budget(name) in rows else SINGLE


def spread(values: list[float]) -> str:
    mid = statistics.mean(values)
    return f"{mid:.4f} ± {(max(values) - min(values)) / 2:.4f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--best", default="imtl_g:10+pals=sts+layers=sst",
                   help="fusion method(s) set next to sum, comma-separated; METHOD:N fuses every N steps; "
                        "+pals / +layers / +prefix add PALs / own top half of the encoder / a learned "
                        "task prefix for every task (e.g. imtl_g:10+pals); +pals=sts gives PALs to STS "
                        "only (several tasks: +pals=sst/sts), +layers=sst SST its own top half; '' for none "
                        "(not even sum: the --presets rows are the multi-task ones)")
    p.add_argument("--presets", default="hour",
                   help="multi-task recipes (raymtl.recipes) run as they are, comma-separated; '' for none")
    p.add_argument("--single-presets", default="",
                   help="recipes (raymtl.recipes) on whose budget (steps, validation, early stop, precision) "
                        "three more single-task models train, the same-compute baseline of that recipe; "
                        "comma-separated, e.g. hour")
    p.add_argument("--steps", type=int, help="steps per run (default: the config's; not the presets')")
    p.add_argument("--output", default="runs/bench-quality")
    p.add_argument("--report", default="quality",
                   help="the table goes to docs/results/REPORT.md (default quality: the README's three seeds; "
                        "name a partial comparison otherwise, e.g. quality-single-hour-s2)")
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args(argv)
    base = (smoke() if a.smoke else MTLConfig()).replace(output=str(Path(a.output).resolve()))
    if a.steps:
        base = base.replace(steps=a.steps, eval_every=min(base.train.eval_every, a.steps))
    seeds = [int(s) for s in a.seeds.split(",")]
    try:                            # bad specs and values fail here, before hours of training
        setups = [parse_setup(spec) for spec in dict.fromkeys(["sum", *a.best.split(",")])] if a.best else []
        for _, _, over in setups:
            base.replace(**over)
        presets = {name: preset(name) for name in filter(None, a.presets.split(","))}
        for name, cfg in presets.items():
            if set(cfg.data.tasks) != set(TASKS):
                raise ValueError(f"--presets {name}: trains {list(cfg.data.tasks)}, not the three tasks")
        single_presets = {name: preset(name) for name in filter(None, a.single_presets.split(","))}
        if not re.fullmatch(r"[\w.-]+", a.report):
            raise ValueError(f"--report {a.report!r}: a file name (letters, digits, '.', '-', '_'), not a path")
    except ValueError as e:
        p.error(str(e))
    if a.smoke:
        presets = {name: smoke(cfg) for name, cfg in presets.items()}
        single_presets = {name: smoke(cfg) for name, cfg in single_presets.items()}
    started = report.now()
    per_seed, diffs = [], {}                         # diffs: setup -> one comparison per seed
    for s in seeds:
        scores, ckpts = runs_for_seed(base, s, setups, presets, single_presets)
        preds, labels = predictions(base.replace(seed=s, split_seed=s), ckpts)
        for setup in list(scores)[1:]:
            diffs.setdefault(setup, []).append(compare(preds[baseline(setup, scores)], preds[setup], labels, seed=s))
        per_seed.append(scores)
    lines = [f"{base.model.encoder} encoder; single-task and multi-task setups {base.train.steps} steps x "
             f"{base.train.batch_size} rows per task, the presets (and the single-task models of --single-presets) as "
             f"their recipes (raymtl/recipes.py); seeds "
             f"{seeds}, each on its own validation split (split seed = seed); validation scores, mean ± half-range",
             "", "| setup | SST acc | Quora acc | STS Pearson | overall |", "|---|---|---|---|---|"]
    for setup in per_seed[0]:
        cells = [spread([r[setup][t] for r in per_seed]) for t in TASKS]
        total = spread([overall(r[setup]) for r in per_seed])
        lines.append(f"| {setup} | " + " | ".join(cells) + f" | {total} |")
    lines += ["", "Each setup minus the single-task models of the same seed (a preset's own-budget ones where "
              "they ran), mean over seeds with its paired bootstrap 95 % interval (2,000 resamples of each "
              "seed's validation rows; `*`: the interval excludes 0), and on how many seeds it is at or above "
              "them on every task:", "",
              "| setup | against | SST | Quora | STS | overall | seeds at or above on every task |",
              "|---|---|---|---|---|---|---|"]
    for setup in list(per_seed[0])[1:]:
        ref = baseline(setup, per_seed[0])
        gaps = [{t: r[setup][t] - r[ref][t] for t in TASKS} for r in per_seed]
        cells = [f"{d.diff:+.4f}{' *' if d.low > 0 or d.high < 0 else ''} [{d.low:+.4f}, {d.high:+.4f}]"
                 for d in mean_over(diffs[setup])]
        every = sum(all(v >= 0 for v in g.values()) for g in gaps)
        lines.append(f"| {setup} | {ref} | " + " | ".join(cells) + f" | {every} of {len(seeds)} |")
    lines += ["", "Per seed:", "", "| seed | setup | SST acc | Quora acc | STS Pearson | overall |",
              "|---|---|---|---|---|---|"]
    for seed, r in zip(seeds, per_seed):
        lines += [f"| {seed} | {setup} | " + " | ".join(f"{m[t]:.4f}" for t in TASKS) + f" | {overall(m):.4f} |"
                  for setup, m in r.items()]
    report.publish(lines, a.report, 'Multi-task vs single-task quality (bench/quality.py)', 'bench/quality.py', argv, started, a.smoke)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
