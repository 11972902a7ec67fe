"""Driver side: read and tokenize the data, build the ``TorchTrainer``, fit, summarise."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from raymtl.config import MTLConfig, retired_no_op
from raymtl.data.streams import configure_ray_data, ingest_options
from raymtl.stages.base import Stage
from raymtl.stages.multitask import MTLStage
from raymtl.stages.pretrain import PretrainJobConfig, PretrainStage
from raymtl.stages.relations import RelationsJobConfig, RelationsStage
from raymtl.train.logs import mlflow_finish, mlflow_start
from raymtl.train.loop import TRAIN_LOG, train_loop_per_worker


def ensure_ray(num_cpus: int | None = None, verbose: bool = True) -> None:
    """Join the cluster in ``RAY_ADDRESS`` (``ray job submit`` sets it); else join the one Ray
    instance already running on this machine (another raymtl job's, or ``ray start``'s: two
    local instances disturb each other); else start a local one. Several running instances
    are refused, naming them."""
    import ray
    from ray._private.services import find_gcs_addresses
    configure_ray_data(verbose)
    if ray.is_initialized():
        return
    global QUIET
    QUIET = not verbose
    quiet = {} if verbose else {"log_to_driver": False, "logging_level": logging.ERROR}
    if os.environ.get("RAY_ADDRESS"):
        join_token_auth()
        ray.init(**{"log_to_driver": True, **quiet})
        return
    running = sorted(find_gcs_addresses())
    if len(running) > 1:
        raise RuntimeError(f"several Ray instances run on this machine ({', '.join(running)}); raymtl joins one, "
                           "never starts another: set RAY_ADDRESS to the one to use, or stop the others (ray stop)")
    if running:
        print(f"[raymtl] joining the Ray instance already running on this machine ({running[0]}): its jobs "
              "share the CPUs, and this run waits for free resources", flush=True)
        join_token_auth()
        ray.init(**{"address": running[0], "log_to_driver": True, **quiet})
        return
    ray.init(**{"num_cpus": num_cpus, "dashboard_host": "127.0.0.1", "log_to_driver": True, **quiet})


def join_token_auth() -> None:
    """Before joining a running cluster: Ray 2.60's clusters (``ray start --head``) use token auth,
    and a driver joins them only in token mode, which Ray reads when it is imported. With
    ``RAY_AUTH_MODE`` unset and a token at hand (``~/.ray/auth_token``, ``RAY_AUTH_TOKEN``), switch
    this process to token mode the way Ray's own start-up does; a cluster without auth accepts such
    a driver too. An explicit ``RAY_AUTH_MODE`` is left as it is."""
    from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


QUIET = False      # this process joined Ray without the workers' output (ensure_ray(verbose=False))


@contextlib.contextmanager
def console(run_dir: str):
    """With a quiet Ray connection, print the lines the run's rank 0 appends to
    ``<run dir>/train.log`` (``raymtl.train.loop.say``) while the block runs; the workers'
    other output stays in Ray's logs. A no-op when the workers' output reaches this process."""
    log = Path(run_dir) / TRAIN_LOG
    if not QUIET or "://" in run_dir:
        yield
        return
    print("[raymtl] progress below; Ray, Ray Data, DeepSpeed and transformers messages are in "
          "/tmp/ray/session_latest/logs (--verbose shows them here)", flush=True)
    start = log.stat().st_size if log.is_file() else 0
    stop = threading.Event()

    def follow():
        nonlocal start
        while True:
            done = stop.is_set()
            if log.is_file():
                with open(log, "rb") as f:
                    f.seek(start)
                    chunk = f.read()
                cut = chunk.rfind(b"\n") + 1
                if cut:
                    sys.stdout.write(chunk[:cut].decode(errors="replace"))
                    sys.stdout.flush()
                    start += cut
            if done:
                return
            stop.wait(0.5)

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


@dataclass
class FitSummary:
    metrics: dict
    best_checkpoint: str | None
    best_metrics: dict
    run_dir: str


def storage_path(output: str) -> str:
    return output if "://" in output else str(Path(output).expanduser().resolve())


def run_dir_of(cfg: MTLConfig) -> str:
    """Where Ray Train keeps the run ``output/name`` (a path or a URI)."""
    return f"{storage_path(cfg.run.output).rstrip('/')}/{cfg.run.name}"


def build_trainer(cfg: MTLConfig, datasets: dict, train_sizes: dict[str, int], loop=None, callbacks=None,
                  stage=None, start_from: str | None = None, mlflow_run: str = ""):
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
        train_loop_config={"stage": stage, "cfg": cfg.to_dict(), "train_sizes": train_sizes,
                           "run_dir": run_dir_of(cfg), "mlflow_run": mlflow_run, "start_from": start_from or "",
                           "command": " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]])},
        scaling_config=scaling, run_config=run, datasets=datasets,
        dataset_config=ray.train.DataConfig(
            datasets_to_split=[k for k in datasets if k.startswith("train_") and s.num_workers > 1],
            execution_options=ingest_options()))


STAGES: dict[type, type[Stage]] = {PretrainJobConfig: PretrainStage, RelationsJobConfig: RelationsStage,
                                    MTLConfig: MTLStage}


def stage_of(cfg: MTLConfig) -> type[Stage]:
    """The stage a config trains: by its class (the most derived one registered)."""
    return next(STAGES[c] for c in type(cfg).__mro__ if c in STAGES)


def fit(cfg: MTLConfig, verbose: bool = True, callbacks=None, stage: type[Stage] | None = None,
        start_from: str | None = None) -> FitSummary:
    """The one driver of every stage: prepare its data, run the shared loop on Ray Train,
    summarise. ``stage`` defaults to the config's own (``stage_of``). ``start_from``: a
    checkpoint of another run to continue from (weights, optimizer, step), when this run has
    none of its own yet."""
    stage = stage or stage_of(cfg)
    before = stage.upstream(cfg)
    if before is not None:                   # e.g. the MLM head's warm-up: trained once, then read back
        if verbose:
            print(f"[raymtl] {stage.name} first needs the run {run_dir_of(before)}", flush=True)
        cfg = stage.after_upstream(cfg, fit_once(before, verbose=verbose))
    check_resume(cfg, verbose)
    ensure_ray(verbose=cfg.run.verbose)
    datasets, sizes = stage.prepare(cfg, verbose)
    mlflow_run = mlflow_start(cfg.run.mlflow, cfg, run_dir_of(cfg)) if cfg.run.mlflow else ""
    trainer = build_trainer(cfg, datasets, sizes, callbacks=callbacks, stage=stage, start_from=start_from,
                            mlflow_run=mlflow_run)
    with console(run_dir_of(cfg)):
        result = trainer.fit()
    summary = summarize(result, stage.score)
    if mlflow_run:
        mlflow_finish(cfg.run.mlflow, mlflow_run, summary)
    if verbose:
        stage.print_summary(summary)
    return summary


def fit_once(cfg: MTLConfig, verbose: bool = False, **fit_kw) -> dict:
    """The best checkpoint's metrics of the run ``cfg.run.output/cfg.run.name``, training it
    only if that run has not finished before (benchmarks and sweeps re-run step by step).
    The record, ``best_metrics.json`` in the run directory, names the best checkpoint and
    keeps the run's config: a finished run is read back only for the same config (``output``,
    ``name`` and ``OUTCOME_FREE_FIELDS`` aside), else the call fails naming the fields that differ."""
    record = Path(storage_path(cfg.run.output)) / cfg.run.name / "best_metrics.json"
    asked = json.loads(json.dumps(cfg.to_dict()))               # tuples as lists, as saved
    if "://" not in cfg.run.output and record.is_file():
        metrics = json.loads(record.read_text())
        differ = [d for d in config_differences(metrics.pop("config", {}), asked, default_dict(cfg))
                  if d.split(":")[0] not in OUTCOME_FREE_FIELDS]
        if differ:
            raise ValueError(f"{record.parent} finished with another config ({'; '.join(differ[:6])}"
                             f"{'; ...' if len(differ) > 6 else ''}): remove that run or choose another "
                             "output or name")
        return metrics
    summary = fit(cfg, verbose=verbose, **fit_kw)
    metrics = {**summary.best_metrics, "best_checkpoint": summary.best_checkpoint}
    if "://" not in cfg.run.output:
        record.write_text(json.dumps({**metrics, "config": asked}, indent=2))
    return metrics


IDENTITY_FIELDS = ("output", "name")     # where a run lives, not what it trains
# Fields a resumed run may change freely: they decide what is printed, kept or retried, not what is trained.
RUN_ONLY_FIELDS = ("log_every", "eval_every", "early_stop", "keep_checkpoints", "max_failures",
                   "worker_niceness", "resume_changed", "verbose", "mlflow", "cache_dir", "force_prepare")
# Of those, the ones that do not choose the best checkpoint either: ``fit_once`` reads a finished run back whatever they are.
OUTCOME_FREE_FIELDS = tuple(f for f in RUN_ONLY_FIELDS if f not in ("eval_every", "early_stop"))


class ConfigChanged(ValueError):
    """The run in output/name was trained with another config (``check_resume``)."""


def latest_checkpoint_config(run_dir: Path) -> tuple[Path, dict] | None:
    """The ``config.json`` of the newest checkpoint in a local run directory (the one Ray Train
    resumes from), or None when the directory holds no checkpoint."""
    files = [f for f in run_dir.glob("checkpoint_*/config.json")] if run_dir.is_dir() else []
    if not files:
        return None
    newest = max(files, key=lambda f: f.stat().st_mtime)
    try:
        return newest, json.loads(newest.read_text())
    except json.JSONDecodeError as e:
        raise ConfigChanged(f"{newest}: not valid JSON ({e.msg}); the run in {run_dir} cannot be resumed: "
                         "use --resume-changed restart, or another --output or --name") from None


def check_resume(cfg: MTLConfig, verbose: bool = True) -> None:
    """Before a run resumes the checkpoint in ``output/name`` (Ray Train does so by itself),
    compare that checkpoint's config with ``cfg``: the same (run-only fields aside) resumes;
    otherwise ``run.resume_changed`` decides: refuse naming the fields, continue on purpose,
    or move the old run aside and start fresh. Remote outputs (``s3://``...) are not checked."""
    if "://" in cfg.run.output:
        return
    run_dir = Path(storage_path(cfg.run.output)) / cfg.run.name
    found = latest_checkpoint_config(run_dir)
    if found is None:
        return
    path, saved = found
    asked = json.loads(json.dumps(cfg.to_dict()))               # tuples as lists, as saved
    differ = [d for d in config_differences(saved, asked, default_dict(cfg))
              if d.split(":")[0] not in RUN_ONLY_FIELDS]
    if not differ:
        return
    listed = "; ".join(differ[:8]) + ("; ..." if len(differ) > 8 else "")
    how = cfg.run.resume_changed
    if how == "refuse":
        raise ConfigChanged(
            f"{run_dir} holds a run trained with another config ({listed}; from {path}). Resuming it would "
            "mix two configs: use --resume-changed continue to go on from its checkpoint with the new "
            "config, --resume-changed restart to move it aside and start fresh, or another --output/--name")
    if how == "restart":
        aside = run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        run_dir.rename(aside)
        if verbose:
            print(f"[raymtl] config changed ({listed}): moved the old run to {aside}; starting fresh", flush=True)
        return
    if verbose:
        print(f"[raymtl] config changed ({listed}): continuing the run in {run_dir} from its checkpoint "
              "with the new config (--resume-changed continue)", flush=True)


def config_differences(saved: dict, asked: dict, defaults: dict | None = None) -> list[str]:
    """'field: saved X, asked Y' for every field (besides where the run lives) that differs
    between two ``to_dict()`` configs; a record without a config cannot be matched. A field
    the saved config lacks (added to raymtl after that run) matches when asked at its value in
    ``defaults`` (the ``to_dict()`` of the config class's defaults): the run trained as that
    default does. A field raymtl no longer has (``RETIRED_FIELDS``) matches at the value at which
    it did nothing; at any other it is a difference."""
    if not saved:
        return ["the record keeps no config (written before raymtl kept one)"]
    old, new, default = ({k: v for part in d.values() for k, v in part.items()
                          if k not in IDENTITY_FIELDS and not retired_no_op(k, v)}
                         for d in (saved, asked, defaults or {}))
    return [f"{k}: saved {old.get(k, '(absent)')!r}, asked {new.get(k, '(absent)')!r}"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)
            and not (k not in old and k in default and new.get(k) == default[k])]


def default_dict(cfg: MTLConfig) -> dict:
    """The ``to_dict()`` of ``cfg``'s class at its defaults, as saved (tuples as lists)."""
    return json.loads(json.dumps(type(cfg)().to_dict()))


def summarize(result, score: str) -> FitSummary:
    """The run's last metrics and its best checkpoint by ``score`` (higher is better)."""
    best = result.get_best_checkpoint(score, "max") if result.best_checkpoints else None
    best_metrics = next((m for c, m in result.best_checkpoints if best and c.path == best.path), {})
    return FitSummary(metrics=result.metrics or {}, best_checkpoint=best.path if best else None,
                      best_metrics=best_metrics, run_dir=result.path)
