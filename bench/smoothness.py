"""Sharpness-aware minimisation and SMART's smoothness regulariser at equal wall-clock time: does
a flatter or smoother model pay for the extra forwards and backwards of every step?

    .venv/bin/python bench/smoothness.py                          # default, SAM rho 0.05, SMART weight 1; seed 42
    .venv/bin/python bench/smoothness.py --rhos "" --smart-weights 1,3 --seed 1
    .venv/bin/python bench/smoothness.py --smoke                  # tiny model, ~1.5 min

The default run (``MTLConfig()``: 300 round-robin steps) first, then one run per ``--rhos``
value with ``--sam-rho`` on ``--sam-steps-factor`` x the steps (0.5: a SAM step runs every
forward and backward twice) and one per ``--smart-weights`` value with ``--smart-weight`` on
``--smart-steps-factor`` x the steps (0.25: a SMART step took 4.0x a default step here, 6.9
against 1.7 s; docs/results/smoothness-s1.md), validation and warm-up scaled alike, so each
takes about the default's time. Every run validates three times and keeps its
best checkpoint, as the default does. It reports the best validation scores, the training time
(the steps x the measured seconds per step, validation left out) and the wall time, so whether
the times really matched is read off the table, and writes ``docs/results/smoothness-s<seed>.md``.
A run that finished before under --output is read back; the default run is named as
``bench/sampling.py`` names its round-robin run (``round_robin-s<seed>``, the same config), so
with that bench's output (the default here) one bench reads the other's default back.
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
    p.add_argument("--rhos", default="0.05", help="comma-separated SAM radii (each > 0; empty for none)")
    p.add_argument("--smart-weights", default="1", help="comma-separated SMART weights (each > 0; empty for none)")
    p.add_argument("--sam-steps-factor", type=float, default=0.5, help="a SAM run's steps, as a share of the default's")
    p.add_argument("--smart-steps-factor", type=float, default=0.25,
                   help="a SMART run's steps, as a share of the default's")
    p.add_argument("--seed", type=int, default=42, help="training seed (the split seed stays the config's)")
    p.add_argument("--output", default="runs/bench-sampling", help="(shared with bench/sampling.py)")
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args(argv)
    values = {}
    for flag, text in (("--rhos", a.rhos), ("--smart-weights", a.smart_weights)):
        try:
            values[flag] = [float(v) for v in text.split(",") if v.strip()]
        except ValueError:
            p.error(f"{flag} {text!r}: comma-separated numbers")
        if any(v <= 0 for v in values[flag]):
            p.error(f"{flag} {text!r}: every value must be > 0")
    if not (0 < a.sam_steps_factor <= 1 and 0 < a.smart_steps_factor <= 1):
        p.error("--sam-steps-factor and --smart-steps-factor must be in (0, 1]")
    base = (smoke() if a.smoke else MTLConfig()).replace(output=str(Path(a.output).resolve()), seed=a.seed)
    tasks, steps = base.data.tasks, base.train.steps
    runs = [("default", base.replace(name=f"round_robin-s{a.seed}", eval_every=max(1, steps // 3)))]   # = bench/sampling.py's
    for label, field, short, factor, flag in (("SAM rho", "sam_rho", "sam", a.sam_steps_factor, "--rhos"),
                                              ("SMART weight", "smart_weight", "smart", a.smart_steps_factor,
                                               "--smart-weights")):
        n = max(3, round(steps * factor))
        for v in values[flag]:
            runs.append((f"{label} {v:g}", base.replace(**{field: v}, steps=n, eval_every=max(1, n // 3),
                                                        name=f"{short}{v:g}-{n}steps-s{a.seed}")))
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
    report.publish(lines, f'smoothness-s{a.seed}', 'SAM and SMART at equal wall-clock time (bench/smoothness.py)', 'bench/smoothness.py', argv, started, a.smoke)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
