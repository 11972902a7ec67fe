"""A training worker killed with SIGKILL mid-run: Ray Train restarts the group from the last
checkpoint and the run still finishes its planned steps, exactly as a run never stopped."""
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from raymtl.config import smoke
from raymtl.train.trainer import fit

pytestmark = pytest.mark.timeout(900)


def train_worker_pids():
    import ray
    from ray.util.state import list_actors
    return [a.pid for a in list_actors(address=ray.get_runtime_context().gcs_address,
                                       filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])]


def last_logged_step(pid: int) -> int | None:
    """The last progress line ('[raymtl] step k/n') a worker process wrote to its Ray log."""
    import re

    import ray
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    steps = [int(m) for f in logs.glob(f"worker-*-{pid}.out")
             for m in re.findall(r"\[raymtl\] step (\d+)/", f.read_text(errors="replace"))]
    return max(steps) if steps else None


def registered_step(run_dir: Path):
    snap = run_dir / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snap.read_text()).get("latest_checkpoint_result")
    except (OSError, ValueError):
        return None
    return latest["metrics"]["step"] if latest else None


@pytest.mark.parametrize("workers", [1, 2])
def test_sigkill_of_a_worker_resumes_from_the_last_checkpoint(ray_cluster, data_dir, tmp_path, workers):
    # two workers: ZeRO-2 on gloo, each rank with its own data shard and its own random state
    cfg = smoke().replace(data_dir=data_dir, output=str(tmp_path), steps=40, eval_every=10,
                          max_rows=240, cpus_per_worker=1.0 if workers == 1 else 0.9, num_workers=workers,
                          zero_stage=0 if workers == 1 else 2, max_failures=2, keep_checkpoints=10,
                          log_every=1)
    out = {}
    runner = threading.Thread(target=lambda: out.update(summary=fit(cfg, verbose=False)))
    runner.start()
    run_dir = Path(tmp_path) / cfg.run.name
    deadline = time.time() + 300
    # wait until Ray Train has *registered* a checkpoint (files on storage alone are not enough:
    # an unregistered checkpoint is, correctly, not restored)
    while registered_step(run_dir) is None and time.time() < deadline:
        time.sleep(0.2)
    registered = registered_step(run_dir)
    pids = train_worker_pids()
    assert pids, "no training worker found to kill"
    os.kill(pids[0], signal.SIGKILL)
    killed_at = time.time()
    time.sleep(1.0)                                   # let the log monitor flush the worker's file
    killed_step = max(filter(None, map(last_logged_step, pids)), default=None)   # (rank 0 logs the steps)
    runner.join(timeout=600)
    summary = out["summary"]
    assert summary.metrics["step"] == 40
    assert summary.metrics["start_step"] >= registered >= 10   # the last attempt resumed, not restarted
    from ray.train import Result
    steps = Result.from_path(summary.run_dir).metrics_dataframe["step"].tolist()
    assert max(steps) == 40 and time.time() > killed_at   # (kept checkpoints are ordered by score)
    resumed = summary.metrics["start_step"]
    assert killed_step is not None and killed_step >= resumed
    print(f"\n[raymtl] fault tolerance: worker SIGKILLed at step {killed_step}, last checkpoint "
          f"step {registered}, group restarted from step {resumed}, run finished at step "
          f"{summary.metrics['step']}/{cfg.train.steps}; steps repeated: {killed_step - resumed}")
    # every reported checkpoint is complete and loadable
    for ck in sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir()):
        assert json.loads((ck / "metrics.json").read_text())["step"] in range(10, 41, 10)
        assert (ck / "encoder" / "model.safetensors").is_file()
    # the resumed run is the run that was never stopped: each stream goes on past the batches
    # trained on, with the sampler's and torch's random state of the checkpoint (dropout)
    straight = fit(cfg.replace(name="straight", max_failures=0), verbose=False).metrics
    measured = [k for k in straight if k.startswith(("train_loss", "val_"))]
    assert len(measured) >= 7 and {k: summary.metrics[k] for k in measured} == pytest.approx(
        {k: straight[k] for k in measured}, rel=1e-6, abs=1e-7)
