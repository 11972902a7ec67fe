"""A teacher for one task: trained on the task plus related data, then its outputs on every
training row written once (Ray Data batch inference) for distillation into the student.

    python jobs/teacher.py --task sst        # SST + SST-2 phrases + CFIMDB, 300 steps, ~8 min here
    python jobs/teacher.py --task quora      # Quora + MRPC
    python jobs/teacher.py --task sts        # STS + SICK (relatedness rescaled to 0-5)
    python jobs/teacher.py --task sst --related-sets sst2,mr --encoder bert-base-uncased
    python jobs/mtl.py --teacher-outputs sst=runs/teacher-sst/outputs,sts=runs/teacher-sts/outputs

Same training loop, flags, progress and checkpoints as jobs/mtl.py, with one task: the target
task's rows and its related rows (labels mapped into the task's label space, see
raymtl/related.py) are two streams of the same head. Validation is on the task's own split.
Prints the teacher's validation score, its checkpoint and its outputs directory.
"""
import argparse
import sys

from raymtl import recipes
from raymtl.cli import add_config_args, config_from_args
from raymtl.data.readers import DataError
from raymtl.data.related import DEFAULT_RELATED
from raymtl.stages.pipeline import run_teacher, teacher_config
from raymtl.tasks import TASKS


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=sorted(TASKS), help="the teacher's target task")
    add_config_args(parser)
    args = parser.parse_args(argv)
    if args.tasks:
        parser.error("a teacher has one task: use --task, not --tasks")
    related = args.related_sets
    args.related_sets = None
    try:
        cfg = teacher_config(config_from_args(args, defaults=recipes.teacher), args.task,
                             DEFAULT_RELATED.get(args.task, ()) if related is None else related)
        if args.name:
            cfg = cfg.replace(name=args.name)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    print(f"[raymtl] config: {cfg.flat()}", flush=True)
    try:
        result = run_teacher(cfg)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[raymtl] teacher checkpoint: {result['checkpoint']}")
    print(f"[raymtl] teacher outputs: {result['outputs']}")
    print(f"[raymtl] distil it: python jobs/mtl.py --teacher-outputs {args.task}={result['outputs']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
