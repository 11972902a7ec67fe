"""Loss weighting: turn per-task losses into the weighted per-task terms that get summed
(or fused). Each method is an ``nn.Module`` built as ``(tasks, weights, **its own settings)``
with the same call ``(losses: dict[task, scalar], step) -> dict[task, scalar]``, registered in
``WEIGHTINGS``; ``make_weighting`` hands it the run's settings.
Learnable weights are parameters of the module, which the training loop attaches to the
model so DeepSpeed optimizes them (at ``head_lr``) and checkpoints them.
"""
from __future__ import annotations

import torch
from torch import nn


class Fixed(nn.Module):
    """Constant weights from config (``task_weights``); missing tasks weigh 1."""

    def __init__(self, tasks, weights):
        super().__init__()
        self.w = {t: float(weights.get(t, 1.0)) for t in tasks}

    def forward(self, losses, step):
        return {t: self.w[t] * v for t, v in losses.items()}


class Uncertainty(nn.Module):
    """Kendall, Gal & Cipolla 2018: L = sum_t exp(-s_t) L_t / 2 + s_t / 2, s_t = log sigma_t^2 learned."""

    def __init__(self, tasks, weights):
        super().__init__()
        self.index = {t: i for i, t in enumerate(tasks)}
        self.log_var = nn.Parameter(torch.zeros(len(tasks)))

    def forward(self, losses, step):
        s = self.log_var
        return {t: 0.5 * torch.exp(-s[self.index[t]]) * v + 0.5 * s[self.index[t]] for t, v in losses.items()}


DWA_WINDOW, DWA_TEMPERATURE = 50, 2.0    # TrainConfig.dwa_window, dwa_temperature


class DynamicWeightAverage(nn.Module):
    """Liu, Johns & Davison 2019 (MTAN): w_t = T softmax_t(r_t / temp), r_t = L_t(k-1) / L_t(k-2),
    with k counting windows of ``window`` steps (the paper's epochs)."""

    def __init__(self, tasks, weights, window: int = DWA_WINDOW, temp: float = DWA_TEMPERATURE):
        super().__init__()
        self.tasks, self.window, self.temp = list(tasks), window, temp
        self.history: list[dict[str, float]] = []   # mean loss per finished window
        self.current: dict[str, list[float]] = {t: [] for t in tasks}

    def weights(self) -> dict[str, float]:
        if len(self.history) < 2:
            return {t: 1.0 for t in self.tasks}
        prev, prev2 = self.history[-1], self.history[-2]
        r = torch.tensor([prev[t] / max(prev2[t], 1e-8) for t in self.tasks])
        w = len(self.tasks) * torch.softmax(r / self.temp, 0)
        return dict(zip(self.tasks, w.tolist()))

    def client_state(self) -> dict:
        """The loss history a resumed run needs (saved with the checkpoint by the loop)."""
        return {"history": self.history, "current": self.current}

    def load_client_state(self, state: dict) -> None:
        self.history = [dict(h) for h in state["history"]]
        self.current = {t: list(state["current"].get(t, [])) for t in self.tasks}

    def forward(self, losses, step):
        for t, v in losses.items():
            self.current[t].append(v.item())
        if step > 0 and step % self.window == 0 and all(self.current.values()):
            self.history.append({t: sum(v) / len(v) for t, v in self.current.items()})
            self.current = {t: [] for t in self.tasks}
        w = self.weights()
        return {t: w[t] * v for t, v in losses.items()}


class LearnedSoftmax(nn.Module):
    """Weights T softmax(theta) with theta learned jointly (initialised uniform). Note: left
    alone this drifts weight towards the task with the smallest loss; pair it with care."""

    def __init__(self, tasks, weights):
        super().__init__()
        self.index = {t: i for i, t in enumerate(tasks)}
        self.theta = nn.Parameter(torch.zeros(len(tasks)))

    def forward(self, losses, step):
        w = len(self.index) * torch.softmax(self.theta, 0)
        return {t: w[self.index[t]] * v for t, v in losses.items()}


WEIGHTINGS = {"fixed": Fixed, "uncertainty": Uncertainty, "dwa": DynamicWeightAverage,
              "softmax": LearnedSoftmax}


def make_weighting(name: str, tasks, weights: dict[str, float], dwa_window: int = DWA_WINDOW,
                   dwa_temperature: float = DWA_TEMPERATURE) -> nn.Module:
    """The weighting ``name`` with the settings of the methods that have them
    (``TrainConfig.dwa_window``, ``dwa_temperature``); unknown names list the valid ones."""
    if name not in WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {name!r}; valid: {sorted(WEIGHTINGS)}")
    settings = {"dwa": {"window": dwa_window, "temp": dwa_temperature}}.get(name, {})
    return WEIGHTINGS[name](list(tasks), weights, **settings)
