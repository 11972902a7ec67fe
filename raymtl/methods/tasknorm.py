"""Per-task gradient normalisation before fusion: every task moves every shared coordinate.

AdamW normalises the *fused* gradient per coordinate by the running root mean square of
that fused gradient. Where one task's gradient is large in a coordinate (STS's CoSENT loss
gives the encoder 30-80x SST's gradient norm; README, Performance), that task sets the
coordinate's second moment and the other tasks' share of the update there stays small,
whatever global task weights a fusion method picks. Normalising each task's gradient by
its *own* running second moment first (Adam's denominator, one state per task) gives each
task a comparable step in every coordinate, as if each had its own optimizer (the
per-task moments of "Adam for multi-task", cf. MetaBalance, He et al. 2022, which balances
per-layer gradient magnitudes the same way with norms instead of moments).

Every method is a callable ``(grads, names, shared) -> None`` that rescales the per-task
gradients of the shared parameters in place (``grads[t][i]``: task ``names[t]``'s gradient
of ``shared[i]``, ``None`` where the task does not reach it), registered in ``TASK_NORMS``.
"""
from __future__ import annotations

import math

import torch


class SecondMoment:
    """Each task's gradient divided, element-wise, by the root of its own bias-corrected
    running mean of squares (decay ``beta``, as Adam's ``v``); then one common factor gives
    the tasks' gradients together the squared norm they had before, so clipping, the fusion
    method's weights and the optimizer see the usual scale. Every worker holds the same
    state: the gradients it sees were averaged over workers already."""

    def __init__(self, beta: float = 0.999, eps: float = 1e-12):
        self.beta, self.eps = beta, eps
        self.moments: dict[str, list[torch.Tensor]] = {}        # task -> per-parameter v
        self.counts: dict[str, int] = {}                        # task -> updates of its v

    def __call__(self, grads: list[list[torch.Tensor | None]], names: list[str],
                 shared: list[torch.nn.Parameter]) -> None:
        before, after = [], []                                    # squared norms, summed once:
        for name, g in zip(names, grads):                        # one device sync per step
            v = self.moments.setdefault(name, [torch.zeros_like(p) for p in shared])
            if v and v[0].device != shared[0].device:             # resumed: loaded on the CPU
                v[:] = [x.to(p.device) for x, p in zip(v, shared)]
            self.counts[name] = n = self.counts.get(name, 0) + 1
            correction = 1.0 - self.beta ** n
            for i, x in enumerate(g):
                if x is None:
                    continue
                v[i].mul_(self.beta).addcmul_(x, x, value=1.0 - self.beta)
                before.append(x.float().square().sum())
                g[i] = x / (v[i] / correction).sqrt().add_(self.eps)
                after.append(g[i].float().square().sum())
        if not after:
            return
        total_before, total_after = torch.stack(before).sum().item(), torch.stack(after).sum().item()
        scale = math.sqrt(total_before / total_after) if total_after > 0 else 1.0
        for g in grads:
            g[:] = [x if x is None else x.mul_(scale) for x in g]

    def state_dict(self) -> dict:
        """The running moments, checkpointed so a resumed run continues them."""
        return {"moments": self.moments, "counts": self.counts}

    def load_state_dict(self, state: dict) -> None:
        self.moments = {k: [x.clone() for x in v] for k, v in state["moments"].items()}
        self.counts = {k: int(n) for k, n in state["counts"].items()}


TASK_NORMS = {"none": None, "adam": SecondMoment}


def make_task_norm(name: str) -> SecondMoment | None:
    """The registered normalisation ``name`` (``None`` for ``"none"``); unknown names list
    the valid ones."""
    if name not in TASK_NORMS:
        raise ValueError(f"task_norm={name!r} is not valid; choose one of {sorted(TASK_NORMS)}")
    cls = TASK_NORMS[name]
    return cls() if cls is not None else None
