"""Peak memory per worker for DeepSpeed ZeRO stages 0-3 with 2 Ray Train workers.

    .venv/bin/python bench/memory.py             # default encoder, 2 CPU workers, ~8 min here
    .venv/bin/python bench/memory.py --smoke     # tiny model, ~3 min

Each stage is a short real run of the multi-task loop on the summed loss (`--fusion sum`:
ZeRO-3 partitions the gradients that fusion needs; same data, batches and seed; only
`--zero-stage` changes). Every worker reports its peak resident memory (`ru_maxrss`) and
the loop reports the largest; the table sets it next to the per-worker bytes of weights,
gradients and AdamW state that the stage keeps in theory (fp32: 4 + 4 + 8 bytes per
parameter, of which ZeRO-1 partitions the 8, ZeRO-2 also the gradient 4, ZeRO-3 all 16),
and the saving against stage 0 measured in the same run.
"""
import argparse

from raymtl.config import PLAIN_ENCODER, SUM_LOSS, MTLConfig, smoke
from raymtl.models.multitask import MultiTaskModel
from raymtl.train.trainer import fit


def state_bytes_per_worker(params: int, stage: int, workers: int) -> float:
    """fp32 weights (4 B), gradients (4 B) and AdamW moments (8 B) held by one worker."""
    weights, grads, optim = 4 * params, 4 * params, 8 * params
    if stage >= 1:
        optim /= workers
    if stage >= 2:
        grads /= workers
    if stage >= 3:
        weights /= workers
    return weights + grads + optim


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--stages", default="0,1,2,3")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--output", default="runs/bench-memory")
    a = p.parse_args(argv)
    base = (smoke() if a.smoke else MTLConfig()).replace(
        num_workers=2, cpus_per_worker=0.9, steps=a.steps, eval_every=a.steps, log_every=a.steps,
        max_rows=600, batch_size=16, output=a.output, **SUM_LOSS, **PLAIN_ENCODER)   # ZeRO-3 needs the summed loss; as measured
    params = sum(q.numel() for q in MultiTaskModel.from_config(base.model, list(base.data.tasks)).parameters())
    rows = []
    for stage in (int(s) for s in a.stages.split(",")):
        s = fit(base.replace(zero_stage=stage, name=f"zero{stage}"), verbose=False)
        rows.append((stage, s.metrics["peak_rss_mb"], state_bytes_per_worker(params, stage, 2) / 2**20))
    ref = rows[0][1]
    print(f"\nmodel: {params / 1e6:.1f} M parameters; 2 workers; fp32")
    print(f"{'ZeRO':>4} {'peak RSS/worker MB':>19} {'vs first':>9} {'state/worker MB (theory)':>24}")
    for stage, rss, theory in rows:
        print(f"{stage:>4} {rss:>19.0f} {rss / ref:>8.2f}x {theory:>24.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
