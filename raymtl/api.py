"""Using a trained model from Python: ``raymtl.load(checkpoint)``.

    import raymtl
    m = raymtl.load("runs/mtl/checkpoint_000300")           # device="auto": a GPU if there is one
    m.predict("sst", ["a gripping, funny film", "dull"])     # -> array([4, 1])
    m.predict("sts", [("A man plays a guitar.", "A man plays music.")])   # -> array([4.1])
    m.similarity(["a cat sat"], ["a cat was sitting"])       # cosine of the STS embeddings
    m.encode(["some sentence"], task="sts")                  # (N, H) as the STS head sees them
    m.last_stats            # InputStats(rows=2, truncated=0, mostly_unk=0, ...) of the last predict

``raymtl predict`` and ``raymtl evaluate`` go through the same object.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from transformers import AutoTokenizer

from raymtl.analysis.evaluation import evaluate_rows, predict_batches, row_batches
from raymtl.analysis.metrics import OVERALL_TASKS
from raymtl.models.device import resolve_device, to_device
from raymtl.models.encoder import pool
from raymtl.models.multitask import CheckpointError, MultiTaskModel, read_meta
from raymtl.tasks import TASKS

Rows = Sequence[str] | Sequence[tuple[str, str]]


@dataclass(frozen=True)
class InputStats:
    """What ``predict`` did with its rows that the predictions do not show: how many rows were
    cut to ``max_length`` tokens, and how many were mostly (> 50 %) the tokenizer's unknown token."""
    rows: int
    truncated: int
    mostly_unk: int
    max_length: int
    unk_token: str = "[UNK]"

    def summary(self) -> str:
        return (f"predicted {self.rows:,} rows ({self.truncated:,} truncated to {self.max_length} tokens, "
                f"{self.mostly_unk:,} mostly {self.unk_token})")


class TrainedModel:
    """A raymtl checkpoint ready to use: the model (eval mode, on ``device``), its tokenizer,
    the ``max_length`` it was trained with and its tasks."""

    def __init__(self, model: MultiTaskModel, tokenizer, max_length: int = 128):
        self.model, self.tokenizer, self.max_length = model.eval(), tokenizer, max_length
        self.last_stats: InputStats | None = None    # set by every predict / predict_rows

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

    def input_stats(self, task: str, rows: list[dict]) -> InputStats:
        """Count the rows that the model's tokenization (its pair mode and text prefix) cuts to
        ``max_length``, and the rows whose own tokens are mostly the unknown token."""
        mode, prefix, tok = self.model.modes[self._task(task)], self.model.text_prefix(task), self.tokenizer
        if not rows:
            return InputStats(0, 0, 0, self.max_length, tok.unk_token)
        a, b = [prefix + r["text_a"] for r in rows], [r["text_b"] for r in rows]
        # the sequences the model sees, untruncated (verbose=False: no warning per long row); two in "bi" mode
        seqs = [tok(a, b, verbose=False) if mode == "cross" else tok(a, verbose=False)]
        if mode == "bi":
            seqs.append(tok([prefix + x for x in b], verbose=False))
        # per sequence, the tokens that are not the row's own text: [CLS]/[SEP] and the text prefix
        added = tok.num_special_tokens_to_add(pair=mode == "cross") + (
            len(tok(prefix, add_special_tokens=False)["input_ids"]) if prefix else 0)
        truncated = mostly_unk = 0
        for i in range(len(rows)):
            ids = [s["input_ids"][i] for s in seqs]
            truncated += any(len(x) > self.max_length for x in ids)
            words = sum(len(x) - added for x in ids)
            unk = sum(x.count(tok.unk_token_id) for x in ids)
            mostly_unk += int(unk > words / 2 > 0)
        return InputStats(len(rows), truncated, mostly_unk, self.max_length, tok.unk_token)

    def predict_rows(self, task: str, rows: list[dict], batch_size: int = 64) -> np.ndarray:
        """Predictions for rows as the readers give them (``text_a``, ``text_b``, ``label``, ``line``).
        ``last_stats`` then says how many rows were truncated or mostly unknown tokens."""
        self.last_stats = self.input_stats(task, rows)
        batches = row_batches(self.model, self.tokenizer, self._task(task), rows, self.max_length, batch_size)
        return predict_batches(self.model, task, batches)[0]

    def predict(self, task: str, rows: Rows, batch_size: int = 64) -> np.ndarray:
        """Labels (SST: 0-4, Quora: 0/1) or scores (STS: 0-5) for sentences, or for
        (sentence, sentence) pairs when the task is a pair task. Rows longer than ``max_length``
        tokens are truncated; ``last_stats`` counts them (and rows that are mostly unknown tokens)."""
        pair = TASKS[self._task(task)].is_pair
        if pair and any(isinstance(r, str) for r in rows):
            raise ValueError(f"{task} is a pair task: pass (sentence_a, sentence_b) tuples")
        if not pair and any(not isinstance(r, str) for r in rows):
            raise ValueError(f"{task} takes single sentences, not pairs")
        as_rows = [{"text_a": r[0] if pair else r, "text_b": r[1] if pair else "", "label": 0.0, "line": i}
                   for i, r in enumerate(rows)]
        out = self.predict_rows(task, as_rows, batch_size)
        return out.astype(np.int64) if TASKS[task].label_type == "class" else out

    def evaluate(self, rows_by_task: dict[str, list[dict]]) -> dict[str, float]:
        """Score per task on labelled rows, plus ``overall`` only when all of ``OVERALL_TASKS`` are
        scored: on fewer tasks it is not the minBERT number (STS alone gives (Pearson + 1) / 2)."""
        for task in rows_by_task:
            self._task(task)
        scores = evaluate_rows(self.model, self.tokenizer, rows_by_task, self.max_length)
        if not set(OVERALL_TASKS) <= set(rows_by_task):
            del scores["overall"]
        return scores

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
    if not any((d / "encoder" / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
        raise CheckpointError(f"{d / 'encoder'} has no tokenizer files (tokenizer.json, vocab.txt); "
                              "the checkpoint is incomplete")
    try:
        tokenizer = AutoTokenizer.from_pretrained(d / "encoder")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{d / 'encoder'}: its tokenizer does not load ({e})") from None
    max_length = read_meta(d).get("max_length", 128)
    return TrainedModel(model, tokenizer, max_length)
