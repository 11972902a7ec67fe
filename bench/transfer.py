"""Pairwise MTL, STILTs or all tasks at once: which wins for each target task, on the same budget,
next to what the size heuristic of Weller, Seppi & Gardner 2022 (arXiv 2205.08124) predicts.

    .venv/bin/python bench/transfer.py                        # default encoder, 300 steps per run, 13 runs
    .venv/bin/python bench/transfer.py --steps 100            # a cheaper look
    .venv/bin/python bench/transfer.py --smoke                # tiny random BERT, same code path
    .venv/bin/python bench/transfer.py --smoke --targets sts --supports quora   # 4 runs (tests/test_bench.py)

For every target in --targets and every other task in --supports it trains (raymtl/transfer.py)
``pairwise`` (target + support jointly), ``stilts`` (support alone, then the target alone from its
checkpoint) and, per target, ``mtl_all`` (all three tasks jointly), each with --steps steps of
--batch-size rows per task per step: the target always trains on steps x batch_size rows, and so
does the support. Runs that are the same training are shared (one mtl_all run, one pairwise run
per pair of tasks, one support run per supporting task): 13 runs for the full table. Every run
validates only at its end (eval_every = steps), so no strategy picks its best step.

Prints a markdown table: target, support, their training rows, the heuristic's prediction
(pairwise when the target has fewer rows than the support, else stilts), the target's
validation metric (accuracy; Pearson for STS) under each strategy, the winner between pairwise
and stilts, whether the heuristic held, and the best of all three. Expected runtime of the
full table on the 2-core CPU, from the 1.6 s per three-task step measured for jobs/mtl.py (not
timed): ≈ 1 h. A run finished before under --output (same config and data) is read back, not
retrained, so an interrupted benchmark continues where it stopped.
"""
import argparse
from pathlib import Path

from raymtl.config import MTLConfig, smoke
from raymtl.recipes import PLAIN_ENCODER
from raymtl.stages.transfer import choose, run_strategy, train_sizes
from raymtl.tasks import TASKS


def compare(base: MTLConfig, target: str, support: str, sizes: dict[str, int]) -> dict:
    """One row of the table: the heuristic's prediction and the target's score per strategy."""
    predicted, _ = choose(target, support, sizes)
    scores = {s: run_strategy(base, s, target, support, sizes, verbose=False).score for s in ("pairwise", "stilts")}
    scores["mtl_all"] = run_strategy(base, "mtl_all", target, verbose=False).score
    p, s = scores["pairwise"], scores["stilts"]
    winner = "tie" if p == s else "pairwise" if p > s else "stilts"
    return {"target": target, "support": support, "predicted": predicted, **scores, "winner": winner,
            "held": "-" if winner == "tie" else "yes" if winner == predicted else "no",
            "best": max(scores, key=scores.get)}


def table(rows: list[dict], sizes: dict[str, int]) -> str:
    lines = ["| target (metric) | support | train rows target / support | heuristic predicts | pairwise | "
             "stilts | mtl_all | winner, pairwise vs stilts | heuristic held | best of three |",
             "|---" * 10 + "|"]
    for r in rows:
        t, s = r["target"], r["support"]
        lines.append(f"| {t} ({TASKS[t].metric}) | {s} | {sizes[t]:,} / {sizes[s]:,} | {r['predicted']} | "
                     f"{r['pairwise']:.4f} | {r['stilts']:.4f} | {r['mtl_all']:.4f} | {r['winner']} | "
                     f"{r['held']} | {r['best']} |")
    decided = [r for r in rows if r["held"] != "-"]
    below = sum(r["mtl_all"] < min(r["pairwise"], r["stilts"]) for r in rows)
    lines += ["", f"heuristic held in {sum(r['held'] == 'yes' for r in decided)} of {len(decided)} pairs "
              f"({len(rows) - len(decided)} ties); mtl_all below both pairwise methods in {below} of {len(rows)}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default=",".join(TASKS), help="target tasks (comma-separated)")
    p.add_argument("--supports", default=",".join(TASKS), help="supporting tasks (comma-separated)")
    p.add_argument("--steps", type=int, help="steps per run (default: the config's, 300; smoke 12)")
    p.add_argument("--batch-size", type=int, help="rows per task per step (default: the config's)")
    p.add_argument("--output", default="runs/bench-transfer")
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args(argv)
    targets, supports = a.targets.split(","), a.supports.split(",")
    for t in targets + supports:
        if t not in TASKS:
            p.error(f"{t!r} is not a task; choose from {list(TASKS)}")
    base = (smoke() if a.smoke else MTLConfig()).replace(output=str(Path(a.output).resolve()), **PLAIN_ENCODER)  # as measured
    base = base.replace(**{k: v for k, v in (("steps", a.steps), ("batch_size", a.batch_size)) if v})
    base = base.replace(eval_every=base.train.steps)
    sizes = train_sizes(base.data)
    rows = [compare(base, t, s, sizes) for t in targets for s in supports if s != t]
    print(f"\n{base.model.encoder} encoder, {base.train.steps} steps x {base.train.batch_size} rows per task per "
          f"run ({base.train.steps * base.train.batch_size} target rows under every strategy), seed "
          f"{base.train.seed}; the target's validation metric at the end of the budget\n")
    print(table(rows, sizes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
