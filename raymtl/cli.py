"""Command line: config flags shared by every job, and the ``raymtl`` console script.

``raymtl evaluate --checkpoint DIR [--sst FILE] [--quora FILE] [--sts FILE] | [--related sick,mrpc,cfimdb]``
``raymtl predict  --checkpoint DIR --task {sst,quora,sts} --input FILE --output OUT.csv [--format minbert]``
``raymtl analyze  EXPERIMENT``
``raymtl curves   NAME=RUN ... [--metrics val_sst,overall] [--out DIR]``
``raymtl merge    CKPT CKPT ... --output DIR [--method task_arithmetic|ties]``
``raymtl compare  --a CKPT ... --b CKPT ... [--a ... --b ...] [--sst FILE] [--quora FILE] [--sts FILE]``
``raymtl relations [--smoke] [--init-from CKPT | --encoder NAME] [config flags]``
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
import typing
from pathlib import Path

import numpy as np

from raymtl import recipes
from raymtl.analysis.compare import compare, format_comparison, mean_over
from raymtl.analysis.evaluation import format_table, related_score
from raymtl.analysis.relations import format_matrices, run
from raymtl.analysis.reports import analyze, curves, format_trials
from raymtl.api import load
from raymtl.config import DEFAULT_DATA_DIR, SECTIONS, DataConfig, MTLConfig, smoke
from raymtl.data.readers import DataError, read_task_file, split_rows
from raymtl.data.related import RELATED, get_related, read_related
from raymtl.methods.merging import DEFAULT_DENSITY, MERGE_METHODS, merge
from raymtl.stages.relations import RelationsJobConfig, relations_smoke
from raymtl.tasks import TASKS
from raymtl.train.trainer import ConfigChanged, fit


# ---------------------------------------------------------------- config flags for jobs
def _parse_mapping(text: str) -> dict[str, str]:
    try:
        return dict(item.split("=", 1) for item in text.split(",") if item)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected key=value[,key=value], got {text!r}") from None


def add_config_args(parser: argparse.ArgumentParser, sections: dict[str, type] = SECTIONS) -> None:
    """One flag per config field (``lr`` -> ``--lr``), plus ``--config`` and ``--smoke``."""
    parser.add_argument("--config", help="JSON config file (nested or flat field names); flags override it")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny random model, a few hundred rows, a dozen steps: the same code path in seconds")
    for section, kind in sections.items():
        group = parser.add_argument_group(section)
        hints = typing.get_type_hints(kind)
        for f in dataclasses.fields(kind):
            flag, hint, help_ = "--" + f.name.replace("_", "-"), hints[f.name], f.metadata.get("help", "")
            if hint is bool:
                group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_)
            elif typing.get_origin(hint) is tuple:
                group.add_argument(flag, dest=f.name, default=None, help=help_ + " (comma-separated)",
                                   type=lambda s: tuple(x for x in s.split(",") if x))
            elif typing.get_origin(hint) is dict:
                group.add_argument(flag, dest=f.name, default=None, type=_parse_mapping,
                                   help=help_ + " (task=value,...)")
            else:
                group.add_argument(flag, dest=f.name, default=None, type=hint, help=help_)


def config_from_args(args: argparse.Namespace, defaults=MTLConfig, shrink=smoke) -> MTLConfig:
    """defaults -> --smoke -> --config file -> explicit flags. ``defaults()`` builds the
    stage's default config and ``shrink(cfg)`` its smoke version."""
    cfg = shrink(defaults()) if args.smoke else defaults()
    if args.config:
        cfg = type(cfg).load(args.config, over=cfg)     # the file's own fields over the job's defaults
    flags = {k: v for k, v in vars(args).items()
             if v is not None and k in cfg.flat()}
    return cfg.replace(**flags)


