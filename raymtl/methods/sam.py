"""Sharpness-aware minimisation (SAM): Foret et al., 2021, "Sharpness-Aware Minimization for
Efficiently Improving Generalization"; for multi-task learning, Phan et al., 2022, "Improving
Multi-task Learning via Seeking Task-based Flat Regions".

A step first climbs to (about) the worst point in an L2 ball of radius ``rho`` around the
weights, ``w + e`` with ``e = rho * g / ||g||`` (``g``: the gradient of the step's summed task
losses), computes the step's gradient there (through the loop's usual backward: fusion,
weighting), puts the weights back and lets the optimizer apply that gradient to them. One more
forward and backward per step, so about twice a plain step's time.

The ascent direction is per worker: each data-parallel worker perturbs by its own micro-batch's
gradient (Foret et al.'s m-sharpness, their distributed setting; no extra communication). It
needs every weight whole on its worker, so ZeRO-3 (partitioned parameters) is refused by the
config. In bf16 the weights are put back from a copy, bit for bit.
"""
from __future__ import annotations

import torch


class SAM:
    """``ascend(loss)`` moves ``params`` to ``w + e`` (returns ``||g||``); ``restore()`` puts
    them back. Between the two the caller runs the step's forward and backward."""

    def __init__(self, params, rho: float):
        if rho <= 0:
            raise ValueError(f"sam_rho={rho!r} must be > 0 (0 turns SAM off)")
        self.params = [p for p in params if p.requires_grad]
        self.rho = rho
        self.saved: list[torch.Tensor] | None = None          # the weights before the ascent

    def ascend(self, loss: torch.Tensor) -> float:
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        norm = torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads if g is not None]))
        scale = self.rho / (float(norm) + 1e-12)
        with torch.no_grad():
            if self.saved is None:
                self.saved = [torch.empty_like(p) for p in self.params]
            for p, g, keep in zip(self.params, grads, self.saved):
                keep.copy_(p)
                if g is not None:
                    p.add_(g.to(p.dtype), alpha=scale)
        return float(norm)

    @torch.no_grad()
    def restore(self) -> None:
        for p, keep in zip(self.params, self.saved):
            p.copy_(keep)
