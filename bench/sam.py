"""Sharpness-aware minimisation at equal wall-clock time: does a flatter minimum pay for the
second forward and backward of every step?

    .venv/bin/python bench/sam.py                          # the default, then SAM rho 0.05; seed 42, ~32 min here
    .venv/bin/python bench/sam.py --rhos 0.02,0.05 --seed 2
    .venv/bin/python bench/sam.py --smoke                  # tiny model, ~1 min

The default run (``MTLConfig()``: 300 steps) first, then one run per ``--rhos`` value with
``--sam-rho`` and ``--steps-factor`` x the steps (default 0.5: a SAM step runs every forward
and backward twice, so half the steps take about the default's time), its validation and
warm-up scaled alike. Every run validates three times and keeps its best checkpoint, as the
default does. It reports the best validation scores, the training time (the steps x the
measured seconds per step, validation left out) and the wall time, so whether the times
really matched is read off the table, and writes ``docs/results/sam-s<seed>.md``. A run that
finished before under --output is read back; the default run is named as ``bench/sampling.py``
names its round-robin run (``round_robin-s<seed>``, the same config), so with that bench's
output (the default here) one bench reads the other's default back instead of retraining it.
"""
import argparse
import sys
import time
from pathlib import Path

from raymtl.analysis.metrics import overall
from raymtl.config import MTLConfig, smoke
from raymtl.train.trainer import fit_once

sys.path.insert(0, str(Path(__file__).resolve().parent))    # bench/report.py, also when loaded by path
import report  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rhos", default="0.05", help="comma-separated SAM radii (each > 0)")
    p.add_argument("--steps-factor", type=float, default=0.5, help="a SAM run's steps, as a share of the default's")
    p.add_argument("--seed", type=int, default=42, help="training seed (the split seed stays the config's)")
    p.add_argument("--output", default="runs/bench-sampling", help="(shared with bench/sampling.py)")
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args(argv)
    try:
        rhos = [float(r) for r in a.rhos.split(",")]
    except ValueError:
        p.error(f"--rhos {a.rhos!r}: comma-separated numbers")
    if min(rhos) <= 0 or not 0 < a.steps_factor <= 1:
        p.error("--rhos must be > 0 and --steps-factor in (0, 1]")
    base = (smoke() if a.smoke else MTLConfig()).replace(output=str(Path(a.output).resolve()), seed=a.seed)
    tasks, steps = base.data.tasks, base.train.steps
    runs = [("default", base.replace(name=f"round_robin-s{a.seed}", eval_every=max(1, steps // 3)))]   # = bench/sampling.py's
    for rho in rhos:
        n = max(3, round(steps * a.steps_factor))
        runs.append((f"SAM rho {rho:g}", base.replace(sam_rho=rho, steps=n, eval_every=max(1, n // 3),
                                                      name=f"sam{rho:g}-{n}steps-s{a.seed}")))
    started, rows = report.now(), []
    for label, cfg in runs:
        t0 = time.perf_counter()
        m = fit_once(cfg)
        wall = time.perf_counter() - t0
        rows.append((label, cfg.train.steps, m, wall))
        print(f"[bench] {label}: " + " ".join(f"{t}={m[f'val_{t}']:.4f}" for t in tasks)
              + f" overall={overall({t: m[f'val_{t}'] for t in tasks}):.4f} ({wall / 60:.1f} min)", flush=True)
    lines = [f"{base.model.encoder} encoder, seed {a.seed} (split seed {base.data.split_seed}), "
             f"{base.train.batch_size} rows per task per step; the best of three validations per run. "
             "Training min: steps x the seconds per step measured at the best checkpoint's validation window "
             "(start-up steps and validation left out); wall min: the whole run with start-up and validation "
             "(a run read back from an earlier one shows its read-back time)", "",
             "| run | steps | SST acc | Quora acc | STS Pearson | overall | best step | training min | wall min |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, n, m, wall in rows:
        lines.append(f"| {label} | {n} | " + " | ".join(f"{m[f'val_{t}']:.4f}" for t in tasks)
                     + f" | {overall({t: m[f'val_{t}'] for t in tasks}):.4f} | {m['step']} | "
                     f"{n * m['s_per_step'] / 60:.1f} | {wall / 60:.1f} |")
    print("\n" + "\n".join(lines))
    if not a.smoke:
        print(f"[bench] written to {report.write(f'sam-s{a.seed}', 'SAM at equal wall-clock time (bench/sam.py)', 'bench/sam.py', argv if argv is not None else sys.argv[1:], started, lines)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
