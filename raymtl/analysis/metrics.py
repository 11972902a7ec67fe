"""Validation metrics and the minBERT overall score."""
from __future__ import annotations

import numpy as np

from raymtl.tasks import TASKS


def accuracy(pred: np.ndarray, label: np.ndarray) -> float:
    return float((np.asarray(pred) == np.asarray(label)).mean())


def pearson(pred: np.ndarray, label: np.ndarray) -> float:
    pred, label = np.asarray(pred, dtype=np.float64), np.asarray(label, dtype=np.float64)
    if len(pred) < 2 or pred.std() == 0 or label.std() == 0:
        return 0.0
    return float(np.corrcoef(pred, label)[0, 1])


METRICS = {"accuracy": accuracy, "pearson": pearson}


def task_metric(task: str, pred, label) -> float:
    return METRICS[TASKS[task].metric](pred, label)


OVERALL_TASKS = ("sst", "quora", "sts")     # the minBERT overall score is defined on these three together


def overall(scores: dict[str, float]) -> float:
    """minBERT overall: mean of accuracies and (pearson + 1) / 2 over the tasks present."""
    return float(overall_of(scores)) if scores else 0.0


def overall_of(scores: dict):
    """``overall`` elementwise: a task's scores may be arrays (e.g. one per bootstrap resample)."""
    return np.mean([(v + 1) / 2 if TASKS[t].metric == "pearson" else v for t, v in scores.items()], axis=0)