def fit_job(parser: argparse.ArgumentParser, args: argparse.Namespace, defaults, shrink=smoke) -> int:
    """A training job's whole main after parsing: its config (``config_from_args``), one
    ``fit``, the exit status (2: a data error, named; 1: no checkpoint)."""
    try:
        cfg = config_from_args(args, defaults=defaults, shrink=shrink)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    print(f"[raymtl] config: {cfg.flat()}", flush=True)
    try:
        summary = fit(cfg)
    except (DataError, ConfigChanged) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if summary.best_checkpoint else 1


# ---------------------------------------------------------------- raymtl evaluate / predict
def validation_rows(checkpoint: str | Path, tasks: list[str], data_dir: str | None = None
                    ) -> dict[str, list[dict]]:
    """The run's own validation split of each task, carved exactly as in training, from the
    data section of the checkpoint's ``config.json`` (every field checked, so a run of an older
    raymtl evaluates too); ``data_dir`` overrides where the train files are."""
    cfg_file = Path(checkpoint) / "config.json"
    data = (MTLConfig.from_dict({"data": json.loads(cfg_file.read_text())["data"]}).data
            if cfg_file.is_file() else DataConfig())
    if data_dir:
        data.data_dir = data_dir
    rows_by_task = {}
    for t in tasks:
        rows, _ = read_task_file(TASKS[t], f"{data.data_dir}/{TASKS[t].path}", max_rows=data.max_rows)
        rows_by_task[t] = split_rows(rows, data.val_fraction, data.split_seed)[1]
    print(f"[raymtl] scoring the validation splits carved from {data.data_dir}", file=sys.stderr)
    return rows_by_task


def cmd_evaluate(a) -> int:
    if a.related is not None:
        return evaluate_related(a)
    m = load(a.checkpoint, a.device)
    model = m.model
    files = {t: getattr(a, t) for t in TASKS if getattr(a, t)}
    rows_by_task = {}
    if files:
        for t, path in files.items():
            rows, report = read_task_file(TASKS[t], path)
            print("[raymtl] data " + report.summary(), file=sys.stderr)
            rows_by_task[t] = rows
    else:                                           # no files: the run's own validation splits
        rows_by_task = validation_rows(a.checkpoint, list(model.heads), a.data_dir)
    unknown = [t for t in rows_by_task if t not in model.heads]
    if unknown:
        print(f"error: checkpoint {a.checkpoint} has no head for {unknown}", file=sys.stderr)
        return 2
    print(format_table(m.evaluate(rows_by_task)))     # "overall" only when sst, quora and sts are all scored
    return 0


def _side(checkpoints: list[str], device: str, flag: str) -> dict[str, tuple[str, object]]:
    """task -> (checkpoint, loaded model) for one side of ``raymtl compare``; a task may come
    from one of the side's checkpoints only."""
    side: dict[str, tuple[str, object]] = {}
    for ckpt in checkpoints:
        m = load(ckpt, device)
        for t in m.tasks:
            if t in side:
                raise ValueError(f"{flag}: {ckpt} and {side[t][0]} both have a head for {t}; name one")
            side[t] = (ckpt, m)
    return side


def _data_fields(checkpoint: str) -> dict:
    f = Path(checkpoint) / "config.json"
    return json.loads(f.read_text()).get("data", {}) if f.is_file() else {}


