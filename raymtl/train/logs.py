"""What a run leaves for people and tools besides its checkpoints: TensorBoard event files
(rank 0, ``<run dir>/tensorboard``), an MLflow run when ``run.mlflow`` names a tracking URI
(params, the same metrics, the best checkpoint), and a model card (``README.md``) in every
checkpoint.

TensorBoard tags: ``train/loss_<stream>`` every step (MLflow: every log interval); ``train/lr``
every log interval; at each validation ``val/<score>`` (``val_sst``,
``overall``, ...), ``fusion/<weight>`` and ``gradients/<cosine or norm>`` when fusion or
diagnostics are on, and ``train/<metric>`` for the rest of the report.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

from raymtl.tasks import TASKS

TENSORBOARD_DIR = "tensorboard"


def tag_of(metric: str) -> str:
    if metric.startswith("val_") or metric == "overall" or metric.endswith("_step0"):
        return f"val/{metric}"
    if metric.startswith("fusion_weight"):
        return f"fusion/{metric}"
    if metric.startswith(("gradcos_", "grad_norm", "fused_norm")):
        return f"gradients/{metric}"
    return f"train/{metric}"


def _mlflow():
    try:
        import mlflow
    except ImportError:
        raise ValueError("mlflow: the MLflow client is not installed; pip install 'raymtl[mlflow]' "
                         "(or mlflow-skinny)") from None
    return mlflow


RUN_DIR_TAG = "raymtl.run_dir"


def mlflow_start(uri: str, cfg, run_dir: str) -> str:
    """On the driver: the MLflow run of ``run_dir`` (the same one again when a run resumes),
    with the config as params; returns its id."""
    mlflow = _mlflow()
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("raymtl")
    # a local SQLite store keeps its artifacts beside the database, not in ./mlruns of the cwd
    local = Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts" if uri.startswith("sqlite:///") else None
    exp_id = exp.experiment_id if exp else client.create_experiment(
        "raymtl", artifact_location=local.as_uri() if local else None)
    found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_DIR_TAG}` = '{run_dir}'", max_results=1)
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=cfg.run.name, tags={RUN_DIR_TAG: run_dir})
    params = [mlflow.entities.Param(k, str(v)[:500]) for k, v in sorted(cfg.flat().items())]
    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[i:i + 100])
    return run.info.run_id


def mlflow_finish(uri: str, run_id: str, summary) -> None:
    """On the driver: the best checkpoint's metrics (``best/<metric>``) and files, run FINISHED."""
    mlflow = _mlflow()
    client = mlflow.MlflowClient(uri)
    best = {f"best/{k}": v for k, v in summary.best_metrics.items() if _number(v)}
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, float(v), now, 0) for k, v in best.items()])
    if summary.best_checkpoint and "://" not in summary.best_checkpoint:
        client.log_artifacts(run_id, summary.best_checkpoint, "best_checkpoint")
    client.set_terminated(run_id, "FINISHED")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class RunLog:
    """TensorBoard events (and MLflow metrics) of one run, written by rank 0 only (TensorBoard
    is off without a local run directory, e.g. remote storage)."""

    def __init__(self, run_dir: str | None, rank: int, mlflow_uri: str = "", mlflow_run: str = ""):
        self.writer, self.mlflow = None, None
        if rank == 0 and run_dir and "://" not in run_dir:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD_DIR))
        if rank == 0 and mlflow_uri and mlflow_run:
            self.mlflow, self.run_id = _mlflow().MlflowClient(mlflow_uri), mlflow_run

    def scalars(self, step: int, values: dict, tag=tag_of, tensorboard: bool = True, mlflow: bool = True) -> None:
        """The loop logs per-step losses to TensorBoard only (a local file append) and hands them
        to MLflow (a tracking server or database) once per log interval."""
        values = {tag(k): float(v) for k, v in values.items() if _number(v) and k != "step"}
        if tensorboard and self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
        if mlflow and self.mlflow is not None and values:
            from mlflow.entities import Metric
            now = int(time.time() * 1000)
            self.mlflow.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def model_card(cfg: dict, metrics: dict, modes: dict | None, command: str) -> str:
    """The checkpoint's README.md: what it is, how it was made and scored, how to load it."""
    data, model, train = cfg["data"], cfg["model"], cfg["train"]
    tasks = list(data["tasks"])
    inputs = {"cross": "sentence pair, cross-encoder", "bi": "sentence pair, bi-encoder"}
    heads = "\n".join(f"| {t} | {TASKS[t].metric} | {inputs.get((modes or {}).get(t), 'one sentence')} |"
                      for t in tasks)
    scores = "\n".join(f"| {k} | {v:.4f} |" for k, v in metrics.items()
                       if (k.startswith("val_") or k == "overall") and isinstance(v, (int, float)))
    own = [f"PALs for {', '.join(model['pal_tasks'] or tasks)}"] if model.get("pals") else []
    own += [f"own top layers for {t} ({n})" for t, n in (model.get("task_layers") or {}).items() if t in tasks]
    own += [f"learned task prefixes ({model['prefix_length']} vectors)"] if model.get("task_prefix") == "learned" else []
    lacks = ("; ".join(own) if own else "nothing: this model has no per-task parts besides the heads")
    kept_steps = {k.removeprefix("kept_step_"): s for k, s in metrics.items() if k.startswith("kept_step_")}
    kept = "".join(f"- {t}'s own parts (head, PALs, own layers) are those of step {s}, its best validation "
                   f"(`keep_task_best`; the live ones scored {metrics[f'live_val_{t}']:.4f})\n"
                   for t, s in kept_steps.items())
    return f"""# raymtl multi-task checkpoint (step {metrics.get('step', '?')})

One BERT-style encoder with a head per task, trained by raymtl.

- base encoder: `{model['encoder'] if not model.get('init_from') else model['init_from']}`
- tasks: {', '.join(tasks)}{' (+ related sets: ' + ', '.join(data['related_sets']) + ')' if data.get('related_sets') else ''}
- recipe: fusion `{train['fusion']}` (every {train['fusion_every']} steps), weighting `{train['weighting']}`, sampling `{train['sampling']}`, {train['steps']} steps, lr {train['lr']}, batch {train['batch_size']} per task, seed {train['seed']}
- command: `{command}`
{kept}
| task | metric | input |
|---|---|---|
{heads}

Validation scores at this step (the run's seeded split, `split_seed` {data['split_seed']}):

| score | value |
|---|---|
{scores or '| (none) | |'}

## Use it

```python
import raymtl
m = raymtl.load("{'{this directory}'}")
m.predict("sst", ["a gripping, funny film"])
```

```bash
raymtl predict --checkpoint THIS_DIR --task sst --input in.csv --output out.csv
raymtl evaluate --checkpoint THIS_DIR
```

With plain transformers, `encoder/` is a Hugging Face model directory
(`AutoModel.from_pretrained("THIS_DIR/encoder")`, tokenizer included); mean-pool its last hidden
state for sentence embeddings. The encoder alone lacks what raymtl adds per task: {lacks}; and
the task heads (`heads.safetensors`). Use `raymtl.load` for the model as trained.
"""
