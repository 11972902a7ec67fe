"""Using a trained model from Python: ``raymtl.load(checkpoint)``.

    import raymtl
    m = raymtl.load("runs/mtl/checkpoint_000300")           # device="auto": a GPU if there is one
    m.predict("sst", ["a gripping, funny film", "dull"])     # -> array([4, 1])
    m.predict("sts", [("A man plays a guitar.", "A man plays music.")])   # -> array([4.1])
    m.similarity(["a cat sat"], ["a cat was sitting"])       # cosine of the STS embeddings
    m.encode(["some sentence"], task="sts")                  # (N, H) as the STS head sees them

``raymtl predict`` and ``raymtl evaluate`` go through the same object.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from transformers import AutoTokenizer

from raymtl.analysis.evaluation import predict_batches, row_batches
from raymtl.models.device import resolve_device, to_device
from raymtl.models.encoder import pool
from raymtl.models.multitask import MultiTaskModel
from raymtl.tasks import TASKS

Rows = Sequence[str] | Sequence[tuple[str, str]]


class TrainedModel:
    """A raymtl checkpoint ready to use: the model (eval mode, on ``device``), its tokenizer,
    the ``max_length`` it was trained with and its tasks."""

    def __init__(self, model: MultiTaskModel, tokenizer, max_length: int = 128):
        self.model, self.tokenizer, self.max_length = model.eval(), tokenizer, max_length

    @property
    def tasks(self) -> list[str]:
        return list(self.model.heads)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _task(self, task: str) -> str:
        if task not in self.model.heads:
            raise ValueError(f"task {task!r}: this checkpoint has heads for {self.tasks}")
        return task

    def predict_rows(self, task: str, rows: list[dict], batch_size: int = 64) -> np.ndarray:
        """Predictions for rows as the readers give them (``text_a``, ``text_b``, ``label``, ``line``)."""
        batches = row_batches(self.model, self.tokenizer, self._task(task), rows, self.max_length, batch_size)
        return predict_batches(self.model, task, batches)[0]

    def predict(self, task: str, rows: Rows, batch_size: int = 64) -> np.ndarray:
        """Labels (SST: 0-4, Quora: 0/1) or scores (STS: 0-5) for sentences, or for
        (sentence, sentence) pairs when the task is a pair task."""
        pair = TASKS[self._task(task)].is_pair
        if pair and any(isinstance(r, str) for r in rows):
            raise ValueError(f"{task} is a pair task: pass (sentence_a, sentence_b) tuples")
        if not pair and any(not isinstance(r, str) for r in rows):
            raise ValueError(f"{task} takes single sentences, not pairs")
        as_rows = [{"text_a": r[0] if pair else r, "text_b": r[1] if pair else "", "label": 0.0, "line": i}
                   for i, r in enumerate(rows)]
        out = self.predict_rows(task, as_rows, batch_size)
        return out.astype(np.int64) if TASKS[task].label_type == "class" else out

    @torch.no_grad()
    def encode(self, sentences: Sequence[str], task: str | None = None, batch_size: int = 64) -> np.ndarray:
        """(N, H) sentence embeddings: as ``task``'s head sees them (its PALs, own layers,
        prefix and pooling), or with ``task=None`` the shared encoder's mean pooling."""
        out = []
        for i in range(0, len(sentences), batch_size):
            chunk = [(self.model.text_prefix(task) if task else "") + s for s in sentences[i:i + batch_size]]
            enc = to_device(dict(self.tokenizer(chunk, truncation=True, max_length=self.max_length,
                                                padding=True, return_tensors="pt")), self.model)
            if task is None:
                hidden = self.model.encoder(**enc).last_hidden_state                    # (B, T, H)
                out.append(pool(hidden, enc["attention_mask"], "mean").float().cpu())
            else:
                out.append(self.model.embed(self._task(task), enc["input_ids"], enc["attention_mask"],
                                            enc.get("token_type_ids")).float().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.model.encoder.config.hidden_size))

    def similarity(self, a: Sequence[str], b: Sequence[str], task: str = "sts") -> np.ndarray:
        """Cosine similarity of ``a[i]`` and ``b[i]`` in ``task``'s embedding space."""
        if len(a) != len(b):
            raise ValueError(f"similarity: {len(a)} sentences against {len(b)}")
        u, v = torch.from_numpy(self.encode(a, task)), torch.from_numpy(self.encode(b, task))
        return torch.nn.functional.cosine_similarity(u, v, dim=-1).numpy()


def load(checkpoint: str | Path, device: str = "auto") -> TrainedModel:
    """A raymtl checkpoint directory -> ``TrainedModel`` on ``device`` (auto | cpu | cuda[:N])."""
    d = Path(checkpoint)
    model = MultiTaskModel.load(d).to(resolve_device(device))
    tokenizer = AutoTokenizer.from_pretrained(d / "encoder")
    max_length = json.loads((d / "raymtl.json").read_text()).get("max_length", 128)
    return TrainedModel(model, tokenizer, max_length)