def compare_pair(a, ckpts_a: list[str], ckpts_b: list[str], seed: int):
    """One ``--a``/``--b`` pair of ``raymtl compare``: both sides scored on the same rows."""
    sides = [_side(ckpts_a, a.device, "--a"), _side(ckpts_b, a.device, "--b")]
    files = {t: getattr(a, t) for t in TASKS if getattr(a, t)}
    tasks = list(files) or [t for t in TASKS if t in sides[0] and t in sides[1]]
    for t in tasks:
        for flag, side in zip(("--a", "--b"), sides):
            if t not in side:
                raise ValueError(f"{flag} has no head for {t} (it has {sorted(side)})")
    if not tasks:
        raise ValueError(f"no task in common: --a has {sorted(sides[0])}, --b has {sorted(sides[1])}")
    rows_of = {}
    for t in tasks:
        if t in files:
            rows_of[t], report = read_task_file(TASKS[t], files[t])
            print("[raymtl] data " + report.summary(), file=sys.stderr)
            continue
        ck_a, ck_b = sides[0][t][0], sides[1][t][0]
        rows_of[t], rows_b = (validation_rows(c, [t], a.data_dir)[t] for c in (ck_a, ck_b))
        if [(r["text_a"], r["text_b"], r["label"]) for r in rows_of[t]] != \
                [(r["text_a"], r["text_b"], r["label"]) for r in rows_b]:
            da, db = _data_fields(ck_a), _data_fields(ck_b)
            differ = {k: (da.get(k), db.get(k)) for k in sorted(set(da) | set(db)) if da.get(k) != db.get(k)}
            raise ValueError(f"{t}: {ck_a} and {ck_b} were validated on different rows (data fields that "
                             f"differ, a vs b: {differ}); pass --{t} FILE to score both on one labelled file")
    preds = [{t: side[t][1].predict_rows(t, rows_of[t]) for t in tasks} for side in sides]
    labels = {t: np.asarray([r["label"] for r in rows_of[t]]) for t in tasks}
    return compare(*preds, labels, a.resamples, seed)


def cmd_compare(a) -> int:
    """Two models (each one checkpoint, or single-task checkpoints side by side) scored on the
    same rows, with a paired bootstrap interval per task (``raymtl.analysis.compare``). Several
    ``--a``/``--b`` pairs (e.g. one per seed) add the mean over the pairs and its interval."""
    if len(a.a) != len(a.b):
        raise ValueError(f"{len(a.a)} --a against {len(a.b)} --b: give them in pairs")
    runs = []
    for i, (ckpts_a, ckpts_b) in enumerate(zip(a.a, a.b)):
        runs.append(compare_pair(a, ckpts_a, ckpts_b, a.seed + i))
        if len(a.a) > 1:
            print(f"\npair {i + 1}: --a {' '.join(ckpts_a)} --b {' '.join(ckpts_b)}")
        print(format_comparison(runs[-1], a.name_a, a.name_b))
    if len(runs) > 1:
        print(f"\nmean over the {len(runs)} pairs:")
        print(format_comparison(mean_over(runs), a.name_a, a.name_b))
    return 0


def evaluate_related(a) -> int:
    """``raymtl evaluate --related sick,mrpc,cfimdb``: each set's rows (labels mapped into its
    target task's space) scored by that task's head; a table row per set."""
    try:
        if not a.related:
            raise ValueError(f"name at least one related data set; valid: {sorted(RELATED)}")
        given = [f"--{t}" for t in TASKS if getattr(a, t)]
        if given:
            raise ValueError(f"scores related sets only; run {' '.join(given)} in an evaluate of its own")
        sets = [get_related(name) for name in a.related]
    except ValueError as e:
        print(f"error: --related: {e}", file=sys.stderr)
        return 2
    m = load(a.checkpoint, a.device)
    missing = sorted({rs.target for rs in sets} - set(m.tasks))
    if missing:
        print(f"error: checkpoint {a.checkpoint} has no head for {missing} (needed by --related "
              f"{','.join(rs.name for rs in sets if rs.target in missing)}); it has {m.tasks}", file=sys.stderr)
        return 2
    data_dir, rows_of = a.data_dir or DEFAULT_DATA_DIR, {}
    for rs in sets:                                 # every file read (or its error named) before any score
        try:
            rows_of[rs.name], reports = read_related(rs.name, data_dir)
        except (DataError, OSError) as e:
            print(f"error: --related {rs.name}: {e}", file=sys.stderr)
            return 2
        for report in reports:
            print("[raymtl] data " + report.summary(), file=sys.stderr)
    print("| related set | head | metric | rows | score | note |\n|---|---|---|---|---|---|")
    for rs in sets:
        metric = "Pearson" if TASKS[rs.target].label_type != "class" else "accuracy"
        score = related_score(m.model, m.tokenizer, rs, rows_of[rs.name], m.max_length)
        print(f"| {rs.name} | {rs.target} | {metric} | {len(rows_of[rs.name]):,} | {score:.4f} | {rs.note} |", flush=True)
    return 0


