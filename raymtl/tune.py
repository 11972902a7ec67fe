"""Ray Tune: search spaces from files, one real Ray Train run per trial, resume.

A search space file (``search_spaces/*.json``) maps config field names to a domain::

    {"lr": {"loguniform": [1e-5, 2e-4]}, "fusion": {"choice": ["sum", "pcgrad"]},
     "task_weights": {"sst": {"uniform": [0.5, 2.0]}, "sts": {"uniform": [0.5, 2.0]}}}

Domains: ``choice``, ``uniform``, ``loguniform``, ``randint``, ``grid``; a plain value is fixed.
Each trial is a Tune function that builds and fits a ``TorchTrainer`` (its own workers and
DeepSpeed config) with ``TuneReportCallback``, named after the trial id so a retried trial
resumes its own Train run.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from raymtl.config import MTLConfig, field_owners
from raymtl.stages.multitask import prepare_data
from raymtl.train.trainer import build_trainer, storage_path

DOMAINS = {"choice", "uniform", "loguniform", "randint", "grid"}


def load_space(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"search space file {p} does not exist")
    space = json.loads(p.read_text())
    owners = field_owners()
    for key, spec in space.items():
        if key not in owners:
            raise ValueError(f"{p}: {key!r} is not a config field; valid fields: {sorted(owners)}")
        for sub in (spec.values() if key == "task_weights" else [spec]):
            if isinstance(sub, dict) and not (len(sub) == 1 and next(iter(sub)) in DOMAINS):
                raise ValueError(f"{p}: {key!r} has domain {sub!r}; use one of {sorted(DOMAINS)}")
    return space


def candidate_values(spec) -> list:
    """The values a domain can produce, for validation against the config."""
    if not isinstance(spec, dict):
        return [spec]
    kind, args = next(iter(spec.items()))
    return list(args) if kind in ("choice", "grid") else [args[0], args[1]]


def validate_space(space: dict[str, Any], base: MTLConfig) -> None:
    """Every value every domain can produce is accepted by the config."""
    for key, spec in space.items():
        if key == "task_weights":
            for task, sub in spec.items():
                for v in candidate_values(sub):
                    base.replace(task_weights={task: v})
        else:
            for v in candidate_values(spec):
                base.replace(**{key: v})


def to_tune(spec):
    from ray import tune
    if isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DOMAINS:
        kind, args = next(iter(spec.items()))
        return {"choice": lambda a: tune.choice(a), "grid": lambda a: tune.grid_search(a),
                "uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a),
                "randint": lambda a: tune.randint(*a)}[kind](args)
    if isinstance(spec, dict):
        return {k: to_tune(v) for k, v in spec.items()}
    return spec


def trial_config(base: MTLConfig, params: dict[str, Any], run_output: str, run_name: str) -> MTLConfig:
    return base.replace(**params, output=run_output, name=run_name)


def run_trial(params: dict, base: dict, datasets: dict, sizes: dict, experiment_dir: str) -> None:
    """One Tune trial: a real Ray Train + DeepSpeed run of the multi-task loop."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(MTLConfig.from_dict(base), params, f"{experiment_dir}/train_runs", f"trial_{trial_id}")
    build_trainer(cfg, datasets, sizes, callbacks=[TuneReportCallback()]).fit()


TRIAL_CPUS = 0.25     # a trial's own driver: it only starts a TorchTrainer and waits on it


def fit_workers_beside_trial(base: MTLConfig, cluster_cpus: float, trial_cpus: float, say=print) -> MTLConfig:
    """A trial's Train workers start only when they fit beside the trial's own driver
    (``trial_cpus``); on a small cluster shrink ``cpus_per_worker`` so they do, instead of
    waiting forever for CPUs that never free up. (Torch threads round up: 1.75 CPUs -> 2.)"""
    s = base.scale
    need = s.num_workers * s.cpus_per_worker + trial_cpus
    if need <= cluster_cpus:
        return base
    fit = (cluster_cpus - trial_cpus) / max(s.num_workers, 1)
    if fit <= 0:
        raise ValueError(f"num_workers={s.num_workers} cannot fit on {cluster_cpus:g} CPUs beside a "
                         f"{trial_cpus:g}-CPU trial driver; lower num_workers")
    say(f"[raymtl] tune: {s.num_workers} worker(s) x {s.cpus_per_worker:g} CPUs + {trial_cpus:g} for the trial "
        f"driver exceed the cluster's {cluster_cpus:g} CPUs; using cpus_per_worker={fit:g}")
    return base.replace(cpus_per_worker=fit)


def trial_concurrency(base: MTLConfig, resources: dict[str, float], trial_cpus: float = TRIAL_CPUS) -> int:
    """How many trials run at once: as many as the cluster's CPUs (and GPUs) hold, each a
    trial driver plus its Train workers; at least 1."""
    s = base.scale
    fits = [resources.get("CPU", 0) // (s.num_workers * s.cpus_per_worker + trial_cpus)]
    if s.use_gpu:
        fits.append(resources.get("GPU", 0) // max(s.num_workers, 1))
    return max(1, int(min(fits)))


def build_tuner(base: MTLConfig, space: dict, *, num_samples: int, searcher: str, asha: bool,
                experiment: str, storage: str, max_failures: int = 1, trial_cpus: float = TRIAL_CPUS):
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    resources = ray.cluster_resources()
    base = fit_workers_beside_trial(base, resources.get("CPU", 0), trial_cpus)
    concurrent = trial_concurrency(base, resources, trial_cpus)
    print(f"[raymtl] tune: up to {concurrent} trial(s) at once on this cluster's resources", flush=True)
    datasets, sizes = prepare_data(base, verbose=True)
    storage = storage_path(storage)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base.to_dict(), datasets=datasets, sizes=sizes,
                             experiment_dir=f"{storage}/{experiment}"),
        {"cpu": trial_cpus})
    search_alg = None
    if searcher == "optuna":
        from ray.tune.search.optuna import OptunaSearch
        search_alg = OptunaSearch(seed=base.train.seed)
    scheduler = (ASHAScheduler(time_attr="training_iteration", grace_period=1, reduction_factor=2,
                               max_t=max(1, base.train.steps // base.train.eval_every + 1)) if asha else None)
    return tune.Tuner(
        trainable,
        param_space={k: to_tune(v) for k, v in space.items()},
        tune_config=tune.TuneConfig(metric="overall", mode="max", num_samples=num_samples,
                                    search_alg=search_alg, scheduler=scheduler,
                                    max_concurrent_trials=concurrent),
        run_config=tune.RunConfig(name=experiment, storage_path=storage,
                                  failure_config=tune.FailureConfig(max_failures=max_failures)),
    ), ray


def restore_tuner(path: str, base: MTLConfig):
    import ray
    from ray import tune

    base = fit_workers_beside_trial(base, ray.cluster_resources().get("CPU", 0), TRIAL_CPUS)
    datasets, sizes = prepare_data(base, verbose=True)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base.to_dict(), datasets=datasets, sizes=sizes,
                             experiment_dir=path), {"cpu": TRIAL_CPUS})
    return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
