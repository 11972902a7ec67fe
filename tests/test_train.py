"""Real Ray Train + DeepSpeed runs on the real data, through the smoke config (tiny random BERT)."""
import numpy as np
import pytest
import torch

from raymtl.analysis.evaluation import evaluate_rows
from raymtl.analysis.reports import load_curve
from raymtl.cli import main as raymtl_main
from raymtl.config import smoke
from raymtl.data.multitask import load_splits
from raymtl.models.multitask import MultiTaskModel
from raymtl.train.trainer import fit

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
    cfg = smoke_cfg(tmp_path_factory.mktemp("one"), data_dir)
    return cfg, fit(cfg)


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
                    task_layers={"sst": 1})                  # SST's own top layer trains and is saved too
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
    second = fit(smoke_cfg(tmp_path, data_dir, steps=20, eval_every=5, name="resume"))
    assert second.metrics["start_step"] == 10 and second.metrics["step"] == 20
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
    assert "STS Pearson" in printed and "overall" in printed

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
