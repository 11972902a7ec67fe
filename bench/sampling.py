"""Task sampling at equal compute: every task in every step, or one task per step?

    .venv/bin/python bench/sampling.py                     # 4 samplers, seed 42, ~12 min each here
    .venv/bin/python bench/sampling.py --samplers round_robin,temperature --seed 2
    .venv/bin/python bench/sampling.py --samplers round_robin,temperature --seed 2 --single-task
    .venv/bin/python bench/sampling.py --smoke             # tiny model, ~1 min

``round_robin`` (``MTLConfig``'s; the ``mtl`` recipe samples by ``temperature``) puts one batch of every task into each step; the other
samplers (``raymtl.methods.sampling``) draw one task per step, so they get ``len(tasks)``
times the steps for the same number of batches (the same compute, the same total rows);
only how those batches are spread over the tasks differs: ``proportional`` to the
training rows (Quora gets most), ``temperature`` (p ∝ n^(1/T)), ``annealed`` (from
proportional towards uniform). Every run validates three times and keeps its best
checkpoint, as the default does. ``--single-task`` adds the three single-task models
(``--preset single-<task>``, same seed: each its own task's batches of a round-robin run, so
the three together train the same batches). It reports the best validation scores, the batches each
task got (from the sampler's own draws) and the wall time, and writes
``docs/results/sampling-s<seed>.md``. A run that finished before under --output is read back.
"""
import argparse
import random
import sys
import time
from pathlib import Path

from raymtl.analysis.metrics import overall
from raymtl.config import MTLConfig, smoke
from raymtl.data.multitask import load_splits
from raymtl.methods.sampling import SAMPLERS, get_sampler
from raymtl.recipes import single_task
from raymtl.train.trainer import fit_once

sys.path.insert(0, str(Path(__file__).resolve().parent))    # bench/report.py, also when loaded by path
import report  # noqa: E402


def batches_per_task(cfg: MTLConfig, sizes: dict[str, int]) -> dict[str, int]:
    """The batches each task gets in ``cfg``'s run: the loop's sampler replayed with its seed."""
    sampler, rng = get_sampler(cfg.train.sampling, cfg.train.sampling_temperature), random.Random(cfg.train.seed)
    got = dict.fromkeys(sizes, 0)
    for step in range(cfg.train.steps):
        for t in sampler(sizes, step, cfg.train.steps, rng):
            got[t] += 1
    return got


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samplers", default=",".join(SAMPLERS), help=f"comma-separated, of {sorted(SAMPLERS)}")
    p.add_argument("--seed", type=int, default=42, help="training seed (the split seed stays the config's)")
    p.add_argument("--output", default="runs/bench-sampling")
    p.add_argument("--single-task", action="store_true", help="add the three single-task models' row")
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args(argv)
    names = a.samplers.split(",")
    unknown = [n for n in names if n not in SAMPLERS]
    if unknown:
        p.error(f"--samplers: unknown {unknown}; valid: {sorted(SAMPLERS)}")
    base = (smoke() if a.smoke else MTLConfig()).replace(output=str(Path(a.output).resolve()), seed=a.seed)
    tasks, steps = base.data.tasks, base.train.steps
    sizes = {t: len(train) for t, (train, *_) in load_splits(base.data)[0].items()}    # training rows per task
    started, rows = report.now(), []
    for name in names:
        k = 1 if name == "round_robin" else len(tasks)          # one task per step: k times the steps
        cfg = base.replace(sampling=name, steps=steps * k, eval_every=max(1, steps * k // 3), name=f"{name}-s{a.seed}")
        t0 = time.perf_counter()
        m = fit_once(cfg)
        wall = time.perf_counter() - t0
        got = batches_per_task(cfg, sizes) if name != "round_robin" else None
        rows.append((name, cfg.train.steps, got, m, wall))
        print(f"[bench] {name}: " + " ".join(f"{t}={m[f'val_{t}']:.4f}" for t in tasks)
              + f" overall={overall({t: m[f'val_{t}'] for t in tasks}):.4f} ({wall / 60:.1f} min)", flush=True)
    if a.single_task:
        t0, single = time.perf_counter(), {}
        for t in tasks:
            cfg = single_task(t)()
            cfg = (smoke(cfg) if a.smoke else cfg).replace(output=base.run.output, seed=a.seed, steps=steps,
                                                           eval_every=max(1, steps // 3), name=f"single-{t}-s{a.seed}")
            single[f"val_{t}"] = fit_once(cfg)[f"val_{t}"]
        rows.append(("single-task (3 models)", steps, None, {**single, "step": "-"}, time.perf_counter() - t0))
        print("[bench] single-task: " + " ".join(f"{t}={single[f'val_{t}']:.4f}" for t in tasks)
              + f" overall={overall({t: single[f'val_{t}'] for t in tasks}):.4f}", flush=True)
    lines = [f"{base.model.encoder} encoder, seed {a.seed} (split seed {base.data.split_seed}); "
             f"{steps} round-robin steps = {steps * len(tasks)} one-task steps, {base.train.batch_size} rows "
             "per batch; the best of three validations per run; wall time includes start-up and validation "
             "(a run read back from an earlier one shows its read-back time)", "",
             "| sampler | steps | batches SST / Quora / STS | SST acc | Quora acc | STS Pearson | overall | best step | wall min |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, n, got, m, wall in rows:
        share = " / ".join(str(got[t]) if got else str(n) for t in tasks)
        lines.append(f"| {name} | {n} | {share} | " + " | ".join(f"{m[f'val_{t}']:.4f}" for t in tasks)
                     + f" | {overall({t: m[f'val_{t}'] for t in tasks}):.4f} | {m['step']} | {wall / 60:.1f} |")
    report.publish(lines, f'sampling-s{a.seed}', 'Task sampling at equal compute (bench/sampling.py)', 'bench/sampling.py', argv, started, a.smoke)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
