"""Gradient fusion: combine per-task gradients of the shared parameters into one update.

Every method is a callable ``[T, D] float tensor -> [D]``; ``FUSION_METHODS`` maps its name
to the factory ``(num_tasks, **settings) -> method`` and ``make_fusion`` builds one.
The aggregators come from TorchJD (Quinton & Rey, "Jacobian Descent for Multi-Objective
Optimization", 2024), which implements them as published; raymtl only adapts them:

    sum       plain sum of task gradients (what ``sum(losses).backward()`` computes)
    pcgrad    Yu et al. 2020, "Gradient Surgery for Multi-Task Learning"
    gradvac   Wang et al. 2021, "Gradient Vaccine" (stateful: EMA of target similarities)
    cagrad    Liu et al. 2021, "Conflict-Averse Gradient Descent" (c: ``cagrad_c``, default 0.4)
    mgda      Sener & Koltun 2018, exact min-norm point of the convex hull (Frank-Wolfe)
    imtl_g    Liu et al. 2021, "Towards Impartial Multi-task Learning", gradient part
    nash_mtl  Navon et al. 2022, "Multi-Task Learning as a Bargaining Game" (stateful)
    upgrad    Quinton & Rey 2024, projection of each gradient onto the dual cone, averaged

Every method is also a *weighting*: ``task_weights(fuse, G)`` gives the ``[T]`` weights ``w``
with ``fuse(G) == w @ G``, and the weights depend on ``G`` only through its Gramian ``G G^T``.
So the training step never builds the ``[T, D]`` matrix (three 90 MB rows and their copies
for the default encoder): it accumulates the ``[T, T]`` Gramian parameter by parameter from
the per-task gradients, asks the method for the weights of a ``[T, T]`` factor of it
(``gramian_factor``), and hands each parameter ``sum_t w_t g_t`` straight to the backward
(``_HandOver``). That is what ``fusion_every`` > 1 uses too (``PeriodicFusion``): fuse
every N steps, and in between train on the losses weighted by the last weights, one plain
backward per step (the idea of Nash-MTL's ``update_weights_every``).

Fixed task weights (``--task-weights``) are *preferences*: they scale each task's share of the
update the method computes, ``fused = sum_t p_t w_t g_t``, with ``w`` from the unweighted
gradients. For ``sum`` that is the weighted sum of losses. For a scale-invariant method such
as IMTL-G it is the only way a weight can matter: weighting a loss before IMTL-G changes at
most the length of the fused update, never its direction, and AdamW normalises lengths.
Learned or dynamic loss weightings (uncertainty, DWA, softmax) still weight the losses the
method sees.

Stateful methods keep state across steps, so training builds a fresh instance per run
with ``make_fusion(name, num_tasks, cagrad_c=...)``. Per-task surgery needs each task's full
gradient of every shared parameter, which ZeRO-3 partitions across workers, and fusing each
accumulation micro-batch on its own is not fusing the step's gradient: the config refuses
both combinations.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.distributed as dist

Fusion = Callable[[torch.Tensor], torch.Tensor]


class _Sum:
    """Plain sum, with the same ``weighting`` interface as TorchJD's aggregators."""

    def weighting(self, G: torch.Tensor) -> torch.Tensor:
        return torch.ones(G.shape[0], dtype=G.dtype, device=G.device)

    def __call__(self, G: torch.Tensor) -> torch.Tensor:
        return G.sum(0)                                              # [T, D] -> [D]


CAGRAD_C = 0.4        # CAGrad's c (TrainConfig.cagrad_c)


def _torchjd(cls_name: str, **kw) -> Fusion:
    """TorchJD's aggregator ``cls_name``, imported on first use: importing this module loads
    neither TorchJD nor its optional solvers (cvxpy for CAGrad and Nash-MTL)."""
    import torchjd.aggregation as agg
    return getattr(agg, cls_name)(**kw)