def cmd_predict(a) -> int:
    m = load(a.checkpoint, a.device)
    if a.task not in m.tasks:
        print(f"error: checkpoint {a.checkpoint} has no head for task {a.task!r}; it has {m.tasks}",
              file=sys.stderr)
        return 2
    rows, report = read_task_file(TASKS[a.task], a.input, with_labels=False, max_bad_fraction=0.0,
                                  allow_empty_text=True)
    preds = m.predict_rows(a.task, rows)
    write_predictions(a.output, a.task, [r["id"] for r in rows], preds, a.format)
    print(f"[raymtl] {m.last_stats.summary()} -> {a.output}", file=sys.stderr)
    return 0


# the prediction files of the CS224N minBERT default final project (multitask_classifier.py's
# test_multitask): header "id \t Predicted_... \n", rows "{id} , {prediction} \n"; "Similiary" is sic
MINBERT_COLUMNS = {t: spec.prediction_column for t, spec in TASKS.items()}
PREDICTION_FORMATS = ("csv", "minbert")


def write_predictions(path: str, task: str, ids: list[str], preds, fmt: str = "csv") -> None:
    """``csv``: ``id,prediction``; ``minbert``: the minBERT project's own prediction-file layout."""
    values = [str(int(p)) if TASKS[task].label_type == "class" else f"{float(p):.4f}" for p in preds]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        if fmt == "minbert":
            f.write(f"id \t {MINBERT_COLUMNS[task]} \n")
            f.writelines(f"{i} , {v} \n" for i, v in zip(ids, values))
        else:
            w = csv.writer(f)
            w.writerow(["id", "prediction"])
            w.writerows(zip(ids, values))


def cmd_analyze(a) -> int:
    res = analyze(a.experiment, a.out)
    print(format_trials(res["table"]))
    for p in res["plots"]:
        print(f"[raymtl] plot: {p}")
    if res["best_config"]:
        print(f"[raymtl] best trial {res['best_trial']}; config: {res['best_config']}")
        print(f"[raymtl] train it with: python jobs/mtl.py --config {res['best_config']}")
    return 0


def cmd_curves(a) -> int:
    res = curves(a.runs, a.out, [m for m in (a.metrics or "").split(",") if m])
    print(format_trials(res["table"]))
    print(f"[raymtl] plot: {res['plot']}")
    print(f"[raymtl] table: {res['csv']}")
    return 0


def cmd_relations(a) -> int:
    res, paths = run(config_from_args(a, defaults=recipes.relations, shrink=relations_smoke))
    print(format_matrices(res))
    for kind, path in paths.items():
        print(f"[raymtl] {kind}: {path}")
    return 0


