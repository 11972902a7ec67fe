import os
import tempfile
from pathlib import Path

import pytest

from raymtl.config import DEFAULT_DATA_DIR

DATA_DIR = os.environ.get("RAYMTL_DATA_DIR", DEFAULT_DATA_DIR)
# Prepared shards of the whole session (and of the jobs it starts) in one temporary cache,
# shared by the tests (runs on the same data reuse it), never the user's ~/.cache.
os.environ.setdefault("RAYMTL_CACHE_DIR", tempfile.mkdtemp(prefix="raymtl-cache-"))
# Ray Train's controller notices a finished run at its next health check (every 2 s) and
# then waits for its preemption watcher's poll (every 5 s): about 4 s at the end of every
# fit, idle, in a suite of short fits (measured: 5.3 s from the last report to fit()'s
# return, 1.2 s with these). Set before any Ray starts, so every raylet, head and job the
# suite starts inherits them; training itself is unchanged.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Every fit starts Ray Train's actors and a few Ray Data tasks; by default the raylet keeps
# num_cpus (2) idle worker processes and kills the rest after 1 s, so the next fit starts new
# Python processes that import Ray again (measured: 6.8 of a fit's 29.5 CPU-seconds went to
# starting idle workers). Keeping 4 idle workers for 10 minutes lets the next fit reuse them:
# 18.8 -> 13.9 s per smoke fit (docs/performance.md, "A run's start-up").
os.environ.setdefault("RAY_num_workers_soft_limit", "4")
os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", "600000")


@pytest.fixture(scope="session")
def data_dir() -> str:
    if not Path(DATA_DIR, "sst", "train.csv").is_file():
        pytest.fail(f"real data not found in {DATA_DIR}; set RAYMTL_DATA_DIR")
    return DATA_DIR


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray instance for the whole session (never two on one machine)."""
    import ray

    from raymtl.data.streams import configure_ray_data
    configure_ray_data()
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1")
    yield ray
    ray.shutdown()


def pytest_collection_modifyitems(items):
    """Tests that start their own Ray head run before the session's in-process Ray exists."""
    own_ray = ("test_job_submit", "test_multinode", "test_ray_up", "test_gpu_check")
    items.sort(key=lambda item: 0 if item.module.__name__.endswith(own_ray) else 1)
