"""Multi-task fine-tuning: one encoder, heads for SST, Quora and STS, on Ray Train + DeepSpeed.

    python jobs/mtl.py                       # the measured default recipe, 12-13 min on a 2-core CPU
    python jobs/mtl.py --smoke               # same code path, tiny model, < 2 min
    python jobs/mtl.py --preset single-sst   # a single-task baseline (raymtl/recipes.py lists them)
    ray job submit --working-dir . -- python jobs/mtl.py --num-workers 4 --use-gpu --precision bf16

Prints progress (step, examples/s, ETA, per-task losses), the validation table of the
best checkpoint (SST accuracy, Quora accuracy, STS Pearson, overall) and its path.
Re-running with the same --output and --name resumes from the last checkpoint.
"""
import argparse
import sys

from raymtl.cli import add_config_args, fit_job
from raymtl.recipes import RECIPES

PRESETS = ["mtl", "hour", "single-sst", "single-quora", "single-sts"]     # the multi-task stage's recipes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mtl", choices=PRESETS,
                        help="the recipe to start from (raymtl/recipes.py); flags apply on top; default mtl")
    add_config_args(parser)
    args = parser.parse_args(argv)
    return fit_job(parser, args, defaults=RECIPES[args.preset])


if __name__ == "__main__":
    sys.exit(main())
