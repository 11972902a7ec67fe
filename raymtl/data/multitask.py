"""The multi-task data: every task's splits (and related rows), tokenized in one Ray Data
pass for its pair mode, and padded into batches (``collate``). Files are read and checked
by ``raymtl.data.readers``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from ray.data import Dataset

from raymtl.data.readers import ReadReport, read_task_file, split_rows
from raymtl.data.related import related_rows
from raymtl.tasks import TASKS, TaskSpec


# ---------------------------------------------------------------------------- tokenization
def encode(tokenizer, text_a: list[str], text_b: list[str], mode: str | None, max_length: int,
           prefix: str = "") -> dict[str, list[list[int]]]:
    """Token ids for one batch. mode None: single sentence; 'cross': one joint sequence;
    'bi': two separate sequences (ids_b). ``prefix`` is a textual task prefix."""
    if prefix:
        text_a = [prefix + x for x in text_a]
        text_b = [prefix + x for x in text_b] if mode == "bi" else text_b
    if mode == "cross":
        enc = tokenizer(text_a, text_b, truncation="longest_first", max_length=max_length,
                        return_token_type_ids=True)
        return {"ids_a": enc["input_ids"], "tt_a": enc["token_type_ids"],
                "ids_b": [[] for _ in text_a]}
    enc_a = tokenizer(text_a, truncation=True, max_length=max_length)
    ids_b = (tokenizer(text_b, truncation=True, max_length=max_length)["input_ids"]
             if mode == "bi" else [[] for _ in text_a])
    return {"ids_a": enc_a["input_ids"], "tt_a": [[0] * len(x) for x in enc_a["input_ids"]],
            "ids_b": ids_b}


class Tokenize:
    """Ray Data ``map_batches`` callable: loads the tokenizer once per actor."""

    def __init__(self, tokenizer_source: str, modes: dict[str, str | None], max_length: int,
                 prefixes: dict[str, str]):
        from transformers import AutoTokenizer
        self.tok = AutoTokenizer.from_pretrained(tokenizer_source)
        self.modes, self.max_length, self.prefixes = modes, max_length, prefixes

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        out = {"ids_a": [], "tt_a": [], "ids_b": []}
        tasks = batch["task"]
        # A batch may mix tasks; encode each task's rows with its own input mode.
        idx_by_task: dict[str, list[int]] = {}
        for i, t in enumerate(tasks):
            idx_by_task.setdefault(str(t), []).append(i)
        cols: dict[str, list] = {k: [None] * len(tasks) for k in out}
        for task, idx in idx_by_task.items():
            enc = encode(self.tok, [batch["text_a"][i] for i in idx], [batch["text_b"][i] for i in idx],
                         self.modes[task], self.max_length, self.prefixes.get(task, ""))
            for k in out:
                for j, i in enumerate(idx):
                    cols[k][i] = np.asarray(enc[k][j], dtype=np.int32)
        kept = {k: v for k, v in batch.items() if k not in ("text_a", "text_b")}   # task, split, line, labels
        return {**kept, "label": batch["label"].astype(np.float32), **cols}


def _pad(seqs, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids, mask


def collate(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Pad each batch only to its own longest row (dynamic padding)."""
    ids_a, mask_a = _pad(batch["ids_a"])
    tt_a, _ = _pad(batch["tt_a"])
    out = {"input_ids": ids_a, "attention_mask": mask_a, "token_type_ids": tt_a,
           "label": torch.tensor(np.asarray(batch["label"], dtype=np.float32)),
           "line": torch.tensor(np.asarray(batch["line"], dtype=np.int64))}
    if "label_set" in batch:      # classifier rows: bitmask of allowed classes (raymtl.data.related)
        out["label_set"] = torch.tensor(np.asarray(batch["label_set"], dtype=np.int64))
    if "teacher" in batch:        # teacher logits / scores (raymtl.stages.distill), (B, C)
        out["teacher"] = torch.tensor(np.stack([np.asarray(x, dtype=np.float32) for x in batch["teacher"]]))
    if len(batch["ids_b"]) and len(batch["ids_b"][0]):
        out["input_ids_b"], out["attention_mask_b"] = _pad(batch["ids_b"])
    return out


def batch_from_rows(tokenizer, rows: list[dict], mode: str | None, max_length: int,
                    prefix: str = "") -> dict[str, torch.Tensor]:
    """Tokenize and collate rows directly (evaluation / prediction outside Ray Data)."""
    enc = encode(tokenizer, [r["text_a"] for r in rows], [r["text_b"] for r in rows], mode, max_length, prefix)
    return collate({**enc, "label": [r["label"] for r in rows], "line": [r["line"] for r in rows]})


# ---------------------------------------------------------------------------- Ray Data
def load_splits(data_cfg, verbose: bool = False) -> tuple[dict[str, tuple[list[dict], list[dict]]], list[ReadReport]]:
    """Read every task's train file and carve its seeded validation split. Tasks with
    ``related_sets`` get a third list: the related rows mapped into their label space
    (``raymtl.data.related``), minus any overlap with the validation split."""
    splits, reports = {}, []
    for name in data_cfg.tasks:
        spec = TASKS[name]
        rows, report = read_task_file(spec, f"{data_cfg.data_dir.rstrip('/')}/{spec.path}",
                                      max_rows=data_cfg.max_rows,
                                      max_bad_fraction=data_cfg.max_bad_fraction)
        reports.append(report)
        train, val = split_rows(rows, data_cfg.val_fraction, data_cfg.split_seed)
        splits[name] = (train, val)
        if data_cfg.related_of(name):
            extra, lines = related_rows(name, data_cfg.related_of(name), data_cfg.data_dir, val,
                                        data_cfg.max_rows, data_cfg.max_bad_fraction)
            splits[name] = (train, val, extra)
            if verbose:
                for line in lines:
                    print("[raymtl] related " + line, flush=True)
    return splits, reports


def label_set_of(spec: TaskSpec, row: dict) -> int:
    """Bitmask of the classes a row allows: its own class, or a related row's mapped set."""
    if "label_set" in row:
        return int(row["label_set"])
    return 1 << int(row["label"]) if spec.label_type == "class" else 0


def tokenized_datasets(splits, tokenizer_source: str, modes: dict[str, str | None],
                       max_length: int, prefixes: dict[str, str] | None = None) -> dict[str, "Dataset"]:
    """One Ray Data pass tokenizes every task and split; returns ``{"train_sst": ds, "val_sst": ds, ...}``
    (and ``train_<task>_related`` for a task with related rows).

    The result is materialized so that training workers, which hold the CPUs during
    ``fit``, never wait on a streaming tokenizer (see RAY_NOTES: 2-CPU deadlock).
    """
    import ray

    names = ("train", "val", "related")
    items = [{"task": t, "split": s, "line": r["line"], "text_a": r["text_a"], "text_b": r["text_b"],
              "label": r["label"], "label_set": label_set_of(TASKS[t], r)}
             for t, parts in splits.items() for s, rows in zip(names, parts) for r in rows]
    ds = ray.data.from_items(items).map_batches(
        Tokenize, fn_constructor_kwargs={"tokenizer_source": tokenizer_source, "modes": modes,
                                         "max_length": max_length, "prefixes": prefixes or {}},
        batch_size=512, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1).materialize()
    out = {}
    for t, parts in splits.items():
        for s in names[:len(parts)]:
            key = f"train_{t}_related" if s == "related" else f"{s}_{t}"
            out[key] = ds.filter(
                expr=f"task == '{t}' and split == '{s}'").drop_columns(["task", "split"]).materialize()
    return out
