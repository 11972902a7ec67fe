"""Cross-encoder teachers distilled into the bi-encoder student: how much of the gap closes?

    .venv/bin/python bench/cross_bi.py                      # Quora and STS, seed 42, ~30 min here
    .venv/bin/python bench/cross_bi.py --tasks sts --seed 2
    .venv/bin/python bench/cross_bi.py --teacher-steps 900  # teachers 3x the student's steps
    .venv/bin/python bench/cross_bi.py --smoke              # tiny model, ~1 min

For each pair task, three single-task runs on the same rows, steps and plain encoder
(``--preset single-<task>``):

* **bi alone**: the student as raymtl trains it (``pair_mode`` bi: SBERT features for Quora,
  the cosine for STS), no teacher;
* **cross teacher**: the same task read with cross attention (``--pair-mode <task>=cross``:
  ``[CLS] a [SEP] b``), on the student's steps or ``--teacher-steps`` (the default encoder was
  trained as a bi-encoder, so its cross attention over a pair starts untrained), then its outputs on every training row, as the pipeline's teachers
  write them (``raymtl.stages.pipeline.run_teacher``; read back when they exist);
* **bi from cross**: the bi student again, distilled from those outputs (Distilled Sentence
  Embedding; Trans-Encoder's cross -> bi): KL on the logits with the temperature (Quora), MSE
  on the teacher's score mapped onto the cosine (STS), mixed with the gold labels by
  ``--distill-alpha``.

It prints each run's validation score and the share of the teacher-student gap the
distillation closes, ``(from cross - alone) / (cross - alone)`` (the issue's target: at least
half), and writes ``docs/results/cross-bi-s<seed>.md`` (``cross-bi-teacher<N>-s<seed>.md`` with
``--teacher-steps N``). Runs that finished before under
--output are read back, not retrained.
"""
import argparse
import sys
import time
from pathlib import Path

from raymtl.config import smoke
from raymtl.recipes import single_task
from raymtl.stages.pipeline import run_teacher
from raymtl.tasks import TASKS
from raymtl.train.trainer import fit_once

sys.path.insert(0, str(Path(__file__).resolve().parent))    # bench/report.py, also when loaded by path
import report  # noqa: E402

PAIR_TASKS = [t for t, spec in TASKS.items() if spec.is_pair]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="quora,sts", help=f"comma-separated pair tasks, of {PAIR_TASKS}")
    p.add_argument("--seed", type=int, default=42, help="training seed (the split seed stays the config's)")
    p.add_argument("--distill-alpha", type=float, default=0.5, help="the teacher's share of the loss")
    p.add_argument("--distill-temperature", type=float, default=2.0, help="T of the classification KL")
    p.add_argument("--teacher-steps", type=int, default=0,
                   help="the cross teacher's steps (0: the student's); validation every third of them")
    p.add_argument("--output", default="runs/bench-cross-bi")
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args(argv)
    tasks = a.tasks.split(",")
    if not tasks or any(t not in PAIR_TASKS for t in tasks):
        p.error(f"--tasks {a.tasks!r}: choose from {PAIR_TASKS}")
    if a.teacher_steps < 0:
        p.error(f"--teacher-steps {a.teacher_steps}: must be >= 0")
    started, rows = report.now(), []
    for task in tasks:
        base = single_task(task)()
        base = (smoke(base) if a.smoke else base).replace(output=str(Path(a.output).resolve()), seed=a.seed)
        try:
            student = base.replace(distill_alpha=a.distill_alpha, distill_temperature=a.distill_temperature)
        except ValueError as e:
            p.error(str(e))
        runs = {}
        t0 = time.perf_counter()
        runs["bi alone"] = fit_once(base.replace(name=f"bi-{task}-s{a.seed}"))
        budget = f"-{a.teacher_steps}steps" if a.teacher_steps and a.teacher_steps != base.train.steps else ""
        cross = base.replace(pair_mode={**base.model.pair_mode, task: "cross"}, name=f"cross-{task}{budget}-s{a.seed}")
        if budget:
            cross = cross.replace(steps=a.teacher_steps, eval_every=max(1, a.teacher_steps // 3))
        teacher = run_teacher(cross, verbose=False, once=True)
        runs["cross teacher"] = teacher["metrics"]
        runs["bi from cross"] = fit_once(student.replace(teacher_outputs={task: teacher["outputs"]},
                                                         name=f"bi-{task}-from-cross{budget}-s{a.seed}"))
        score = {k: m[f"val_{task}"] for k, m in runs.items()}
        gap = score["cross teacher"] - score["bi alone"]
        # a teacher at or below the student alone leaves no gap to close
        closed = f"{(score['bi from cross'] - score['bi alone']) / gap:.2f}" if gap > 1e-9 else "none: teacher below"
        rows.append((task, base.train.steps, cross.train.steps, score, closed, (time.perf_counter() - t0) / 60))
        print(f"[bench] {task}: " + " ".join(f"{k}={v:.4f}" for k, v in score.items())
              + f" gap closed {closed}", flush=True)
    lines = [f"{base.model.encoder} encoder, seed {a.seed} (split seed {base.data.split_seed}); single-task "
             f"runs on the plain encoder, {base.train.batch_size} rows per step; distillation alpha "
             f"{a.distill_alpha}, temperature {a.distill_temperature}; the best of the runs' validations; "
             "gap closed = (bi from cross - bi alone) / (cross teacher - bi alone), when the teacher is above the "
             "bi-encoder alone; wall min: this invocation's minutes per task (runs read back take none)", "",
             "| task | steps | teacher steps | metric | bi alone | cross teacher | bi from cross | gap closed | wall min |",
             "|---|---|---|---|---|---|---|---|---|"]
    for task, steps, teacher_steps, score, closed, wall in rows:
        lines.append(f"| {task} | {steps} | {teacher_steps} | {TASKS[task].metric} | {score['bi alone']:.4f} | "
                     f"{score['cross teacher']:.4f} | {score['bi from cross']:.4f} | {closed} | {wall:.1f} |")
    report.publish(lines, f'cross-bi-s{a.seed}' if not a.teacher_steps else f'cross-bi-teacher{a.teacher_steps}-s{a.seed}', 'Cross-encoder teachers distilled into the bi-encoder (bench/cross_bi.py)', 'bench/cross_bi.py', argv, started, a.smoke)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