# name -> factory(num_tasks, **its own settings) -> a fresh method
FUSION_METHODS: dict[str, Callable[..., Fusion]] = {
    "sum": lambda num_tasks: _Sum(),
    "pcgrad": lambda num_tasks: _torchjd("PCGrad"),
    "gradvac": lambda num_tasks: _torchjd("GradVac"),
    "cagrad": lambda num_tasks, c=CAGRAD_C: _torchjd("CAGrad", c=c),
    "mgda": lambda num_tasks: _torchjd("MGDA"),
    "imtl_g": lambda num_tasks: _torchjd("IMTLG"),
    "nash_mtl": lambda num_tasks: _torchjd("NashMTL", n_tasks=num_tasks),
    "upgrad": lambda num_tasks: _torchjd("UPGrad"),
}


def make_fusion(name: str, num_tasks: int, cagrad_c: float = CAGRAD_C) -> Fusion:
    """A fresh ``name`` for ``num_tasks`` tasks, given the settings of the methods that have
    them (``TrainConfig.cagrad_c``); unknown names list the valid ones."""
    if name not in FUSION_METHODS:
        raise ValueError(f"unknown fusion method {name!r}; valid: {sorted(FUSION_METHODS)}")
    settings = {"cagrad": {"c": cagrad_c}}.get(name, {})
    return FUSION_METHODS[name](num_tasks, **settings)


# ---------------------------------------------------------------- use in the training loop
def global_task_gradients(G: torch.Tensor) -> torch.Tensor:
    """Average the per-task gradient matrix over data-parallel workers, so every worker
    fuses the same, globally averaged ``[T, D]`` (fusion is nonlinear: fusing local
    gradients and averaging afterwards would give a different update)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(G, op=dist.ReduceOp.SUM)
        G /= dist.get_world_size()
    return G


def per_task_gradients(losses: dict[str, torch.Tensor], params: list[torch.nn.Parameter]
                       ) -> list[list[torch.Tensor | None]]:
    """Each loss's gradient of each of ``params`` (``None`` where the loss does not reach it):
    one backward per task graph, graphs kept for the next. Nothing is flattened or copied."""
    return [list(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))
            for loss in losses.values()]


def task_gradients(losses: dict[str, torch.Tensor], shared: list[torch.nn.Parameter]) -> torch.Tensor:
    """``[T, D]``: each loss's gradient w.r.t. the shared parameters, flattened (zeros where a
    loss does not reach a parameter)."""
    return torch.stack([torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1)
                                   for x, p in zip(g, shared)]) for g in per_task_gradients(losses, shared)])


def _average_over_workers(grads: list[list[torch.Tensor | None]], shared: list[torch.nn.Parameter]) -> None:
    """Replace the per-task gradients of ``shared`` by their average over data-parallel workers
    (one all-reduce of the flattened ``[T, D]``), in place; nothing to do on one worker."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    G = global_task_gradients(torch.stack([torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1)
                                                      for x, p in zip(g, shared)]) for g in grads]))
    for t, g in enumerate(grads):
        g[:] = [part.view_as(p) for part, p in zip(G[t].split([p.numel() for p in shared]), shared)]


def gramian(grads: list[list[torch.Tensor | None]]) -> torch.Tensor:
    """``[T, T]`` float64 inner products of the tasks' gradients, accumulated parameter by
    parameter (``G @ G.T`` without building ``G``)."""
    T = len(grads)
    device = next((x.device for g in grads for x in g if x is not None), torch.device("cpu"))
    gram = torch.zeros(T, T, dtype=torch.float64, device=device)
    for i in range(T):
        for j in range(i, T):
            dots = [torch.dot(a.reshape(-1).float(), b.reshape(-1).float())
                    for a, b in zip(grads[i], grads[j]) if a is not None and b is not None]
            if dots:
                gram[i, j] = gram[j, i] = torch.stack(dots).double().sum()
    return gram


def gramian_factor(gram: torch.Tensor) -> torch.Tensor:
    """A ``[T, T]`` matrix ``R`` with ``R @ R.T == gram``. Every registered method's weights
    depend on the task gradients only through their Gramian (TorchJD's Gramian-weighted
    aggregators; Nash-MTL uses ``G G^T`` and ``|w G|``), so ``task_weights(fuse, R)`` are the
    weights of the full ``[T, D]`` matrix."""
    lam, V = torch.linalg.eigh(gram)
    return V * lam.clamp(min=0).sqrt()


def task_weights(fuse: Fusion, G: torch.Tensor) -> torch.Tensor:
    """``[T]`` weights ``w`` with ``fuse(G) == w @ G`` (every method here is a weighted
    aggregator; a single task weighs 1)."""
    if G.shape[0] == 1:
        return torch.ones(1, dtype=G.dtype, device=G.device)
    return fuse.weighting(G).to(G.dtype)


