"""Why one task can starve in a summed multi-task step: per-task gradient norms on the encoder.

    .venv/bin/python bench/grad_norms.py            # default encoder, 3 batches of 32 rows per task, ~1 min
    .venv/bin/python bench/grad_norms.py --smoke    # tiny model, seconds

For fresh heads on the encoder (the start of multi-task fine-tuning), it prints each task's
loss and the norm of its gradient with respect to the shared encoder, then, for the mean
per-task gradients of those batches, the direction every fusion method takes: its cosine to
each task's gradient. A task whose gradient is much smaller than another's hardly moves the
direction of a plain sum (and global clipping scales every task down by the largest one).
In-process, no Ray: it only measures gradients.
"""
import argparse
import random

import torch

from raymtl.analysis.evaluation import row_batches
from raymtl.config import MTLConfig, smoke
from raymtl.data.multitask import load_splits
from raymtl.methods.fusion import make_fusion, task_gradients
from raymtl.models.encoder import tokenizer_source
from raymtl.models.multitask import MultiTaskModel
from raymtl.objectives.multitask import task_loss
from raymtl.recipes import PLAIN_ENCODER


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--fusions", default="sum,pcgrad,upgrad,imtl_g")
    a = p.parse_args(argv)
    cfg = (smoke() if a.smoke else MTLConfig()).replace(**PLAIN_ENCODER)   # the shared encoder's gradients
    from transformers import AutoTokenizer
    torch.manual_seed(cfg.train.seed)
    splits, _ = load_splits(cfg.data)
    tasks = list(cfg.data.tasks)
    model = MultiTaskModel.from_config(cfg.model, tasks, seed=cfg.train.seed)
    model.train()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source(cfg.model.encoder))
    shared = [p for n, p in model.named_parameters() if n.startswith("encoder.") and p.requires_grad]
    rng = random.Random(cfg.train.seed)
    mean_grads = []
    print(f"{cfg.model.encoder} encoder, fresh heads, {a.batches} batches x {cfg.train.batch_size} rows per task\n")
    print("| task | loss per batch | encoder gradient norm per batch |")
    print("|---|---|---|")
    for t in tasks:
        rows = rng.sample(splits[t][0], min(a.batches * cfg.train.batch_size, len(splits[t][0])))
        losses, norms, mean = [], [], None
        for b in row_batches(model, tokenizer, t, rows, cfg.data.max_length, cfg.train.batch_size):
            loss = task_loss(model.heads[t].kind, model(t, b), b)
            g = task_gradients({t: loss}, shared)[0]
            losses.append(loss.item())
            norms.append(g.norm().item())
            mean = g if mean is None else mean + (g - mean) / len(norms)
        mean_grads.append(mean)
        print(f"| {t} | " + ", ".join(f"{x:.3f}" for x in losses) + " | " + ", ".join(f"{x:.2f}" for x in norms) + " |")
    G = torch.stack(mean_grads)
    print("\nfused direction of the mean task gradients: cosine to each task's gradient\n")
    print("| fusion | fused norm | " + " | ".join(f"cos to {t}" for t in tasks) + " |")
    print("|---|---|" + "---|" * len(tasks))
    for name in a.fusions.split(","):
        d = make_fusion(name, len(tasks))(G)
        cos = [torch.nn.functional.cosine_similarity(d, g, 0).item() for g in G]
        print(f"| {name} | {d.norm():.2f} | " + " | ".join(f"{c:+.3f}" for c in cos) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
