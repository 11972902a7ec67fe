"""Task losses, one short function per head kind."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def classifier_loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """(B, C), (B,) -> cross-entropy."""
    return F.cross_entropy(logits, label.long())


def regression_loss(score: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """(B,), (B,) -> mean squared error in label units."""
    return F.mse_loss(score, label)


def cosent_loss(cos: torch.Tensor, label: torch.Tensor, scale: float = 20.0) -> torch.Tensor:
    """CoSENT (Su 2022): for every pair (i, j) with label_i > label_j, push cos_i above cos_j.

    loss = log(1 + sum_{label_i > label_j} exp(scale * (cos_j - cos_i))); only the order of the
    labels matters, which is what a Pearson/Spearman-scored similarity task rewards.
    """
    diff = scale * (cos[None, :] - cos[:, None])                    # (B, B): cos_j - cos_i
    keep = label[:, None] > label[None, :]                           # (B, B): label_i > label_j
    diff = diff.masked_fill(~keep, float("-inf"))
    zero = torch.zeros(1, dtype=cos.dtype, device=cos.device)
    return torch.logsumexp(torch.cat([zero, diff.flatten()]), dim=0)


LOSSES = {"classifier": classifier_loss, "regression": regression_loss, "cosine": cosent_loss}
