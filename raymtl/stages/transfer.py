"""Transfer strategies for one target task: which tasks to train with it, and in what order.

Weller, Seppi & Gardner 2022 ("When to Use Multi-Task Learning vs Intermediate Fine-Tuning for
Pre-Trained Encoder Transfer Learning", arXiv 2205.08124) compare, on GLUE, for a target task
and one supporting task:

    mtl_all   every task of the config trained jointly (raymtl's default, ``jobs/mtl.py``)
    pairwise  the target and the supporting task trained jointly
    stilts    intermediate fine-tuning (Phang et al. 2018, "STILTs"): the supporting task alone,
              then the target alone, starting from that run's best checkpoint (its encoder;
              the target gets a fresh head, ``MultiTaskModel.load``)
    auto      their size heuristic (``choose``): pairwise when the target has fewer training
              rows than the supporting task, else stilts. It held in over 92% of their pairs;
              they also found mtl_all worse than the pairwise methods in almost every case.

Every run is an ordinary run of the one training loop, and each strategy is a list of
``Run``\\ s chained by ``raymtl.stages.pipeline.run_stages``: a run whose config, data and upstream runs
are unchanged is read back, not retrained (so a benchmark that was interrupted continues), and
a stilts run's second stage starts from its first stage's best checkpoint (``init_from``).
Runs that are the same training are shared by name: one ``mtl_all`` run serves every target,
one ``pairwise-A-B`` run serves A and B, one ``stilts-S`` run serves every target supported by S.

Same budget. With the config's ``steps`` = N and ``batch_size`` = B, and ``sampling`` =
``round_robin`` (the default: every task a batch every step):

    mtl_all   N joint steps: N x B rows of the target and of every other task
    pairwise  N joint steps: N x B rows of the target and N x B of the supporting task
    stilts    N steps on the supporting task (N x B rows), then N steps on the target (N x B rows)

so the target always trains on N x B rows, and the supporting task on N x B rows. The result of
a strategy is the target's validation metric in its last run's best checkpoint (ranked by the
run's ``overall``, which for a one-task run is the target's own metric); ``bench/transfer.py``
validates only at the end (``eval_every = steps``) so that no strategy gets to pick its step.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from raymtl.config import DataConfig, MTLConfig
from raymtl.data.multitask import load_splits
from raymtl.data.related import RELATED
from raymtl.stages.pipeline import Step, data_fingerprint, run_stages, stage_result
from raymtl.tasks import TASKS
from raymtl.train.trainer import fit as fit_run
from raymtl.train.trainer import storage_path


@dataclass(frozen=True)
class Run:
    """One training run of a strategy."""
    name: str                      # stage name; runs that are the same training share it
    cfg: MTLConfig
    after: str | None = None       # start from this run's best checkpoint (init_from)


def narrowed(base: MTLConfig, tasks: tuple[str, ...], name: str) -> MTLConfig:
    """``base`` on ``tasks`` only; related sets and teacher outputs of other tasks dropped."""
    return base.replace(
        tasks=tasks, name=name,
        related_sets=tuple(r for r in base.data.related_sets if RELATED[r].target in tasks),
        teacher_outputs={t: d for t, d in base.distill.teacher_outputs.items() if t in tasks})


def in_table_order(*tasks: str) -> tuple[str, ...]:
    return tuple(t for t in TASKS if t in tasks)


# ---------------------------------------------------------------- the strategies
def mtl_all(base: MTLConfig, target: str, support: str | None) -> list[Run]:
    """All of the config's tasks jointly (the support, if given, is one of them or ignored)."""
    if target not in base.data.tasks:
        raise ValueError(f"mtl_all trains the config's tasks {list(base.data.tasks)}, which do not "
                         f"include the target {target!r}")
    return [Run("mtl_all", narrowed(base, base.data.tasks, "mtl_all"))]


def pairwise(base: MTLConfig, target: str, support: str | None) -> list[Run]:
    """The target and the supporting task jointly; one run serves both directions."""
    pair = in_table_order(target, support)
    name = "pairwise-" + "-".join(pair)
    return [Run(name, narrowed(base, pair, name))]


def stilts(base: MTLConfig, target: str, support: str | None) -> list[Run]:
    """The supporting task alone, then the target alone from its best checkpoint."""
    first, second = f"stilts-{support}", f"stilts-{support}-{target}"
    return [Run(first, narrowed(base, (support,), first)),
            Run(second, narrowed(base, (target,), second), after=first)]


STRATEGIES: dict[str, Callable[[MTLConfig, str, str | None], list[Run]]] = {
    "mtl_all": mtl_all, "pairwise": pairwise, "stilts": stilts}
CHOICES = (*STRATEGIES, "auto")
NEEDS_SUPPORT = ("pairwise", "stilts", "auto")


