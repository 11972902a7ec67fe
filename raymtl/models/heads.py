"""Task heads: a classifier, a bounded regression, or the cosine of two sentence embeddings,
chosen from the task table and the pair mode (``head_kind``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raymtl.tasks import TaskSpec


def head_kind(spec: TaskSpec, mode: str | None) -> str:
    """'classifier' for class tasks; score tasks: 'cosine' as a bi-encoder, else 'regression'."""
    return "classifier" if spec.label_type == "class" else "cosine" if mode == "bi" else "regression"


class Head(nn.Module):
    """Task head. kind: 'classifier' (logits), 'regression' (a score in the label range),
    'cosine' (cosine of two sentence embeddings; no parameters)."""

    def __init__(self, spec: TaskSpec, mode: str | None, hidden: int, dropout: float):
        super().__init__()
        self.spec, self.mode = spec, mode
        self.kind = head_kind(spec, mode)
        in_dim = 4 * hidden if mode == "bi" else hidden              # SBERT (u, v, |u-v|, u*v)
        self.drop = nn.Dropout(dropout)
        if self.kind != "cosine":
            self.out = nn.Linear(in_dim, spec.num_labels if self.kind == "classifier" else 1)
        # A binary bi-encoder classifier also reads the cosine of the two embeddings, with a
        # learned scale and threshold: a sentence-embedding encoder then starts from its
        # zero-shot operating point instead of from a random linear head.
        self.cosine_logit = self.kind == "classifier" and mode == "bi" and spec.num_labels == 2
        if self.cosine_logit:
            self.cos_scale = nn.Parameter(torch.tensor([20.0]))      # 1-d: DeepSpeed flattens params
            self.cos_threshold = nn.Parameter(torch.tensor([0.75]))
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, u: torch.Tensor, v: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == "cosine":
            return F.cosine_similarity(u, v, dim=-1)                 # (B,) in [-1, 1]
        x = torch.cat([u, v, (u - v).abs(), u * v], -1) if v is not None else u
        y = self.out(self.drop(x))
        if self.cosine_logit:                                        # (B, 2): add to "positive"
            z = self.cos_scale * (F.cosine_similarity(u, v, dim=-1) - self.cos_threshold)
            y = y + torch.stack([torch.zeros_like(z), z], -1)
        if self.kind == "regression":
            lo, hi = self.spec.label_range
            return lo + (hi - lo) * torch.sigmoid(y.squeeze(-1))     # (B,)
        return y                                                     # (B, C)

    def predict(self, output: torch.Tensor) -> torch.Tensor:
        """Model output -> the value written by ``raymtl predict``."""
        if self.kind == "classifier":
            return output.argmax(-1)
        if self.kind == "cosine":  # linear map of [-1, 1] onto the label range (Pearson-neutral)
            lo, hi = self.spec.label_range
            return lo + (hi - lo) * (output.clamp(-1, 1) + 1) / 2
        return output
