"""The whole recipe as one job: [further pre-training ->] teachers -> distilled multi-task student.

    python jobs/pipeline.py                          # SST teacher (+SST-2, CFIMDB) -> the student started from it
    python jobs/pipeline.py --pretrain-steps 200     # with further pre-training first (measured: no gain)
    python jobs/pipeline.py --pretrain-config pt.json   # ... with its own objectives (jobs/pretrain.py's fields)
    python jobs/pipeline.py --teacher-tasks sst,quora,sts   # a teacher per task, ~1 h
    python jobs/pipeline.py --baseline               # also the student without distillation
    python jobs/pipeline.py --student-from-teacher ''    # the students start from the encoder instead
    python jobs/pipeline.py --preset hour            # the student trained by the one-hour recipe
    python jobs/pipeline.py --smoke                  # same code path, tiny model, a few minutes
    python jobs/pipeline.py --force teacher-sst      # redo one stage (and so everything after it)
    python jobs/pipeline.py --output runs/distill    # every stage's runs under this directory

Stages, each also runnable alone: pretrain (jobs/pretrain.py; off unless --pretrain-steps), teacher-<task> per task
(jobs/teacher.py), mtl (jobs/mtl.py --init-from PRETRAINED --teacher-outputs ...). Each
stage's checkpoint feeds the next. Every stage's runs go under --output (default
runs/pipeline); a stage already done for the same inputs and config (OUTPUT/<stage>/stage.json)
is skipped; re-running after a failure resumes. Flags not listed below configure the student
(as in jobs/mtl.py); teachers share its encoder, data and scale settings. Prints every
stage's validation scores side by side at the end.
"""
import argparse
import sys

from raymtl.cli import add_config_args, config_from_args
from raymtl.config import MTLConfig
from raymtl.recipes import RECIPES
from raymtl.stages.pipeline import TEACHER_MARGIN, PipelinePlan, StageFailed, results_table

STUDENT_PRESETS = ["mtl", "hour"]       # the multi-task recipes (raymtl/recipes.py) a student can start from


def pipeline_defaults(preset: str = "mtl") -> MTLConfig:
    """The student's defaults (recipe ``preset``), with ``--output`` the directory of every stage's runs."""
    return RECIPES[preset]().replace(output=PipelinePlan.output, name=MTLConfig().run.name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p = parser.add_argument_group("pipeline")
    p.add_argument("--preset", default="mtl", choices=STUDENT_PRESETS,
                   help="the student's recipe (raymtl/recipes.py; teachers share its settings but their own "
                        "--teacher-steps); flags apply on top; default mtl")
    p.add_argument("--pipeline-output", dest="output", default=None, help="the older name of --output")
    p.add_argument("--pretrain-steps", type=int, default=0,
                   help="steps of further pre-training (raymtl/recipes.py: pretrain, its MLM head warmed up "
                        "first); default 0: no stage, since no pre-training choice measured raised the student "
                        "(bench/pretrain.py, docs/results/pretrain-s*.md); e.g. 200")
    p.add_argument("--pretrain-config", default="", metavar="FILE",
                   help="a JSON config of the pre-training stage (jobs/pretrain.py --config's format, e.g. "
                        "{\"mlm_weight\": 0.5, \"simcse_unsup_weight\": 1.0}) over raymtl/recipes.py's pretrain; "
                        "turns the stage on, for the file's steps unless --pretrain-steps is given")
    p.add_argument("--teacher-steps", type=int, default=None, help="steps per teacher; default 300 (smoke: 12)")
    p.add_argument("--teacher-tasks", default=None,
                   help="tasks that get a teacher and are distilled (comma-separated; default sst, the one "
                        "whose teacher beats the student here; sst,quora,sts for all)")
    p.add_argument("--baseline", action="store_true", help="also train the student without distillation "
                   "(always done when --teacher-margin > 0: the teachers are compared with it)")
    p.add_argument("--teacher-pair-mode", choices=["cross", "bi"], default="",
                   help="pair-task teachers as cross-encoders (distilled into the bi-encoder student) or "
                        "bi-encoders; default: the student's --pair-mode")
    p.add_argument("--teacher-margin", type=float, default=None,
                   help="distil a teacher only if it beats the student without distillation on its task by this "
                        f"much, relative (default {TEACHER_MARGIN}: 5 %%; 0 distils every teacher)")
    p.add_argument("--student-from-teacher", default=None, metavar="TASK",
                   help="start the students from this task's teacher checkpoint (its encoder and head: "
                        "intermediate-task training, STILTs) instead of the encoder; default sst when SST has "
                        "a teacher (SST + SST-2 + CFIMDB: SST +0.016, overall +0.004 on 3 seeds, docs/pipeline.md), '' for the encoder")
    p.add_argument("--force", nargs="*", metavar="STAGE", default=None,
                   help="redo these stages (no names: all) even if done before")
    add_config_args(parser)
    args = parser.parse_args(argv)
    try:
        student = config_from_args(args, defaults=lambda: pipeline_defaults(args.preset))
        teacher_tasks = (tuple(args.teacher_tasks.split(",")) if args.teacher_tasks else
                         tuple(t for t in ("sst",) if t in student.data.tasks) or student.data.tasks)
        plan = PipelinePlan(
            student, output=student.run.output,
            pretrain_steps=min(args.pretrain_steps, 6) if args.smoke else args.pretrain_steps,
            pretrain_config=args.pretrain_config,
            teacher_steps=args.teacher_steps or (student.train.steps if args.smoke else 300),
            teacher_tasks=teacher_tasks,
            baseline=args.baseline, smoke=args.smoke, teacher_pair_mode=args.teacher_pair_mode,
            teacher_margin=TEACHER_MARGIN if args.teacher_margin is None else args.teacher_margin,
            student_from_teacher=(("sst" if "sst" in teacher_tasks else "") if args.student_from_teacher is None
                                  else args.student_from_teacher))
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    force = True if args.force == [] else set(args.force or ())
    try:
        results = plan.run(force=force)
    except StageFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("\n[raymtl] pipeline validation scores (teachers: their own task only)")
    print(results_table(results))
    print(f"[raymtl] final checkpoint: {results['mtl']['checkpoint']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