def _diagnose(names: list[str], gram: torch.Tensor, w: torch.Tensor, diagnostics: dict) -> None:
    norms = gram.diagonal().clamp(min=0).sqrt().clamp(min=1e-12)
    cos = gram / norms[:, None] / norms[None, :]                     # [T, T]
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            diagnostics[f"gradcos_{names[i]}_{names[j]}"] = cos[i, j].item()
        diagnostics[f"fusion_weight_{names[i]}"] = w[i].item()
    w = w.to(gram.dtype)
    diagnostics["fused_norm"] = (w @ gram @ w).clamp(min=0).sqrt().item()


def preferred(w: torch.Tensor, names, prefs: dict[str, float] | None) -> torch.Tensor:
    """The method's weights ``w`` (one per name) scaled by the task preferences ``prefs``."""
    if not prefs:
        return w
    return w * torch.tensor([prefs.get(n, 1.0) for n in names], dtype=w.dtype, device=w.device)


def _combine(w: list[float], parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    """``sum_t w_t parts_t`` over the tasks whose part exists (``None``: none does)."""
    out = None
    for wt, x in zip(w, parts):
        if x is not None:
            out = x * wt if out is None else out.add_(x, alpha=wt)
    return out


class _HandOver(torch.autograd.Function):
    """A zero scalar whose backward gives each of ``params`` the gradient in ``grads`` (times
    the incoming gradient: DeepSpeed scales the loss for accumulation); a ``None`` gives none,
    as a backward that never reached the parameter. A loss for ``engine.backward`` whose
    gradients were computed already, without a forward or a copy."""

    @staticmethod
    def forward(ctx, grads, *params):
        ctx.grads = grads
        return params[0].new_zeros(())

    @staticmethod
    def backward(ctx, out):
        grads, ctx.grads = ctx.grads, None
        scale = float(out)
        return (None, *(g if g is None or scale == 1.0 else g * scale for g in grads))


def _fused_step(losses: dict[str, torch.Tensor], shared: list[torch.nn.Parameter],
                others: list[torch.nn.Parameter], weigh: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                diagnostics: dict | None) -> torch.Tensor:
    """One backward per task over ``shared + others`` -> the step's loss.
    ``weigh(R)``, with ``R`` a ``[T, T]`` factor of the shared gradients' Gramian
    (``gramian_factor``), gives the weights of the shared gradients and of the other parameters'.
    Per parameter, the shared parameters get ``sum_t w_t g_t`` (zeros if no task reaches one:
    every worker hands DeepSpeed the same set), the others ``sum_t w'_t g_t`` or nothing."""
    k = len(shared)
    grads = per_task_gradients(losses, list(shared) + list(others))
    mine = [g[:k] for g in grads]
    _average_over_workers(mine, shared)                              # every worker: the same
    gram = gramian(mine)
    w, w_others = weigh(gramian_factor(gram))
    if diagnostics is not None:
        _diagnose(list(losses), gram, w, diagnostics)
    w, w_others = w.tolist(), w_others.tolist()
    fused = [_combine(w, [g[i] for g in mine]) for i in range(k)]
    fused = [x if x is not None else torch.zeros_like(p) for x, p in zip(fused, shared)]
    fused += [_combine(w_others, [g[i] for g in grads]) for i in range(k, len(shared) + len(others))]
    return _HandOver.apply(fused, *shared, *others)


def fused_surrogate(losses: dict[str, torch.Tensor], shared: list[torch.nn.Parameter],
                    heads: list[torch.nn.Parameter], fuse: Fusion,
                    diagnostics: dict | None = None, prefs: dict[str, float] | None = None) -> torch.Tensor:
    """A scalar whose gradient w.r.t. the shared parameters is the fused gradient and w.r.t.
    every other parameter (task heads, PALs) is the plain gradient of the summed losses (each
    scaled by its preference ``prefs[task]``, default 1). Both come from the same one backward
    per task.

    ``engine.backward(surrogate)`` then leaves DeepSpeed in charge of accumulation,
    averaging (every worker holds the same fused vector), clipping and ZeRO 1-2 partitioning.
    """
    names = list(losses)

    def weigh(R):
        ones = torch.ones(len(names), dtype=R.dtype, device=R.device)
        return preferred(task_weights(fuse, R), names, prefs), preferred(ones, names, prefs)

    return _fused_step(losses, shared, heads, weigh, diagnostics)


class PeriodicFusion:
    """``fusion_every`` = N > 1: per-task gradients and the fusion method's weights every N
    steps; in between, ``sum_t w_t * loss_t`` with the last weights: one ordinary backward.

    On a refresh step the per-task backwards (over the shared parameters and ``others``, the
    heads and PALs) already hold every gradient the step needs, so the step's loss hands
    DeepSpeed ``sum_t w_t g_t`` without another backward through the encoder; with the
    Gramian-only weights (module docstring) a refresh step costs about what a plain one does.
    The shared parameters get exactly the fused gradient on a refresh step and the same
    weighting of fresh gradients in between. A task's own parameters (``owners``: its head,
    PALs, own layers) get its plain gradient (times its preference) on every step, as with
    ``fused_surrogate``: a hook on each divides out the ``w_t`` the weighted loss (or the
    refresh step's weighted sum) put on it; parameters of several tasks (a learned prefix's
    table) keep the weighted sum. (Scaled by ``w_t`` instead, as before, a task whose weight
    falls during the run trains its own parameters at a falling rate: AdamW's second moment
    remembers the larger early gradients.) ``weigh_owners=True`` keeps the old scaling.
    Weights are kept per set of tasks in the step (samplers that pick a subset), so each set
    is refreshed on its own schedule.
    """

    def __init__(self, fuse: Fusion, every: int, owners: dict[str, list[torch.nn.Parameter]] | None = None,
                 weigh_owners: bool = False):
        self.fuse, self.every = fuse, every
        self.weights: dict[tuple[str, ...], tuple[torch.Tensor, int]] = {}
        self.unweigh: dict[str, float] = {}         # per task, this backward: 1 / w_t on its own grads
        self.weigh_owners = weigh_owners
        for task, params in ({} if weigh_owners else owners or {}).items():
            for p in params:
                p.register_hook(functools.partial(self._own_gradient, task))

    def _own_gradient(self, task: str, grad: torch.Tensor) -> torch.Tensor:
        scale = self.unweigh.get(task, 1.0)
        return grad if scale == 1.0 else grad * scale

    def loss(self, losses: dict[str, torch.Tensor], shared: list[torch.nn.Parameter], step: int,
             diagnostics: dict | None = None, prefs: dict[str, float] | None = None,
             others: list[torch.nn.Parameter] = ()) -> torch.Tensor:
        """The step's loss; ``prefs`` scale the method's held weights (``preferred``);
        ``others`` are the trainable parameters outside ``shared`` (they train on every step)."""
        key, self.unweigh = tuple(losses), {}
        if len(key) == 1:
            loss, pref = next(iter(losses.values())), (prefs or {}).get(key[0], 1.0)
            return loss if pref == 1.0 else pref * loss
        held = self.weights.get(key)
        if held is None or step - held[1] >= self.every:
            def weigh(R):
                self.weights[key] = (task_weights(self.fuse, R), step)
                self._unweigh_owners(key)
                w = preferred(self.weights[key][0], key, prefs)
                return w, w
            return _fused_step(losses, shared, others, weigh, diagnostics)
        self._unweigh_owners(key)
        w = preferred(held[0], key, prefs)
        return sum(wt * loss for wt, loss in zip(w.tolist(), losses.values()))

    def _unweigh_owners(self, key: tuple[str, ...]) -> None:
        """This backward's owned gradients arrive times the held ``w_t``: divide it out."""
        if not self.weigh_owners:
            self.unweigh = {t: 1.0 / wt for t, wt in zip(key, self.weights[key][0].tolist()) if wt != 0}

    def state_dict(self) -> dict:
        """The held weights, checkpointed so a resumed run continues the same schedule."""
        return {"|".join(key): {"weights": w.tolist(), "step": step} for key, (w, step) in self.weights.items()}

    def load_state_dict(self, state: dict) -> None:
        self.weights = {tuple(k.split("|")): (torch.tensor(v["weights"]), int(v["step"])) for k, v in state.items()}
