"""One target task trained with a transfer strategy (Weller, Seppi & Gardner 2022).

    python jobs/transfer.py --target sts --support quora --strategy auto     # says which it chose and why
    python jobs/transfer.py --target sst --support sts --strategy stilts     # STS alone, then SST from it
    python jobs/transfer.py --target sts --support quora --strategy pairwise # STS + Quora jointly
    python jobs/transfer.py --target sts --strategy mtl_all                  # all tasks jointly (= jobs/mtl.py)
    python jobs/transfer.py --smoke --target sts --support quora --strategy stilts   # tiny model, ~2 min

Strategies (raymtl/transfer.py): ``mtl_all``, ``pairwise`` (target + support jointly), ``stilts``
(support alone for --steps, then the target alone for --steps from its best checkpoint) and
``auto``: pairwise when the target has fewer training rows than the support, else stilts
(here: SST 7,690, Quora 20,044, STS 5,436 rows, so auto picks pairwise for sst<-quora,
sts<-sst and sts<-quora, stilts for the other three pairs). Expected runtime on the 2-core CPU,
from the 2.1 s per three-task step measured for jobs/mtl.py (not timed for these jobs):
≈ 7 min per 300-step two-task run, ≈ 4 min per one-task run, plus Ray start-up per run.

Every flag of jobs/mtl.py configures the runs (--steps, --batch-size, --encoder, ...). Runs go to
OUTPUT/<run>/<key>/ (default --output runs/transfer); a run already finished with the same
config and data is read back, not retrained. Prints the target's validation metric (accuracy,
or Pearson for STS) of the last run's best checkpoint, and every run's checkpoint.
"""
import argparse
import sys

from raymtl import recipes
from raymtl.cli import add_config_args, config_from_args
from raymtl.data.readers import DataError
from raymtl.stages.pipeline import StageFailed
from raymtl.stages.transfer import CHOICES, run_strategy
from raymtl.tasks import TASKS


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    t = parser.add_argument_group("transfer")
    t.add_argument("--target", required=True, choices=list(TASKS), help="the task whose score counts")
    t.add_argument("--support", choices=list(TASKS), help="the supporting task (pairwise, stilts, auto)")
    t.add_argument("--strategy", default="auto", choices=CHOICES, help="how the support is used (default auto)")
    add_config_args(parser)
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args, defaults=recipes.transfer)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    print(f"[raymtl] config: {cfg.flat()}", flush=True)
    try:
        out = run_strategy(cfg, args.strategy, args.target, args.support)
    except (DataError, StageFailed) as e:          # DataError first: it is a ValueError too
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:                         # a strategy that does not fit the arguments
        parser.error(str(e))
    for name, run in out.runs.items():
        print(f"[raymtl] run {name}: best checkpoint {run['checkpoint']}")
    print(f"[raymtl] strategy {out.strategy} ({out.reason})")
    print(f"[raymtl] {args.target} validation {TASKS[args.target].metric}: {out.score:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
