"""Further pre-training: MLM + SimCSE on WikiText and NLI, on Ray Train + DeepSpeed, before
multi-task fine-tuning. Same training loop, reporting and checkpoints as jobs/mtl.py.

    python jobs/pretrain.py                      # default encoder, 100 steps, ~25 min on a 2-core CPU
    python jobs/pretrain.py --smoke              # same code path, tiny random BERT, ~1 min
    python jobs/pretrain.py --steps 40 --eval-every 20 --log-every 5 --output /tmp/pretrain_run
                                                 # the README's run: 12.5 min, zero-shot STS 0.833 -> 0.840
    python jobs/pretrain.py --head-warmup-steps 100   # train the fresh MLM head alone first (encoder frozen)
    python jobs/mtl.py --init-from CKPT          # fine-tune the result (fresh task heads)

First run: reads wikitext-2/{valid,test}.txt and nli/{snli,mnli}.jsonl from the data
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
