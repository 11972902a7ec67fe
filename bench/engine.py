"""What raymtl's DeepSpeed engine costs per step, in one process without Ray.

    .venv/bin/python bench/engine.py            # default encoder, 4 rounds x 6 steps per loop, ~8 min here
    .venv/bin/python bench/engine.py --smoke    # tiny model, seconds

bench/speed.py compares raymtl's whole Ray Train + DeepSpeed loop with plain PyTorch loops.
This script takes Ray away and splits the rest: the same fixed real batches (3 tasks x 32
rows, fp32, dropout on) through four steps, interleaved round after round:

* plain:          forward, ``backward(sum(losses))``, ``clip_grad_norm_``, torch AdamW
                  (its default multi-tensor kernel, as in bench/speed.py's plain loops);
* plain-fused:    the same with ``AdamW(fused=True)``, the optimizer raymtl configures on CPU;
* engine:         raymtl's DeepSpeed engine (``raymtl.train.engine.initialize``, the config every
                  run gets): ``engine(...)``, ``engine.backward``, ``engine.step`` (clipping,
                  AdamW, LR schedule);
* engine-module:  the same engine, forward through ``engine.module`` (the fusion path).

Prints the median seconds per step and the ratio to ``plain`` measured in the same run.
DeepSpeed needs a process group: a 1-process gloo group on 127.0.0.1.
"""
import argparse
import os
import random
import statistics
import time

import torch

from raymtl.config import MTLConfig, smoke
from raymtl.data.multitask import batch_from_rows, load_splits
from raymtl.models.encoder import tokenizer_source
from raymtl.models.multitask import MultiTaskModel
from raymtl.objectives.multitask import task_loss
from raymtl.recipes import PLAIN_ENCODER, SUM_LOSS
from raymtl.train.engine import initialize, param_groups


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=6, help="steps per loop per round (the first is not timed)")
    p.add_argument("--port", type=int, default=29571, help="port of the 1-process gloo group")
    a = p.parse_args(argv)
    cfg = (smoke() if a.smoke else MTLConfig()).replace(batch_size=32, steps=1000, **SUM_LOSS, **PLAIN_ENCODER)
    rounds, steps = (2, 3) if a.smoke else (a.rounds, a.steps)
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(a.port)}.items():
        os.environ.setdefault(k, v)
    torch.set_num_threads(max(1, int(cfg.scale.cpus_per_worker)))
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tokenizer_source(cfg.model.encoder))
    splits, _ = load_splits(cfg.data)
    rng = random.Random(0)

    def fresh():
        m = MultiTaskModel.from_config(cfg.model, list(cfg.data.tasks), seed=cfg.train.seed)
        return m.train()
    engine_model = fresh()
    batches = {t: batch_from_rows(tok, rng.sample(train, cfg.train.batch_size), engine_model.modes[t],
                                  cfg.data.max_length) for t, (train, _) in splits.items()}

    def plain(fused: bool):
        model = fresh()
        groups, lrs = param_groups(model, cfg)
        opt = torch.optim.AdamW([{**g, "lr": lr} for g, lr in zip(groups, lrs)], fused=fused)

        def step():
            sum(task_loss(model.heads[t].kind, model(t, b), b) for t, b in batches.items()).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    engine = initialize(engine_model, cfg)

    def through(forward):
        def step():
            engine.backward(sum(task_loss(engine.module.heads[t].kind, forward(t, b), b) for t, b in batches.items()))
            engine.step()
        return step

    loops = {"plain": plain(False), "plain-fused": plain(True), "engine": through(engine),
             "engine-module": through(engine.module)}
    times = {name: [] for name in loops}
    for _ in range(rounds):
        for name, step in loops.items():
            step()                                   # not timed: the first step after a switch
            for _ in range(steps - 1):
                t0 = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["plain"])
    print(f"\nencoder={cfg.model.encoder}, 3 tasks x {cfg.train.batch_size} rows, fp32, "
          f"{rounds} rounds x {steps - 1} timed steps per loop\n")
    print("| loop | s/step (median) | vs plain | spread (min–max ratio) |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.3f} | {med / base:.2f}x | {min(ts) / base:.2f}–{max(ts) / base:.2f}x |")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
