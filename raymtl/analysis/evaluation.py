"""Evaluation and prediction shared by the training loop and the ``raymtl`` CLI."""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch

from raymtl.analysis.metrics import overall, task_metric
from raymtl.data.multitask import batch_from_rows
from raymtl.data.related import RelatedSet, label_set
from raymtl.models.device import to_device
from raymtl.tasks import TASKS


@torch.no_grad()
def predict_batches(model, task: str, batches: Iterable[dict], read: Callable | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run ``model`` over collated batches of one task -> (predictions, labels, line numbers).
    A prediction is the head's (``raymtl predict``'s), or ``read(output)`` when given."""
    was_training = model.training
    model.eval()
    read = read or model.heads[task].predict
    preds, labels, lines = [], [], []
    for b in batches:
        out = model(task, to_device(b, model)).float()                 # fp32 before the metric
        preds.append(read(out).cpu().numpy())
        labels.append(b["label"].numpy())
        lines.append(b["line"].numpy())
    model.train(was_training)
    if not preds:
        return np.zeros(0), np.zeros(0), np.zeros(0, dtype=np.int64)
    return np.concatenate(preds), np.concatenate(labels), np.concatenate(lines)


def row_batches(model, tokenizer, task: str, rows: list[dict], max_length: int, batch_size: int = 64):
    """Collated batches of rows, encoded the way ``model`` was trained for ``task``."""
    for i in range(0, len(rows), batch_size):
        yield batch_from_rows(tokenizer, rows[i:i + batch_size], model.modes[task], max_length,
                              model.text_prefix(task))


def evaluate_rows(model, tokenizer, rows_by_task: dict[str, list[dict]], max_length: int = 128
                  ) -> dict[str, float]:
    """Scores per task plus ``overall`` for labelled rows."""
    scores = {}
    for task, rows in rows_by_task.items():
        preds, labels, _ = predict_batches(model, task, row_batches(model, tokenizer, task, rows, max_length))
        scores[task] = task_metric(task, preds, labels)
    return {**scores, "overall": overall(scores)}


@torch.no_grad()
def related_score(model, tokenizer, rs: RelatedSet, rows: list[dict], max_length: int = 128) -> float:
    """A related set scored out of domain by its target task's head (rows from
    ``raymtl.data.related.read_related``). A score (SICK) -> Pearson of the head's score. Classes
    -> accuracy of the label set with the most probability mass among the set's label sets:
    binary sentiment from SST's five classes is P(0) + P(1) against P(3) + P(4) (the neutral
    class counts for neither), a 0/1 paraphrase is the Quora head's own argmax."""
    task, batches = rs.target, row_batches(model, tokenizer, rs.target, rows, max_length)
    if TASKS[task].label_type != "class":
        preds, labels, _ = predict_batches(model, task, batches)
        return task_metric(task, preds, labels)
    sets = sorted({label_set(TASKS[task], c) for c in rs.class_map.values()})
    masks = torch.tensor([[(s >> c) & 1 for c in range(TASKS[task].num_labels)] for s in sets], dtype=torch.float32)
    picked, _, _ = predict_batches(model, task, batches, read=lambda out: (out.softmax(-1).cpu() @ masks.T).argmax(-1))
    truth = np.array([sets.index(int(r["label_set"])) for r in rows])
    return float((picked == truth).mean()) if rows else float("nan")


def format_table(scores: dict[str, float]) -> str:
    names = {"sst": "SST accuracy", "quora": "Quora accuracy", "sts": "STS Pearson", "overall": "overall"}
    width = max(len(names.get(k, k)) for k in scores)
    return "\n".join(f"{names.get(k, k):<{width}}  {v:.4f}" for k, v in scores.items())