DEVICE_HELP = "where the model runs: auto (a GPU if there is one, else the CPU), cpu, cuda or cuda:N"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="raymtl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("evaluate", help="score a checkpoint on labelled files (or its validation splits)")
    e.add_argument("--checkpoint", required=True)
    for t in TASKS:
        e.add_argument(f"--{t}", metavar="FILE", help=f"labelled {t} file, minBERT or GLUE layout")
    e.add_argument("--related", metavar="NAMES", type=lambda v: [x for x in v.split(",") if x],
                   help="score related data sets out of domain instead (comma-separated, e.g. sick,mrpc,cfimdb; "
                        f"valid: {', '.join(RELATED)}): each by its target task's head, read from --data-dir")
    e.add_argument("--data-dir", help="data directory for the default validation splits and --related")
    e.add_argument("--device", default="auto", help=DEVICE_HELP)
    e.set_defaults(fn=cmd_evaluate)
    pr = sub.add_parser("predict", help="write a prediction for every row of an unlabelled file "
                        "(minBERT or GLUE layout)")
    pr.add_argument("--checkpoint", required=True)
    pr.add_argument("--task", required=True, choices=sorted(TASKS))
    pr.add_argument("--input", required=True)
    pr.add_argument("--output", required=True)
    pr.add_argument("--format", default="csv", choices=PREDICTION_FORMATS,
                    help="csv: id,prediction; minbert: the minBERT project's prediction file "
                         "(id \\t Predicted_... header, 'id , prediction' rows)")
    pr.add_argument("--device", default="auto", help=DEVICE_HELP)
    pr.set_defaults(fn=cmd_predict)
    an = sub.add_parser("analyze", help="table, best config and plots of a Tune experiment")
    an.add_argument("experiment", help="experiment directory (e.g. runs/tune/mtl-search)")
    an.add_argument("--out", help="where to write trials.csv, best_config.json, plots (default EXPERIMENT/analysis)")
    an.set_defaults(fn=cmd_analyze)
    cu = sub.add_parser("curves", help="validation curves of runs side by side (a panel per metric, a line per run)")
    cu.add_argument("runs", nargs="+", metavar="RUN",
                    help="run directory (OUTPUT/NAME) or checkpoint directory, optionally LABEL=PATH")
    cu.add_argument("--metrics", help="comma-separated metric names (default: val_* and overall)")
    cu.add_argument("--out", default="runs/curves", help="where to write curves.png and curves.csv")
    cu.set_defaults(fn=cmd_curves)
    me = sub.add_parser("merge", help="one multi-task checkpoint from single-task checkpoints of one base "
                        "encoder (task arithmetic or TIES-merging)")
    me.add_argument("checkpoints", nargs="+", metavar="CKPT", help="single-task checkpoints (different tasks)")
    me.add_argument("--output", required=True, help="the merged checkpoint's directory (new or empty)")
    me.add_argument("--method", default="task_arithmetic", choices=sorted(MERGE_METHODS))
    me.add_argument("--scale", type=float, help="lambda on the combined task vectors (default: 1/k for "
                    "task_arithmetic, i.e. weight averaging; 1 for ties)")
    me.add_argument("--density", type=float, default=DEFAULT_DENSITY,
                    help=f"ties: share of each task vector kept per tensor (default {DEFAULT_DENSITY})")
    me.add_argument("--base", help="the base encoder the checkpoints were fine-tuned from (default: theirs)")
    me.set_defaults(fn=lambda a: 0 if merge(a.checkpoints, a.output, a.method, a.scale, a.density, a.base) else 1)
    co = sub.add_parser("compare", help="two models on the same rows: per task B - A with a paired bootstrap "
                        "95 %% interval (a side may be several single-task checkpoints)")
    co.add_argument("--a", nargs="+", required=True, action="append", metavar="CKPT",
                    help="model A: a checkpoint, or one per task; repeat --a/--b for more pairs (e.g. seeds)")
    co.add_argument("--b", nargs="+", required=True, action="append", metavar="CKPT",
                    help="model B: a checkpoint, or one per task")
    for t in TASKS:
        co.add_argument(f"--{t}", metavar="FILE", help=f"labelled {t} file (default: the runs' validation split)")
    co.add_argument("--name-a", default="A", help="A's column heading")
    co.add_argument("--name-b", default="B", help="B's column heading")
    co.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default 2000)")
    co.add_argument("--seed", type=int, default=0, help="seed of the resampling")
    co.add_argument("--data-dir", help="data directory for the validation splits")
    co.add_argument("--device", default="auto", help=DEVICE_HELP)
    co.set_defaults(fn=cmd_compare)
    rel = sub.add_parser("relations", help="task-relationship map: inter-task affinity and gradient cosines "
                         "(Ray Train runs on one worker); writes OUTPUT/NAME/relations.{csv,json,png}")
    add_config_args(rel, RelationsJobConfig.SECTIONS)
    rel.set_defaults(fn=cmd_relations)
    a = p.parse_args(argv)
    try:
        return a.fn(a)
    except (DataError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
