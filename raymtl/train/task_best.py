"""Each task's own parts at that task's best validation (``train.keep_task_best``).

A task's own parts (its head, PALs and own top layers: ``MultiTaskModel.own_named_parameters``)
are reached by its loss alone, so one task can keep the parts of an earlier step while the
shared encoder goes on learning the others. Measured in the one-hour recipe (seed 2, fp32):
SST peaks at step 600 (2.5 epochs) and falls back while Quora and STS improve to step 1,050
and beyond; SST's own layers and head of step 600 put onto the step-1,050 model score SST
0.4941 (its live 0.4719, its best 0.4906), overall 0.7655 against the run's best 0.7591; on
seed 42, where SST falls less, it gained nothing (docs/quality-log.md, "Each task's own parts
at its best validation").

At every validation the loop hands the live scores to ``TaskBest.validate``: a task at a new
best has its own parts copied (fp32: the master weights in a bf16 run); a task below its best
is scored again with the copied parts in place. Where they score higher the reported score is
theirs and the checkpoint's model (``export``) carries them. Training always continues with
the live weights, which are put back before the checkpoint is written, and the DeepSpeed
state (what a resumed run loads) is the live one; the copies travel in its client state.
Not under ZeRO-3 (its parameters are partitioned; the config refuses the combination).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from raymtl.analysis.metrics import overall
from raymtl.train.engine import master_weights


class TaskBest:
    def __init__(self, model):
        self.parts = model.own_named_parameters()           # task -> {name: parameter}
        self.best: dict[str, dict] = {}                      # task -> {"score", "step", "state": {name: fp32}}
        self.kept: dict[str, int] = {}                       # task -> step of the parts in the last export

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.best = state["best"]

    @contextmanager
    def _in_place(self, tasks: list[str]):
        """The best parts of ``tasks`` in the model for the block, the live ones afterwards."""
        live = {n: p.detach().clone() for t in tasks for n, p in self.parts[t].items()}
        with torch.no_grad():
            for t in tasks:
                for n, p in self.parts[t].items():
                    p.copy_(self.best[t]["state"][n])
        try:
            yield
        finally:
            with torch.no_grad():
                for t in tasks:
                    for n, p in self.parts[t].items():
                        p.copy_(live[n])

    def validate(self, engine, stage, scores: dict[str, float], step: int, rank: int, world: int
                 ) -> tuple[dict[str, float], str]:
        """Collective. ``scores``: the live model's validation. Returns the scores of the model the
        checkpoint will hold and a note for the validation line ("" when it is the live model)."""
        masters = master_weights(engine)          # collective; None in fp32 (the module is fp32)
        for t, named in self.parts.items():
            if t not in self.best or scores[f"val_{t}"] > self.best[t]["score"]:
                self.best[t] = {"score": scores[f"val_{t}"], "step": step, "state": {
                    n: (masters[id(p)] if masters else p.detach().float().cpu()).clone() for n, p in named.items()}}
        behind = [t for t in self.parts if self.best[t]["step"] != step]
        self.kept = {}
        if not behind:
            return scores, ""
        with self._in_place(behind):
            again = stage.validate(engine.module, rank, world, only=behind, known=scores)
        self.kept = {t: self.best[t]["step"] for t in behind if again[f"val_{t}"] > scores[f"val_{t}"]}
        if not self.kept:
            return scores, ""
        per_task = {k[4:]: again[k] if k[4:] in self.kept else v for k, v in scores.items() if k.startswith("val_")}
        out = {**{f"val_{t}": v for t, v in per_task.items()}, "overall": overall(per_task)}
        out.update({f"live_{k}": v for k, v in scores.items()})
        out.update({f"kept_step_{t}": s for t, s in self.kept.items()})
        note = "; ".join(f"{t}'s own parts of step {s}, live {scores[f'val_{t}']:.4f}" for t, s in self.kept.items())
        return out, note

    def export(self) -> dict[str, torch.Tensor]:
        """The fp32 values the checkpoint's model takes instead of the live ones (``validate``'s choice)."""
        return {n: v for t in self.kept for n, v in self.best[t]["state"].items()}
