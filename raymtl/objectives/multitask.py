"""Task losses, one short function per head kind."""
from __future__ import annotations

from typing import Callable

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


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "classifier": classifier_loss, "regression": regression_loss, "cosine": cosent_loss}


def get_loss(kind: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The hard-label loss of a head kind; unknown kinds list the valid ones."""
    if kind not in LOSSES:
        raise ValueError(f"unknown head kind {kind!r}; valid: {sorted(LOSSES)}")
    return LOSSES[kind]


# ---------------------------------------------------------------- related labels, distillation
def set_cross_entropy(logits: torch.Tensor, label_set: torch.Tensor) -> torch.Tensor:
    """-log P(class in set), for a bitmask of allowed classes per row: (B, C), (B,) -> scalar.
    With one class per row this is the plain cross-entropy; a related row that says only
    "negative" (SST's classes {0, 1}) is trained to put its mass on that set."""
    bits = torch.arange(logits.shape[-1], device=logits.device)
    allowed = (label_set[:, None] >> bits) & 1 == 1                                  # (B, C)
    return (torch.logsumexp(logits, -1) - torch.logsumexp(logits.masked_fill(~allowed, float("-inf")), -1)).mean()


def kd_kl_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al. 2015: T^2 KL(softmax(teacher/T) || softmax(student/T)), batch mean.
    The T^2 keeps its gradients on the scale of the hard-label loss as T changes."""
    t = temperature
    return t * t * F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1),
                            log_target=True, reduction="batchmean")


def kd_mse_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Regression / cosine heads: MSE to the teacher's output (same head kind, same units)."""
    return F.mse_loss(student, teacher.reshape(student.shape))


def constant_alpha(alpha: float, step: int, steps: int) -> float:
    """The same mix every step."""
    return alpha


def annealed_alpha(alpha: float, step: int, steps: int) -> float:
    """Teacher annealing (Clark et al. 2019, "BAM! Born-Again Multi-Task Networks"): the
    teacher's share falls linearly from ``alpha`` at step 0 towards 0 at the end of the run
    (``alpha / steps`` on the last step), so the student starts from the teacher's soft
    targets and ends on the gold labels."""
    return alpha * max(0.0, 1.0 - step / max(steps, 1))


DISTILL_SCHEDULES: dict[str, Callable[[float, int, int], float]] = {
    "constant": constant_alpha, "anneal": annealed_alpha}


def get_distill_schedule(name: str) -> Callable[[float, int, int], float]:
    """``(alpha, step, steps) -> this step's alpha``; unknown names list the valid ones."""
    if name not in DISTILL_SCHEDULES:
        raise ValueError(f"unknown distill schedule {name!r}; valid: {sorted(DISTILL_SCHEDULES)}")
    return DISTILL_SCHEDULES[name]


def task_loss(kind: str, output: torch.Tensor, batch: dict, alpha: float = 0.0, temperature: float = 1.0
              ) -> torch.Tensor:
    """The loss of one task batch: the head kind's hard-label loss (a classifier reads the
    batch's ``label_set`` when present), mixed as ``alpha x distill + (1 - alpha) x hard``
    when the batch carries ``teacher`` outputs."""
    if kind == "classifier" and "label_set" in batch:
        hard = set_cross_entropy(output, batch["label_set"])
    else:
        hard = get_loss(kind)(output, batch["label"])
    if "teacher" not in batch or alpha == 0:
        return hard
    soft = (kd_kl_loss(output, batch["teacher"], temperature) if kind == "classifier"
            else kd_mse_loss(output, batch["teacher"]))
    return alpha * soft + (1 - alpha) * hard