def check(strategy: str, target: str, support: str | None) -> None:
    """Reject an unknown strategy or task, a missing support, and target == support."""
    if strategy not in CHOICES:
        raise ValueError(f"strategy={strategy!r} is not valid; choose one of {list(CHOICES)}")
    for role, task in (("target", target), ("support", support)):
        if task is not None and task not in TASKS:
            raise ValueError(f"{role}={task!r} is not a task; choose one of {list(TASKS)}")
    if support is None and strategy in NEEDS_SUPPORT:
        raise ValueError(f"strategy={strategy!r} needs a supporting task (support=one of "
                         f"{[t for t in TASKS if t != target]})")
    if support == target:
        raise ValueError(f"support={support!r} is the target itself; choose another task")


def choose(target: str, support: str, sizes: dict[str, int]) -> tuple[str, str]:
    """Weller et al. 2022's heuristic -> (strategy, reason). ``sizes``: training rows per task."""
    check("auto", target, support)
    missing = [t for t in (target, support) if t not in sizes]
    if missing:
        raise ValueError(f"no training size for {missing}; sizes has {sorted(sizes)}")
    n_t, n_s = sizes[target], sizes[support]
    if n_t < n_s:
        return "pairwise", (f"the target {target} has fewer training rows than {support} ({n_t:,} < "
                            f"{n_s:,}): pairwise MTL (Weller et al. 2022: pairwise wins when the target "
                            "is the smaller task)")
    return "stilts", (f"the target {target} has at least as many training rows as {support} ({n_t:,} >= "
                      f"{n_s:,}): STILTs, {support} first, then {target} (Weller et al. 2022: intermediate "
                      "fine-tuning wins when the target is the larger task)")


def train_sizes(data: DataConfig) -> dict[str, int]:
    """Training rows per task after the validation split, as training carves them (the task's
    own rows: related sets are not counted)."""

    splits, _ = load_splits(dataclasses.replace(data, related_sets=()))
    return {t: len(parts[0]) for t, parts in splits.items()}


def resolve(strategy: str, target: str, support: str | None,
            sizes: dict[str, int] | None = None, data: DataConfig | None = None) -> tuple[str, str]:
    """(concrete strategy, reason); ``auto`` reads ``sizes`` (or counts them in ``data``)."""
    check(strategy, target, support)
    if strategy != "auto":
        return strategy, "chosen by the caller"
    return choose(target, support, sizes if sizes is not None else train_sizes(data or DataConfig()))


def plan(strategy: str, target: str, support: str | None, base: MTLConfig) -> list[Run]:
    """The runs of a concrete strategy (not ``auto``: ``resolve`` it first)."""
    check(strategy, target, support)
    if strategy == "auto":
        raise ValueError("plan() takes a concrete strategy; resolve 'auto' with resolve() first")
    return STRATEGIES[strategy](base, target, support)


# ---------------------------------------------------------------- running a strategy
@dataclass
class Outcome:
    strategy: str                  # the concrete strategy that ran
    target: str
    support: str | None
    score: float                   # val_<target> of the last run's best checkpoint
    reason: str
    runs: dict[str, dict] = field(default_factory=dict)   # run name -> {checkpoint, metrics}


def stages(runs: list[Run], output: str, results: dict[str, dict], fit=None, verbose: bool = True):
    """``raymtl.stages.pipeline.Step``\\ s for ``runs``: each trains its config into the stage's run
    directory; a run with ``after`` starts from that run's best checkpoint (read from
    ``results``, which ``run_stages`` fills, also for a skipped run)."""

    def trainer(run: Run) -> Callable[[str], dict]:
        def train(run_dir: str) -> dict:
            cfg = run.cfg.replace(output=run_dir)
            if run.after:
                cfg = cfg.replace(init_from=results[run.after]["checkpoint"])
            return stage_result((fit or fit_run)(cfg, verbose=verbose), run.name)
        return train

    out = []
    for run in runs:
        d = run.cfg.data
        files = [TASKS[t].path for t in d.tasks] + [p for r in d.related_sets for p in RELATED[r].paths]
        inputs = {"config": run.cfg.replace(output=output).to_dict(), "data": data_fingerprint(d.data_dir, files)}
        out.append(Step(run.name, inputs, trainer(run), after=[run.after] if run.after else []))
    return out


def run_strategy(base: MTLConfig, strategy: str, target: str, support: str | None = None,
                 sizes: dict[str, int] | None = None, fit=None, verbose: bool = True, say=print) -> Outcome:
    """Train ``target`` with ``strategy`` under ``base.run.output`` and return its score.

    ``fit(cfg, verbose) -> FitSummary`` defaults to ``raymtl.train.trainer.fit`` (Ray Train)."""
    if "://" in base.run.output:
        raise ValueError(f"output={base.run.output!r}: transfer runs keep their records (stage.json) on a "
                         "local or mounted path; use one (an NFS mount on a cluster)")
    concrete, reason = resolve(strategy, target, support, sizes, base.data)
    if strategy == "auto":
        say(f"[raymtl] transfer: auto chose {concrete}: {reason}")
    runs = plan(concrete, target, support, base)
    output = storage_path(base.run.output)
    Path(output).mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    run_stages(stages(runs, output, results, fit, verbose), output, say=say, results=results)
    last = results[runs[-1].name]
    return Outcome(concrete, target, support, last["metrics"][f"val_{target}"], reason,
                   {r.name: results[r.name] for r in runs})
