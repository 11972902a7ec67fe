"""Step-time overhead of each gradient-fusion method relative to plain `sum`.

    .venv/bin/python bench/fusion.py            # default encoder, ~2 min on 2 CPU cores
    .venv/bin/python bench/fusion.py --smoke    # tiny model, seconds

Runs the loop's own step (forward per task, `fused_surrogate` for per-task gradients and
fusion, backward, AdamW) in-process on fixed real batches (3 tasks x 32 rows), methods
interleaved round after round so machine noise hits all alike; prints median seconds per
step and the ratio to `sum` (plain `backward(sum(losses))`) measured in the same run.
"""
import argparse
import random
import statistics
import time

import torch

from raymtl.config import MTLConfig, smoke
from raymtl.data.multitask import batch_from_rows, load_splits
from raymtl.methods.fusion import FUSION_METHODS, fused_surrogate, make_fusion
from raymtl.models.encoder import tokenizer_source
from raymtl.models.multitask import MultiTaskModel
from raymtl.objectives.multitask import LOSSES
from raymtl.recipes import PLAIN_ENCODER


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    a = p.parse_args(argv)
    cfg = (smoke() if a.smoke else MTLConfig()).replace(**PLAIN_ENCODER)   # as measured: the plain encoder
    rounds = 2 if a.smoke else a.rounds
    torch.set_num_threads(2)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tokenizer_source(cfg.model.encoder))
    splits, _ = load_splits(cfg.data)
    model = MultiTaskModel.from_config(cfg.model, list(cfg.data.tasks))
    rng = random.Random(0)
    batches = {t: batch_from_rows(tok, rng.sample(train, a.batch_size), model.modes[t], cfg.data.max_length)
               for t, (train, _) in splits.items()}
    shared = [p for n, p in model.named_parameters() if n.startswith("encoder.")]
    heads = [p for n, p in model.named_parameters() if not n.startswith("encoder.")]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    methods = ["plain"] + sorted(FUSION_METHODS)
    fusers = {m: make_fusion(m, len(batches)) for m in methods if m != "plain"}

    def step(method):
        losses = {t: LOSSES[model.heads[t].kind](model(t, b), b["label"]) for t, b in batches.items()}
        if method == "plain":
            sum(losses.values()).backward()
        else:
            fused_surrogate(losses, shared, heads, fusers[method]).backward()
        opt.step()
        opt.zero_grad()

    times = {m: [] for m in methods}
    for m in methods:  # warm-up (and cvxpy problem construction)
        step(m)
    for _ in range(rounds):
        for m in methods:
            t0 = time.perf_counter()
            step(m)
            times[m].append(time.perf_counter() - t0)
    base = statistics.median(times["plain"])
    print(f"{'method':<10} {'s/step (median)':>16} {'vs plain sum':>13} {'spread':>14}")
    for m in methods:
        med = statistics.median(times[m])
        print(f"{m:<10} {med:>16.3f} {med / base:>12.2f}x {min(times[m]) / base:>6.2f}-{max(times[m]) / base:.2f}x")


if __name__ == "__main__":
    main()
