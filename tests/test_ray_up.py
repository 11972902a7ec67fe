"""`ray up cluster.local.yaml` for real on 127.0.0.1: the smoke job, submitted with `ray job
submit`, makes the autoscaler add a gpu_worker node (the head has CPU 0), succeeds, and
`ray down` leaves none of the cluster's processes behind.

Runs its own cluster, so it must not share the machine with the session's in-process Ray:
conftest orders it before every test that starts that one. HOME is a temporary directory
(`ray up` writes ~/ray_bootstrap_config.yaml there; the token is ~/.ray/auth_token).
"""
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest
from processes import RAY, free_ports, pids_naming, sh, submit_smoke_job

from raymtl.cluster_local import _pids_with_env, _stop

pytestmark = pytest.mark.timeout(600)


def cluster_pids(cluster_dir: str) -> set[int]:
    """This cluster's processes: the head's marker, or its temp dir on the command line."""
    return _pids_with_env("RAYMTL_LOCAL_HEAD", cluster_dir) | pids_naming(cluster_dir)


@pytest.fixture
def local_cluster(tmp_path):
    cluster_dir = tempfile.mkdtemp(prefix="ru", dir="/tmp")       # short: Ray's socket paths
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))  # the file cluster.local.yaml mounts
    gcs_port, dashboard_port = free_ports(2)
    env = {**os.environ, "HOME": str(home), "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",   # the head's `python` is this venv's
           "RAYMTL_GCS_PORT": str(gcs_port), "RAYMTL_DASHBOARD_PORT": str(dashboard_port),
           "RAYMTL_CLUSTER_DIR": cluster_dir}
    # DeepSpeed's compiled ops from the real home (not rebuilt, ~40 s); the session's shard cache
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    env.setdefault("RAYMTL_CACHE_DIR", str(Path.home() / ".cache" / "raymtl" / "shards"))
    for var in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(var, None)
    try:
        yield env, cluster_dir, f"http://127.0.0.1:{dashboard_port}"
    finally:
        sh(RAY, "down", "cluster.local.yaml", "-y", env=env, check=False, timeout=120)  # no-op if the test did it
        _stop(cluster_pids(cluster_dir))
        shutil.rmtree(cluster_dir, ignore_errors=True)


def test_ray_up_autoscales_a_gpu_worker_for_the_smoke_job_and_ray_down_stops_it(local_cluster, data_dir,
                                                                                 tmp_path):
    env, cluster_dir, address = local_cluster
    t0 = time.time()
    up = sh(RAY, "up", "cluster.local.yaml", "-y", "--no-config-cache", env=env)
    assert (Path(env["HOME"]) / "ray_bootstrap_config.yaml").is_file()     # ray up's own file mount
    assert not Path(cluster_dir, "nodes.json").read_text().count('"gpu_worker"')   # none before the job

    print(f"ray up: {time.time() - t0:.0f} s")
    out = tmp_path / "out"
    submit_smoke_job(address, env, data_dir, out, context=up.stdout[-2000:])
    print(f"ray up + job: {time.time() - t0:.0f} s")

    # the autoscaler added a gpu_worker node (2 CPUs) beside the CPU-0 head, and the run used it
    nodes = json.loads(sh(RAY, "list", "nodes", f"--address={address}", "--format=json", "--detail",
                          env=env).stdout)
    workers = [n for n in nodes if not n["is_head_node"]]
    assert workers and all(n["resources_total"].get("CPU") == 2 for n in workers), nodes
    assert all(n["resources_total"].get("CPU", 0) == 0 for n in nodes if n["is_head_node"]), nodes
    state = json.loads(Path(cluster_dir, "nodes.json").read_text())["nodes"]
    launched = {i for i, n in state.items() if n["tags"]["ray-user-node-type"] == "gpu_worker"}
    assert launched & {n["node_id"] for n in workers}, (state, nodes)
    monitor_log = "".join(p.read_text(errors="replace")
                          for p in Path(cluster_dir, "ray", "session_latest", "logs").glob("monitor*.log"))
    assert "gpu_worker" in monitor_log

    down = sh(RAY, "down", "cluster.local.yaml", "-y", env=env, timeout=120)
    assert "No nodes remaining" in down.stdout + down.stderr
    print(f"ray up + job + ray down: {time.time() - t0:.0f} s, {len(workers)} worker node(s)")
    assert not cluster_pids(cluster_dir), "ray down left processes of this cluster running"
