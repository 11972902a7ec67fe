"""Real Ray Train + DeepSpeed runs on the real data, through the smoke config (tiny random BERT)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from raymtl.analysis.evaluation import evaluate_rows
from raymtl.analysis.reports import load_curve
from raymtl.cli import main as raymtl_main
from raymtl.config import smoke
from raymtl.data.multitask import load_splits
from raymtl.models.multitask import MultiTaskModel
from raymtl.train.trainer import ConfigChanged, fit

pytestmark = pytest.mark.timeout(900)


def smoke_cfg(tmp, data_dir, **kw):
    base = dict(data_dir=data_dir, output=str(tmp), steps=30, eval_every=15, log_every=15,
                max_rows=400, num_workers=1, cpus_per_worker=1.0)
    return smoke().replace(**{**base, **kw})


def reloaded_scores(cfg, checkpoint):
    """Scores of a checkpoint loaded from disk on the same validation rows training used."""
    from transformers import AutoTokenizer
    model = MultiTaskModel.load(checkpoint).eval()
    tok = AutoTokenizer.from_pretrained(f"{checkpoint}/encoder")
    splits, _ = load_splits(cfg.data)
    return evaluate_rows(model, tok, {t: val for t, (_, val) in splits.items()}, cfg.data.max_length)


def losses_of(run_dir, key="train_loss"):
    from ray.train import Result
    df = Result.from_path(run_dir).metrics_dataframe.sort_values("step")
    return df[key].tolist()


@pytest.fixture(scope="module")
def one_worker_run(ray_cluster, data_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one")
    cfg = smoke_cfg(tmp, data_dir, mlflow=f"sqlite:///{tmp}/mlflow.db")      # a real MLflow store
    return cfg, fit(cfg)


def test_a_run_leaves_tensorboard_events_and_checkpoints_named_by_step_with_a_card(one_worker_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg, summary = one_worker_run
    run_dir = Path(summary.run_dir)
    assert sorted(p.name for p in run_dir.glob("checkpoint_0*")) == ["checkpoint_000015", "checkpoint_000030"]
    events = EventAccumulator(str(run_dir / "tensorboard"))          # TensorBoard's own reader
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss_sst", "train/loss_quora", "train/loss_sts", "train/lr", "val/val_sst", "val/overall",
            "train/tokens_per_s", "fusion/fusion_weight_sst"} <= tags
    assert [e.step for e in events.Scalars("train/loss_sst")] == list(range(1, 31))
    overall = events.Scalars("val/overall")
    assert [e.step for e in overall] == [15, 30]
    assert overall[-1].value == pytest.approx(json.loads((run_dir / "checkpoint_000030" / "metrics.json").read_text())["overall"])
    card = (run_dir / "checkpoint_000030" / "README.md").read_text()
    assert card.startswith("# raymtl multi-task checkpoint (step 30)")
    assert f"| overall | {overall[-1].value:.4f} |" in card and "| quora | accuracy | sentence pair, bi-encoder |" in card
    assert "PALs for sts" in card and "own top layers for sst (half)" in card and "raymtl.load(" in card


def test_an_mlflow_run_holds_the_config_the_metrics_and_the_best_checkpoint(one_worker_run):
    import mlflow
    cfg, summary = one_worker_run
    client = mlflow.MlflowClient(cfg.run.mlflow)
    [run] = client.search_runs([client.get_experiment_by_name("raymtl").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "mtl"
    assert run.data.params["fusion"] == "imtl_g" and run.data.params["steps"] == "30"
    assert run.data.metrics["best/overall"] == pytest.approx(summary.best_metrics["overall"])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/overall")] == [15, 30]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss_sst")] == [15, 30]   # log_every
    files = {f.path for f in client.list_artifacts(run.info.run_id, "best_checkpoint")}
    assert {"best_checkpoint/heads.safetensors", "best_checkpoint/README.md", "best_checkpoint/encoder"} <= files


def test_one_worker_loss_falls_and_checkpoint_reloads(one_worker_run):
    cfg, summary = one_worker_run
    # the classifiers' losses (means over steps 1-15 and 16-30) fall; STS's CoSENT loss on the
    # tiny random encoder moves up or down by chance over 30 steps, so it is not asserted on
    for task in ("sst", "quora"):
        losses = losses_of(summary.run_dir, f"train_loss_{task}")
        assert len(losses) == 2 and losses[-1] < losses[0], (task, losses)
    m = summary.best_metrics
    assert set(m) >= {"val_sst", "val_quora", "val_sts", "overall", "step"}
    assert m["worker_niceness"] == 0          # Ray would start the worker at 15
    again = reloaded_scores(cfg, summary.best_checkpoint)
    for task in ("sst", "quora", "sts"):
        assert again[task] == pytest.approx(m[f"val_{task}"], abs=1e-5)


def test_two_workers_zero2(ray_cluster, data_dir, tmp_path):
    cfg = smoke_cfg(tmp_path, data_dir, num_workers=2, cpus_per_worker=0.9, zero_stage=2, worker_niceness=7,
                    task_layers={"sst": 1},                  # SST's own top layer trains and is saved too
                    keep_task_best=True)                     # (its copies and re-scoring are collective)
    summary = fit(cfg)
    assert summary.best_metrics["worker_niceness"] == 7
    losses = losses_of(summary.run_dir)
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    again = reloaded_scores(cfg, summary.best_checkpoint)
    assert again["overall"] == pytest.approx(summary.best_metrics["overall"], abs=1e-5)
    model = MultiTaskModel.load(summary.best_checkpoint)
    own, shared = model.task_layers["sst"][0].state_dict(), model.encoder.encoder.layer[-1].state_dict()
    assert any(not torch.equal(own[k], shared[k]) for k in own)   # they started equal; SST moved its own


def test_rerun_with_same_name_resumes_from_last_checkpoint(ray_cluster, data_dir, tmp_path):
    first = fit(smoke_cfg(tmp_path, data_dir, steps=10, eval_every=5, name="resume"))
    assert first.metrics["step"] == 10 and first.metrics["start_step"] == 0
    # a changed config is refused before anything trains, naming the fields that differ
    with pytest.raises(ConfigChanged, match=r"steps: saved 10, asked 20; .*--resume-changed continue"):
        fit(smoke_cfg(tmp_path, data_dir, steps=20, eval_every=5, name="resume"))
    with pytest.raises(ConfigChanged, match=r"tasks: saved \['sst', 'quora', 'sts'\], asked \['sst', 'quora'\]"):
        fit(smoke_cfg(tmp_path, data_dir, steps=10, eval_every=5, name="resume", tasks=("sst", "quora")))
    # run-only fields may change; continuing under a changed config is a choice
    second = fit(smoke_cfg(tmp_path, data_dir, steps=20, eval_every=5, name="resume", log_every=5,
                           resume_changed="continue"))
    assert second.metrics["start_step"] == 10 and second.metrics["step"] == 20
    assert sorted(p.name for p in (tmp_path / "resume").glob("checkpoint_0*")) == ["checkpoint_000015",
                                                                                  "checkpoint_000020"]
    # a finished run run again trains nothing and reports its last metrics again (as a Tune trial
    # restored as unfinished after its driver died must: Tune requires the metric in a result)
    again = fit(smoke_cfg(tmp_path, data_dir, steps=20, eval_every=5, name="resume", log_every=5))
    assert again.metrics["step"] == 20 and again.metrics["val_sst"] == second.metrics["val_sst"]
    assert again.best_checkpoint == second.best_checkpoint
    assert "[raymtl] nothing left to train at step 20 of 20" in (tmp_path / "resume" / "train.log").read_text()
    assert sorted(p.name for p in (tmp_path / "resume").glob("checkpoint_0*")) == ["checkpoint_000015",
                                                                                  "checkpoint_000020"]
    # the newest checkpoint carries every report, those of the first run included (Ray keeps 2)
    history = load_curve(tmp_path / "resume")
    assert history["step"].tolist() == [5, 10, 15, 20]
    assert history["val_sst"].iloc[1] == pytest.approx(first.metrics["val_sst"])
    assert history["val_sst"].iloc[3] == pytest.approx(second.metrics["val_sst"])
    out = tmp_path / "curves"
    assert raymtl_main(["curves", f"a={tmp_path / 'resume'}", f"b={second.best_checkpoint}",
                        "--out", str(out)]) == 0
    rows = out.joinpath("curves.csv").read_text().splitlines()
    assert rows[0] == "run,step,metric,value" and out.joinpath("curves.png").stat().st_size > 10_000
    assert {r.split(",")[2] for r in rows[1:]} == {"val_sst", "val_quora", "val_sts", "overall"}
    assert sum(r.startswith("a,") for r in rows) == 16          # 4 reports x 4 metrics
    assert raymtl_main(["curves", str(tmp_path / "resume"), "--metrics", "val_mnli", "--out", str(out)]) == 2
    # restart moves the old run aside and trains from step 0
    third = fit(smoke_cfg(tmp_path, data_dir, steps=5, eval_every=5, name="resume", resume_changed="restart"))
    assert third.metrics["start_step"] == 0 and third.metrics["step"] == 5
    aside = list(tmp_path.glob("resume.replaced-*"))
    assert len(aside) == 1 and (aside[0] / "checkpoint_000020" / "config.json").is_file()


def test_keep_task_best_checkpoints_each_task_at_its_best_and_resumes_with_it(ray_cluster, data_dir, tmp_path):
    from raymtl.train.engine import DS_TAG
    # heads at a high learning rate swing between validations, so a task falls below its best
    kw = dict(steps=40, eval_every=5, task_layers={"sst": 1}, head_lr=0.03, lr=1e-3, keep_task_best=True,
              name="best")
    cfg = smoke_cfg(tmp_path, data_dir, **kw)
    first = fit(cfg)
    history = load_curve(first.run_dir)
    kept = [c for c in history if c.startswith("kept_step_")]
    assert kept, "no validation kept a task's earlier parts"
    for _, row in history.iterrows():
        for c in kept:
            t = c.removeprefix("kept_step_")
            if row[c] == row[c]:                                  # (NaN: its live parts were saved)
                assert row[c] < row["step"] and row[f"val_{t}"] > row[f"live_val_{t}"]
    # every checkpoint's model scores what its metrics say, earlier parts and all
    for ckpt in sorted((tmp_path / "best").glob("checkpoint_0*")):
        m = json.loads((ckpt / "metrics.json").read_text())
        again = reloaded_scores(cfg, ckpt)
        for t in ("sst", "quora", "sts"):
            assert again[t] == pytest.approx(m[f"val_{t}"], abs=1e-5), (ckpt.name, t)
            if f"kept_step_{t}" in m:                             # and its card says whose parts it holds
                assert f"{t}'s own parts (head, PALs, own layers) are those of step {m[f'kept_step_{t}']}" in (
                    ckpt / "README.md").read_text()
    # a resumed run goes on from the first run's copies (a fresh start would copy step 45's)
    second = fit(smoke_cfg(tmp_path, data_dir, **{**kw, "steps": 45}, resume_changed="continue"))
    assert second.metrics["start_step"] == 40
    state = torch.load(Path(second.run_dir) / "checkpoint_000045" / "deepspeed" / DS_TAG /
                       "mp_rank_00_model_states.pt", weights_only=False)
    assert min(b["step"] for b in state["task_best"]["best"].values()) <= 40


def test_keep_task_best_is_refused_under_zero3():
    from raymtl.config import MTLConfig
    with pytest.raises(ValueError, match="keep_task_best=True .*ZeRO-3"):
        MTLConfig().replace(keep_task_best=True, fusion="sum", zero_stage=3)
    MTLConfig().replace(keep_task_best=True, fusion="sum", zero_stage=2)      # fine


def test_curves_name_what_is_missing(tmp_path, capsys):
    assert raymtl_main(["curves", str(tmp_path / "nope")]) == 2
    assert f"run directory {tmp_path / 'nope'} does not exist" in capsys.readouterr().err
    (tmp_path / "old" / "checkpoint_1").mkdir(parents=True)
    (tmp_path / "old" / "checkpoint_1" / "metrics.json").write_text('{"step": 5}')
    assert raymtl_main(["curves", str(tmp_path / "old")]) == 2
    assert "its checkpoints predate the history" in capsys.readouterr().err


def test_predict_and_evaluate_cli(one_worker_run, data_dir, tmp_path, capsys):
    _, summary = one_worker_run
    src = open(f"{data_dir}/sst/test-unlabeled.csv").read().splitlines()
    (tmp_path / "in.csv").write_text("\n".join(src[:21]) + "\n")
    out = tmp_path / "pred.csv"
    assert raymtl_main(["predict", "--checkpoint", summary.best_checkpoint, "--task", "sst",
                        "--input", str(tmp_path / "in.csv"), "--output", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines[0] == "id,prediction" and len(lines) == 21
    assert [ln.split(",")[0] for ln in lines[1:]] == [r.split("\t")[2] for r in src[1:21]]
    assert {int(ln.split(",")[1]) for ln in lines[1:]} <= set(range(5))

    sts = open(f"{data_dir}/sts/train.csv").read().splitlines()
    (tmp_path / "sts.csv").write_text("\n".join(sts[:41]) + "\n")
    assert raymtl_main(["evaluate", "--checkpoint", summary.best_checkpoint, "--sts", str(tmp_path / "sts.csv")]) == 0
    printed = capsys.readouterr().out
    assert "STS Pearson" in printed and "overall" not in printed    # (Pearson + 1) / 2 alone is no overall score

    (tmp_path / "bad.csv").write_text("\tid\tsentence1\n0\tx\tonly one sentence\n")
    assert raymtl_main(["predict", "--checkpoint", summary.best_checkpoint, "--task", "sts",
                        "--input", str(tmp_path / "bad.csv"), "--output", str(out)]) == 2
    assert "missing required column(s) ['sentence2']" in capsys.readouterr().err


def test_reported_throughput_leaves_out_startup_steps():
    """A run's first steps (Ray Data's first blocks, allocator warm-up) are slow; the reported
    s/step and tokens/s leave them out unless nothing else was measured."""
    import torch

    from raymtl.train.loop import Progress
    batch = {"input_ids": torch.ones(4, 10, dtype=torch.long), "attention_mask": torch.ones(4, 10)}
    p = Progress(total=10, start=0, world=1)
    for _ in range(Progress.warmup):
        p.update(5.0, [batch], {"sst": 1.0})
    for _ in range(4):
        p.update(1.0, [batch], {"sst": 1.0})
    r = p.report()
    assert r["s_per_step"] == 1.0 and r["tokens_per_s"] == 40.0 and r["examples_per_s"] == 4.0
    short = Progress(total=2, start=0, world=2)            # only start-up steps: report those
    short.update(2.0, [batch], {"sst": 1.0})
    assert short.report()["examples_per_s"] == 4.0         # 4 rows x 2 workers / 2 s


def test_early_stopping_waits_for_patience_validations_without_a_better_score():
    from raymtl.train.loop import stalled
    h = [{"overall": v} for v in (0.5, 0.6, 0.55, 0.58)]
    assert not stalled(h, "overall", 0) and not stalled(h, "overall", 3)
    assert stalled(h, "overall", 2) and not stalled(h + [{"overall": 0.61}], "overall", 2)
    assert not stalled(h[:2], "overall", 2)                   # too few validations to judge


def test_the_run_summary_prints_overall_only_for_all_three_tasks(capsys):
    from raymtl.stages.multitask import MTLStage
    from raymtl.train.trainer import FitSummary
    MTLStage.print_summary(FitSummary({}, "ck", {"val_sts": 0.87, "overall": 0.935, "step": 3}, "rd"))
    assert "STS Pearson  0.8700" in (out := capsys.readouterr().out) and "overall" not in out
    MTLStage.print_summary(FitSummary({}, "ck", {"val_sst": 0.5, "val_quora": 0.8, "val_sts": 0.8, "overall": 0.7}, "rd"))
    assert "overall         0.7000" in capsys.readouterr().out


def test_per_step_losses_go_to_tensorboard_and_mlflow_gets_them_per_log_interval(tmp_path):
    """The training step's hot path appends to a local event file only (a real SQLite MLflow store)."""
    import mlflow
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from raymtl.train.logs import RunLog, mlflow_start
    uri = f"sqlite:///{tmp_path}/m.db"
    run_id = mlflow_start(uri, smoke(), str(tmp_path / "run"))
    log = RunLog(str(tmp_path / "run"), 0, uri, run_id)
    for step in range(1, 5):                                  # as the loop does with log_every 2
        log.scalars(step, {"loss_sst": 1.0 / step}, mlflow=False)
        if step % 2 == 0:
            log.scalars(step, {"loss_sst": 1.0 / step}, tensorboard=False)
    log.close()
    assert [m.step for m in mlflow.MlflowClient(uri).get_metric_history(run_id, "train/loss_sst")] == [2, 4]
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss_sst")] == [1, 2, 3, 4]
    assert RunLog(str(tmp_path / "other"), 1, uri, run_id).writer is None    # rank 0 only


def test_a_build_lock_left_by_a_killed_build_is_named(tmp_path):
    import os
    import time

    from raymtl.train.engine import stale_build_locks
    old, fresh = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock", tmp_path / "py311_cpu" / "other" / "lock"
    for f in (old, fresh):
        f.parent.mkdir(parents=True)
        f.touch()
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    assert stale_build_locks(tmp_path) == [old]             # a build running now holds a fresh one
    assert stale_build_locks(tmp_path / "missing") == []
