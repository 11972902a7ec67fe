"""`ray job submit --working-dir . -- python jobs/mtl.py` against a real head on 127.0.0.1.

Runs its own head (`ray start --head`), so it must not share the machine with the session's
in-process Ray: conftest orders it before every test that starts that one.
"""
import os
import re
import secrets
import sys
from pathlib import Path

import pytest
from processes import free_ports, pids_naming, sh, submit_smoke_job

from raymtl.cluster_local import _stop

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def head():
    """One head for the module's tests (each only submits to it or joins it)."""
    import tempfile
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")   # short: Ray's socket paths are length-limited
    bin_dir = Path(sys.executable).parent
    # Ray 2.60 keeps token authentication on: the head, the CLI and the job's driver share a
    # fresh token through the environment (nothing is written to ~/.ray).
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",   # the job's `python` is this venv's
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    # fixed defaults (agent 52365, metrics, ...) may be held by another Ray on this machine
    agent, grpc, runtime_env, metrics = free_ports(4)
    sh(str(bin_dir / "ray"), "start", "--head", "--num-cpus=2", "--node-ip-address=127.0.0.1",
       "--port=6391", "--dashboard-host=127.0.0.1", "--dashboard-port=8291", "--include-dashboard=true",
       f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={grpc}",
       f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
       f"--temp-dir={temp_dir}", env=env)
    try:
        yield env, "http://127.0.0.1:8291"
    finally:
        stop_cluster(temp_dir)


def stop_cluster(temp_dir: str) -> None:
    """Stop only the head this test started: every process whose command line names its
    temp dir. (`ray stop` would kill every Ray instance on the machine.) The head's gcs_server,
    raylet and monitor outlive a SIGTERM by more than 12 s, so SIGKILL follows after 2 s."""
    _stop(pids_naming(temp_dir), grace_s=2.0)


def test_job_submit_runs_the_smoke_job_and_its_checkpoint_reloads(head, data_dir, tmp_path):
    env, address = head
    out = tmp_path / "out"
    best, _ = submit_smoke_job(address, env, data_dir, out)
    from raymtl.cli import main
    assert main(["evaluate", "--checkpoint", str(best), "--data-dir", data_dir]) == 0


def test_a_second_job_on_the_machine_joins_the_running_ray(head):
    """One Ray per machine: with a head running and no RAY_ADDRESS, a job joins that head
    instead of starting a rival local instance."""
    env, _ = head
    probe = ("from ray._private.services import find_gcs_addresses\n"
             "from raymtl.train.trainer import ensure_ray\n"
             "ensure_ray()\n"
             "import ray\n"
             "print('GCS', ray.get_runtime_context().gcs_address, sorted(find_gcs_addresses()))\n")
    proc = sh(sys.executable, "-c", probe, env=env, timeout=120)
    joined = re.search(r"\[raymtl\] joining the Ray instance already running on this machine \(([\d.]+):6391\)",
                       proc.stdout)
    assert joined, proc.stdout + proc.stderr[-2000:]
    ip = joined.group(1)                                                 # the node's address as Ray lists it
    assert f"GCS {ip}:6391 ['{ip}:6391']" in proc.stdout                # the head's, and still only one


def test_a_job_given_ray_address_joins_a_token_head_without_ray_auth_mode(head, tmp_path):
    """``ray start --head`` writes its token to ~/.ray/auth_token; a job started with only
    RAY_ADDRESS (no RAY_AUTH_MODE in the shell) joins it instead of failing to connect."""
    env, _ = head
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(env["RAY_AUTH_TOKEN"])
    env = {k: v for k, v in env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    env.update(HOME=str(home), RAY_ADDRESS="127.0.0.1:6391")
    probe = ("from raymtl.train.trainer import ensure_ray\n"
             "ensure_ray()\n"
             "import ray\n"
             "print('GCS', ray.get_runtime_context().gcs_address, ray.cluster_resources().get('CPU'))\n")
    proc = sh(sys.executable, "-c", probe, env=env, timeout=120)
    assert re.search(r"^GCS [\d.]+:6391 2\.0$", proc.stdout, re.M), proc.stdout
