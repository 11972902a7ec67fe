"""Search spaces match the config; a real 2-trial search runs, is analysed, and its best config trains."""
import json
from pathlib import Path

import pytest

from raymtl.config import MTLConfig, smoke
from raymtl.tune import load_space, validate_space

ROOT = Path(__file__).resolve().parents[1]
SPACES = sorted((ROOT / "search_spaces").glob("*.json"))

pytestmark = pytest.mark.timeout(900)


@pytest.mark.parametrize("path", SPACES, ids=[p.name for p in SPACES])
def test_search_space_keys_are_config_fields_with_valid_values(path):
    space = load_space(path)
    assert space
    validate_space(space, MTLConfig())


def test_bad_search_space_is_rejected(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps({"learning_rate": {"uniform": [0, 1]}}))
    with pytest.raises(ValueError, match="'learning_rate' is not a config field"):
        load_space(tmp_path / "s.json")
    (tmp_path / "s.json").write_text(json.dumps({"fusion": {"choice": ["sum", "magic"]}}))
    with pytest.raises(ValueError, match="fusion='magic' is not valid"):
        validate_space(load_space(tmp_path / "s.json"), MTLConfig())


def test_smoke_search_is_analysed_and_its_best_config_trains(ray_cluster, data_dir, tmp_path):
    from raymtl.analysis.reports import analyze
    from raymtl.train.trainer import fit
    from raymtl.tune import build_tuner
    base = smoke().replace(data_dir=data_dir, steps=6, eval_every=2, max_rows=120, cpus_per_worker=1.0)
    space = {"lr": {"loguniform": [1e-4, 3e-3]}, "fusion": {"choice": ["sum", "pcgrad"]}}
    tuner, _ = build_tuner(base, space, num_samples=2, searcher="optuna", asha=True,
                           experiment="exp", storage=str(tmp_path))
    (tmp_path / "exp").mkdir(parents=True, exist_ok=True)
    base.save(tmp_path / "exp" / "raymtl_base.json")
    grid = tuner.fit()
    assert len(grid) == 2 and not grid.errors
    res = analyze(tmp_path / "exp")
    table = res["table"]
    assert len(table) == 2 and {"lr", "fusion", "best_overall", "status", "time_s"} <= set(table.columns)
    assert all(p.is_file() and p.stat().st_size > 1000 for p in res["plots"])
    best = MTLConfig.load(res["best_config"])
    assert best.train.fusion in ("sum", "pcgrad") and best.model.encoder == "tiny-random"
    summary = fit(best.replace(output=str(tmp_path / "best")), verbose=False)
    assert summary.best_checkpoint


def test_trial_workers_fit_beside_the_trial_driver():
    """2 CPUs, a 0.25-CPU trial driver: a 2-CPU worker would never start (the trial hung in
    'worker group startup timed out'); it is shrunk to 1.75 CPUs, which still runs 2 threads."""
    from raymtl.config import MTLConfig
    from raymtl.tune import fit_workers_beside_trial
    said = []
    cfg = fit_workers_beside_trial(MTLConfig(), cluster_cpus=2, trial_cpus=0.25, say=said.append)
    assert cfg.scale.cpus_per_worker == 1.75 and "cpus_per_worker=1.75" in said[0]
    roomy = MTLConfig().replace(cpus_per_worker=1.0)
    assert fit_workers_beside_trial(roomy, 2, 0.25, say=said.append) is roomy
    with pytest.raises(ValueError, match="num_workers=4 cannot fit"):
        fit_workers_beside_trial(MTLConfig().replace(num_workers=4), 0.25, 0.25)


def test_trials_run_side_by_side_as_the_cluster_allows():
    from raymtl.tune import trial_concurrency
    one = MTLConfig().replace(cpus_per_worker=1.75)
    assert trial_concurrency(one, {"CPU": 2}, 0.25) == 1                    # this machine
    assert trial_concurrency(one, {"CPU": 16}, 0.25) == 8
    gpu = MTLConfig().replace(num_workers=2, use_gpu=True, cpus_per_worker=4.0)
    assert trial_concurrency(gpu, {"CPU": 64, "GPU": 8}, 0.25) == 4          # GPUs bound it, not CPUs
    assert trial_concurrency(gpu, {"CPU": 64, "GPU": 1}, 0.25) == 1


def test_a_killed_distillation_search_resumes_without_rerunning_finished_trials(ray_cluster, data_dir, tmp_path):
    """The distillation search space, in smoke form, on a real teacher's outputs; its driver is
    SIGKILLed after the first trial finishes, and `jobs/tune.py --resume` completes the search
    without training that trial again."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from raymtl.stages.pipeline import run_teacher, teacher_config
    base = smoke().replace(data_dir=data_dir, max_rows=120, steps=4, eval_every=2, log_every=2, cpus_per_worker=1.0)
    teacher = run_teacher(teacher_config(base, "sst", related=(), output=str(tmp_path / "teacher")), verbose=False)
    flags = ["--smoke", "--data-dir", data_dir, "--max-rows", "120", "--steps", "4", "--eval-every", "2",
             "--log-every", "2", "--cpus-per-worker", "1.0", "--output", str(tmp_path), "--experiment", "exp"]
    search = [sys.executable, "jobs/tune.py", *flags, "--space", str(ROOT / "search_spaces" / "distill.json"),
              "--teacher-outputs", f"sst={teacher['outputs']}", "--num-samples", "2", "--searcher", "random",
              "--no-asha"]
    runs = tmp_path / "exp" / "train_runs"
    proc = subprocess.Popen(search, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 400
    while not list(runs.glob("trial_*/checkpoint_000004")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    first = list(runs.glob("trial_*/checkpoint_000004"))
    assert first and proc.poll() is None, "the first trial did not finish while the search ran"
    os.kill(proc.pid, signal.SIGKILL)                                   # the Tune driver dies mid-search
    proc.wait()
    finished_at = first[0].stat().st_mtime_ns
    done = subprocess.run([sys.executable, "jobs/tune.py", *flags, "--resume"], cwd=ROOT, capture_output=True,
                          text=True, timeout=500)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "[raymtl] best trial overall=" in done.stdout
    trials = sorted(runs.glob("trial_*"))
    assert len(trials) == 2 and all((t / "checkpoint_000004").is_dir() for t in trials)
    assert first[0].stat().st_mtime_ns == finished_at                    # the finished trial was not re-run
    for t in trials:                                                     # every trial distilled, as searched
        cfg = json.loads((t / "checkpoint_000004" / "config.json").read_text())
        assert cfg["distill"]["teacher_outputs"] == {"sst": teacher["outputs"]}
        assert cfg["distill"]["distill_temperature"] in (1.0, 2.0, 4.0) and cfg["train"]["fusion"] in ("sum", "pcgrad", "gradvac")
