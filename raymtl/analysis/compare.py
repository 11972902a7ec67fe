"""Two models on the same rows: each task's score difference with a paired bootstrap interval.

A validation split of a few hundred rows moves a score by 0.01-0.02 between seeds or
checkpoints (SST's 854 rows: an accuracy's standard error near 0.017), so "B is 0.012 below
A" needs an interval before it means anything. The bootstrap is paired (Efron & Tibshirani
1993; Koehn 2004 for NLP): each resample draws the same rows for both models, so the rows'
own difficulty cancels and only the models' disagreement is left. ``overall`` (the minBERT
mean) is resampled with every task's rows drawn afresh in the same replicate.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from raymtl.analysis.metrics import OVERALL_TASKS, overall, overall_of, task_metric
from raymtl.tasks import TASKS


@dataclass(frozen=True)
class Difference:
    """``b - a`` on ``rows`` rows, its 95 % percentile interval and the share of resamples in
    which B does not beat A (a one-sided bootstrap p-value for "B is better"); ``draws`` are
    the resampled differences themselves."""
    task: str
    rows: int
    a: float
    b: float
    low: float
    high: float
    b_not_better: float
    draws: np.ndarray = field(repr=False, compare=False, default_factory=lambda: np.zeros(0))

    @property
    def diff(self) -> float:
        return self.b - self.a


def _resampled(task: str, pred: np.ndarray, label: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The task's metric on each row of ``idx`` (R, N) -> (R,), vectorised."""
    p, y = pred[idx].astype(np.float64), label[idx].astype(np.float64)     # (R, N)
    if TASKS[task].metric == "accuracy":
        return (p == y).mean(1)
    p, y = p - p.mean(1, keepdims=True), y - y.mean(1, keepdims=True)
    den = np.sqrt((p * p).sum(1) * (y * y).sum(1))
    return np.divide((p * y).sum(1), den, out=np.zeros(len(idx)), where=den > 0)


def compare(preds_a: dict[str, np.ndarray], preds_b: dict[str, np.ndarray], labels: dict[str, np.ndarray],
            resamples: int = 2000, seed: int = 0) -> list[Difference]:
    """Per task of ``labels`` (and ``overall`` when sst, quora and sts are all there): A's and
    B's scores on the same rows and the paired bootstrap of their difference."""
    if resamples < 100:
        raise ValueError(f"resamples: {resamples} is too few for a 95 % interval (at least 100)")
    rng, out, draws = np.random.default_rng(seed), [], {}
    for task, y in labels.items():
        a, b = np.asarray(preds_a[task]), np.asarray(preds_b[task])
        if not len(y) == len(a) == len(b) or len(y) < 2:
            raise ValueError(f"{task}: {len(a)} and {len(b)} predictions for {len(y)} labelled rows")
        idx = rng.integers(0, len(y), (resamples, len(y)))                     # (R, N), the same rows for both
        draws[task] = (_resampled(task, a, y, idx), _resampled(task, b, y, idx))
        out.append(_difference(task, len(y), task_metric(task, a, y), task_metric(task, b, y), *draws[task]))
    if set(OVERALL_TASKS) <= set(labels):
        score = [overall({d.task: getattr(d, side) for d in out if d.task in OVERALL_TASKS}) for side in "ab"]
        boot = [overall_of({t: draws[t][side] for t in OVERALL_TASKS}) for side in (0, 1)]
        out.append(_difference("overall", sum(len(labels[t]) for t in OVERALL_TASKS), *score, *boot))
    return out


def _difference(task: str, rows: int, a: float, b: float, boot_a: np.ndarray, boot_b: np.ndarray) -> Difference:
    return _from_draws(task, rows, a, b, boot_b - boot_a)


def _from_draws(task: str, rows: int, a: float, b: float, d: np.ndarray) -> Difference:
    low, high = np.percentile(d, [2.5, 97.5])
    return Difference(task, rows, a, b, float(low), float(high), float((d <= 0).mean()), d)


def mean_over(runs: list[list[Difference]]) -> list[Difference]:
    """The mean difference over independent comparisons (e.g. seeds, each on its own
    validation split), per task: the replicate-wise mean of their bootstraps is a bootstrap of
    the mean, so its interval is the interval of "B - A averaged over seeds"."""
    out = []
    for same in zip(*runs):
        if len({d.task for d in same}) != 1 or len({len(d.draws) for d in same}) != 1:
            raise ValueError(f"mean_over: tasks {[d.task for d in same]} with {[len(d.draws) for d in same]} "
                             "resamples do not line up")
        out.append(_from_draws(same[0].task, sum(d.rows for d in same), float(np.mean([d.a for d in same])),
                               float(np.mean([d.b for d in same])), np.mean([d.draws for d in same], axis=0)))
    return out


def format_comparison(diffs: list[Difference], name_a: str = "A", name_b: str = "B") -> str:
    """A markdown table; ``*`` marks a difference whose 95 % interval excludes zero."""
    lines = [f"| task | rows | {name_a} | {name_b} | {name_b} - {name_a} | 95 % interval | resamples where {name_b} <= {name_a} |",
             "|---|---|---|---|---|---|---|"]
    for d in diffs:
        mark = " *" if d.low > 0 or d.high < 0 else ""
        lines.append(f"| {d.task} | {d.rows:,} | {d.a:.4f} | {d.b:.4f} | {d.diff:+.4f}{mark} | "
                     f"[{d.low:+.4f}, {d.high:+.4f}] | {d.b_not_better:.1%} |")
    return "\n".join(lines)
