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

from raymtl.cli import add_config_args, config_from_args
from raymtl.data.readers import DataError
from raymtl.recipes import RECIPES
from raymtl.train.trainer import fit

PRESETS = ["mtl", "single-sst", "single-quora", "single-sts"]     # the multi-task stage's recipes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mtl", choices=PRESETS,
                        help="the recipe to start from (raymtl/recipes.py); flags apply on top; default mtl")
    add_config_args(parser)
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args, defaults=RECIPES[args.preset])
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    print(f"[raymtl] config: {cfg.flat()}", flush=True)
    try:
        summary = fit(cfg)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if summary.best_checkpoint else 1


if __name__ == "__main__":
    sys.exit(main())
