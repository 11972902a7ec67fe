"""SMART's smoothness-inducing adversarial regulariser: Jiang et al., 2020, "SMART: Robust and
Efficient Fine-Tuning for Pre-trained Natural Language Models through Principled Regularized
Optimization" (the regulariser the best published minBERT models used).

Each task batch adds ``weight x D(f(x + delta), f(x))`` to its loss, where ``x`` are the word
embeddings of the batch and ``delta`` the perturbation that (about) maximises the divergence
``D`` within a small ball: it starts as Gaussian noise (std ``noise``), takes one step of size
``step`` along its gradient, normalised per token by the largest coordinate (the paper's
projected ascent with the infinity norm), and is then held fixed. ``D`` is the symmetric KL of
the two softmaxes for a classifier head, the squared difference of the outputs for regression
and cosine heads. The paper's settings (its Table 8): noise 1e-5, step 1e-3, one ascent step.

The perturbation is added by a forward hook on the encoder's input-embedding module, so it
reaches every path that embeds tokens (padded or packed encoder, learned prefixes, the two
sentences of a bi-encoder, which get a ``delta`` each). A task batch runs three forwards (clean,
noisy, adversarial) and, with the ascent's input gradient, about 2.5 backwards: 4.0x a plain
step's time measured in the default multi-task run (docs/results/smoothness-s1.md). It needs the plain module forward (``torch.autograd.grad``), so
ZeRO-3 is refused by the config, as for SAM.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

SMART_NOISE = 1e-5      # std of delta's Gaussian start
SMART_STEP = 1e-3       # size of the one ascent step (per token, infinity norm)


def divergence(perturbed: torch.Tensor, clean: torch.Tensor, kind: str) -> torch.Tensor:
    """Symmetric KL of the two softmaxes (classifier: (B, C)), else the mean squared difference."""
    if kind == "classifier":
        p, q = F.log_softmax(perturbed, -1), F.log_softmax(clean, -1)
        return (F.kl_div(p, q, log_target=True, reduction="batchmean")
                + F.kl_div(q, p, log_target=True, reduction="batchmean"))
    return F.mse_loss(perturbed, clean)


class SMART:
    """``regulariser(run, clean, kind)``: ``run()`` repeats the batch's forward (through the
    hooked embeddings); ``clean`` is its unperturbed output. Returns ``weight x D`` at the
    adversarial ``delta``, differentiable in the model's weights through both outputs."""

    def __init__(self, embeddings: nn.Module, weight: float, noise: float = SMART_NOISE, step: float = SMART_STEP):
        if weight <= 0:
            raise ValueError(f"smart_weight={weight!r} must be > 0 (0 turns SMART off)")
        self.weight, self.noise, self.step = weight, noise, step
        self.deltas: list[torch.Tensor] = []
        self.mode: str | None = None             # None: no perturbation; "start": draw deltas; "hold": reuse them
        self.calls = 0
        self.total, self.count = torch.zeros(()), 0       # the terms returned since ``take_mean``
        embeddings.register_forward_hook(self._perturb)

    def _perturb(self, module, inputs, out):
        if self.mode is None:
            return None
        if self.mode == "start":
            self.deltas.append((torch.randn(out.shape, device=out.device) * self.noise).requires_grad_())
        delta = self.deltas[self.calls]
        self.calls += 1
        return out + delta.to(out.dtype)

    def _forward(self, run: Callable[[], torch.Tensor], mode: str) -> torch.Tensor:
        self.mode, self.calls = mode, 0
        try:
            return run()
        finally:
            self.mode = None

    def regulariser(self, run: Callable[[], torch.Tensor], clean: torch.Tensor, kind: str) -> torch.Tensor:
        self.deltas = []
        noisy = self._forward(run, "start")
        grads = torch.autograd.grad(divergence(noisy, clean.detach(), kind), self.deltas, allow_unused=True)
        with torch.no_grad():
            self.deltas = [d.detach() if g is None else d + self.step * g / (g.abs().amax(-1, keepdim=True) + 1e-12)
                           for d, g in zip(self.deltas, grads)]
        adversarial = self._forward(run, "hold")
        self.deltas = []
        term = self.weight * divergence(adversarial, clean, kind)
        self.total, self.count = self.total.to(term.device) + term.detach().float(), self.count + 1
        return term

    def take_mean(self) -> float:
        """The mean of the terms returned since the last call (one device sync), and a new count."""
        mean = float(self.total) / max(self.count, 1)
        self.total, self.count = torch.zeros(()), 0
        return mean
