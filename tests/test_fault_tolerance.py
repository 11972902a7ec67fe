"""A training worker killed with SIGKILL mid-run: Ray Train restarts the group from the last
checkpoint and the run still finishes its planned steps."""
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from raymtl.config import smoke
from raymtl.trainer import fit

pytestmark = pytest.mark.timeout(900)


def train_worker_pids():
    from ray.util.state import list_actors
    return [a.pid for a in list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])]


def test_sigkill_of_a_worker_resumes_from_the_last_checkpoint(ray_cluster, data_dir, tmp_path):
    cfg = smoke().replace(data_dir=data_dir, output=str(tmp_path), steps=40, eval_every=10,
                          max_rows=240, cpus_per_worker=1.0, max_failures=2, keep_checkpoints=10)
    out = {}
    runner = threading.Thread(target=lambda: out.update(summary=fit(cfg, verbose=False)))
    runner.start()
    run_dir = Path(tmp_path) / cfg.run.name
    deadline = time.time() + 300
    while not list(run_dir.glob("checkpoint_*/metrics.json")) and time.time() < deadline:
        time.sleep(0.5)
    pids = train_worker_pids()
    assert pids, "no training worker found to kill"
    os.kill(pids[0], signal.SIGKILL)
    killed_at = time.time()
    runner.join(timeout=600)
    summary = out["summary"]
    assert summary.metrics["step"] == 40
    assert summary.metrics["start_step"] >= 10          # the last attempt resumed, not restarted
    from ray.train import Result
    steps = Result.from_path(summary.run_dir).metrics_dataframe["step"].tolist()
    assert steps[-1] == 40 and time.time() > killed_at
    # every reported checkpoint is complete and loadable
    import json
    for ck in sorted(run_dir.glob("checkpoint_*")):
        assert json.loads((ck / "metrics.json").read_text())["step"] in range(10, 41, 10)
        assert (ck / "encoder" / "model.safetensors").is_file()
