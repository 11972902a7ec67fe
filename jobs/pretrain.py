"""Further pre-training: MLM + SimCSE on WikiText and NLI, on Ray Train + DeepSpeed, before
multi-task fine-tuning. Same training loop, reporting and checkpoints as jobs/mtl.py.

    python jobs/pretrain.py                      # default encoder: MLM head warm-up (100 steps), then MLM +
                                                 # supervised SimCSE, 200 steps; ~12 min on a 2-core CPU
    python jobs/pretrain.py --mlm-weight 0 --head-warmup-steps 0   # supervised SimCSE alone: 3.5 min, the same zero-shot STS
    python jobs/pretrain.py --smoke              # same code path, tiny random BERT, ~1 min
    python jobs/mtl.py --init-from CKPT          # fine-tune the result (fresh task heads)

With --head-warmup-steps N (default 100; the encoder has no MLM head, so a fresh one is
created), a first run of N steps trains the head alone, the encoder frozen (OUTPUT/NAME-head),
and the stage starts from it. First run: reads wikitext-2/{valid,test}.txt and nli/{snli,mnli}.jsonl from the data
directory, reports every line it does not use (file:line, by reason), tokenizes in one Ray
Data pass and caches Parquet shards under --shard-cache (a second run reuses them). Prints
progress (step, examples/s, ETA, loss per objective), then held-out Wiki MLM loss/perplexity
and zero-shot STS Pearson (validation split of sts/train.csv, carved as jobs/mtl.py carves
it) before and after the stage, and the checkpoint path. Objectives and their weights:
--mlm-weight, --simcse-unsup-weight, --simcse-sup-weight (0 turns one off).
"""
import argparse
import sys

from raymtl import recipes
from raymtl.cli import add_config_args, fit_job
from raymtl.stages.pretrain import PretrainJobConfig, pretrain_smoke


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, PretrainJobConfig.SECTIONS)
    args = parser.parse_args(argv)
    return fit_job(parser, args, defaults=recipes.pretrain, shrink=pretrain_smoke)


if __name__ == "__main__":
    sys.exit(main())
