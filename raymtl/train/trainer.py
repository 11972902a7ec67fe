"""Driver side: read and tokenize the data, build the ``TorchTrainer``, fit, summarise."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from raymtl.config import MTLConfig
from raymtl.data.streams import configure_ray_data, ingest_options
from raymtl.stages.base import Stage
from raymtl.stages.multitask import MTLStage
from raymtl.stages.pretrain import PretrainJobConfig, PretrainStage
from raymtl.train.loop import train_loop_per_worker


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in ``RAY_ADDRESS`` (``ray job submit`` sets it), else start a local one."""
    import ray
    configure_ray_data()
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, dashboard_host="127.0.0.1", log_to_driver=True)


@dataclass
class FitSummary:
    metrics: dict
    best_checkpoint: str | None
    best_metrics: dict
    run_dir: str


def storage_path(output: str) -> str:
    return output if "://" in output else str(Path(output).expanduser().resolve())


def build_trainer(cfg: MTLConfig, datasets: dict, train_sizes: dict[str, int], loop=None, callbacks=None,
                  stage=None):
    """A ``TorchTrainer`` running the shared loop for ``stage`` (default: the config's own);
    ``train_<name>`` datasets are split across workers, the others (validation) are not.
    One worker reads every dataset whole: a ``streaming_split`` of one would only add a
    coordinator actor per dataset that competes with training for the CPUs."""
    import ray.train
    from ray.train.torch import TorchTrainer

    stage = stage or stage_of(cfg)
    s = cfg.scale
    scaling = ray.train.ScalingConfig(
        num_workers=s.num_workers, use_gpu=s.use_gpu, placement_strategy=s.placement_strategy,
        resources_per_worker={"CPU": s.cpus_per_worker, **({"GPU": 1} if s.use_gpu else {})})
    run = ray.train.RunConfig(
        name=cfg.run.name, storage_path=storage_path(cfg.run.output),
        checkpoint_config=ray.train.CheckpointConfig(
            num_to_keep=cfg.run.keep_checkpoints, checkpoint_score_attribute=stage.score,
            checkpoint_score_order="max"),
        failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
        callbacks=callbacks,
        # Ray reads this variable when it starts the worker process (its job driver uses it too).
        worker_runtime_env={"env_vars": {"RAY_worker_niceness": str(s.worker_niceness)}})
    return TorchTrainer(
        loop or train_loop_per_worker,
        train_loop_config={"stage": stage, "cfg": cfg.to_dict(), "train_sizes": train_sizes},
        scaling_config=scaling, run_config=run, datasets=datasets,
        dataset_config=ray.train.DataConfig(
            datasets_to_split=[k for k in datasets if k.startswith("train_") and s.num_workers > 1],
            execution_options=ingest_options()))


STAGES: dict[type, type[Stage]] = {PretrainJobConfig: PretrainStage, MTLConfig: MTLStage}


def stage_of(cfg: MTLConfig) -> type[Stage]:
    """The stage a config trains: by its class (the most derived one registered)."""
    return next(STAGES[c] for c in type(cfg).__mro__ if c in STAGES)


def fit(cfg: MTLConfig, verbose: bool = True, callbacks=None, stage: type[Stage] | None = None) -> FitSummary:
    """The one driver of every stage: prepare its data, run the shared loop on Ray Train,
    summarise. ``stage`` defaults to the config's own (``stage_of``)."""
    stage = stage or stage_of(cfg)
    ensure_ray()
    datasets, sizes = stage.prepare(cfg, verbose)
    result = build_trainer(cfg, datasets, sizes, callbacks=callbacks, stage=stage).fit()
    summary = summarize(result, stage.score)
    if verbose:
        stage.print_summary(summary)
    return summary


def fit_once(cfg: MTLConfig, verbose: bool = False) -> dict:
    """The best checkpoint's metrics of the run ``cfg.run.output/cfg.run.name``, training it
    only if that run has not finished before (benchmarks and sweeps re-run step by step).
    The record, ``best_metrics.json`` in the run directory, names the best checkpoint and
    keeps the run's config: a finished run is read back only for the same config (the run
    settings ``output`` and ``name`` aside), else the call fails naming the fields that differ."""
    record = Path(storage_path(cfg.run.output)) / cfg.run.name / "best_metrics.json"
    asked = json.loads(json.dumps(cfg.to_dict()))               # tuples as lists, as saved
    if "://" not in cfg.run.output and record.is_file():
        metrics = json.loads(record.read_text())
        differ = config_differences(metrics.pop("config", {}), asked)
        if differ:
            raise ValueError(f"{record.parent} finished with another config ({'; '.join(differ[:6])}"
                             f"{'; ...' if len(differ) > 6 else ''}): remove that run or choose another "
                             "output or name")
        return metrics
    summary = fit(cfg, verbose=verbose)
    metrics = {**summary.best_metrics, "best_checkpoint": summary.best_checkpoint}
    if "://" not in cfg.run.output:
        record.write_text(json.dumps({**metrics, "config": asked}, indent=2))
    return metrics


IDENTITY_FIELDS = ("output", "name")     # where a run lives, not what it trains


def config_differences(saved: dict, asked: dict) -> list[str]:
    """'field: saved X, asked Y' for every field (besides where the run lives) that differs
    between two ``to_dict()`` configs; a record without a config cannot be matched."""
    if not saved:
        return ["the record keeps no config (written before raymtl kept one)"]
    old, new = ({k: v for part in d.values() for k, v in part.items() if k not in IDENTITY_FIELDS}
                for d in (saved, asked))
    return [f"{k}: saved {old.get(k, '(absent)')!r}, asked {new.get(k, '(absent)')!r}"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def summarize(result, score: str) -> FitSummary:
    """The run's last metrics and its best checkpoint by ``score`` (higher is better)."""
    best = result.get_best_checkpoint(score, "max") if result.best_checkpoints else None
    best_metrics = next((m for c, m in result.best_checkpoints if best and c.path == best.path), {})
    return FitSummary(metrics=result.metrics or {}, best_checkpoint=best.path if best else None,
                      best_metrics=best_metrics, run_dir=result.path)
