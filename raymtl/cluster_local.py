"""A node provider that lets ``ray up cluster.local.yaml`` run for real on one machine.

Why it exists: Ray 2.60 has a fake multi-node provider (``FakeMultiNodeProvider``: the
autoscaler's worker nodes are local raylets), but its ``provider: type: fake_multinode``
loads a defaults file the 2.60 wheel does not ship, and the class is made for
``RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=...``, not ``ray up``: its head
always "exists" and it has no command runner, so ``ray up`` would SSH to a fake address.

``LocalTwinProvider`` (used as ``provider: type: external, module:
raymtl.cluster_local.LocalTwinProvider``) keeps the rest of that class and adds:

* a head node that ``ray up`` creates, and a command runner that runs the head's commands
  (setup, ``head_start_ray_commands``) as local ``bash -c`` subprocesses and "rsyncs"
  file mounts by copying, so ``ray up`` runs its real flow on this machine;
* node state in ``<cluster_dir>/nodes.json``, shared by ``ray up``, the head's autoscaler
  (which loads this same provider and starts worker nodes as local raylets) and
  ``ray down``;
* stopping that touches only this cluster: ``ray stop`` (which ``ray down`` runs on the
  head, and which would stop every Ray on the machine) is skipped, and terminating a node
  signals only the processes that carry this cluster's marker in their environment
  (``RAYMTL_LOCAL_HEAD``, set on every head command; ``RAYMTL_LOCAL_NODE`` on a worker's raylet)
  or that the worker's start recorded. Linux only (reads ``/proc``).

Settings (``provider:`` keys, each overridden by the environment variable in brackets, and
exported to the head's commands under that name): ``gcs_port`` [RAYMTL_GCS_PORT, 6390],
``dashboard_port`` [RAYMTL_DASHBOARD_PORT, 8266], ``cluster_dir`` [RAYMTL_CLUSTER_DIR,
/tmp/raymtl-local: node state, the head's ``--temp-dir`` ``ray/`` and the workers' ``nodeNNNNN/``].
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from threading import RLock

from ray.autoscaler._private.command_runner import _with_environment_variables
from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID, FakeMultiNodeProvider
from ray.autoscaler._private.subprocess_output_util import ProcessRunnerError
from ray.autoscaler.command_runner import CommandRunnerInterface
from ray.autoscaler.node_provider import NodeProvider
from ray.autoscaler.tags import (
    NODE_KIND_HEAD,
    STATUS_UP_TO_DATE,
    TAG_RAY_NODE_KIND,
    TAG_RAY_NODE_STATUS,
    TAG_RAY_USER_NODE_TYPE,
)

SETTINGS = {"gcs_port": ("RAYMTL_GCS_PORT", 6390), "dashboard_port": ("RAYMTL_DASHBOARD_PORT", 8266),
            "cluster_dir": ("RAYMTL_CLUSTER_DIR", "/tmp/raymtl-local")}


class LocalTwinProvider(FakeMultiNodeProvider):
    def __init__(self, provider_config, cluster_name):
        NodeProvider.__init__(self, provider_config, cluster_name)   # not the parent's: no head seeded in memory
        self.lock = RLock()
        self.settings = {k: str(os.environ.get(env) or provider_config.get(k, default))
                         for k, (env, default) in SETTINGS.items()}
        self.dir = Path(self.settings["cluster_dir"])
        self._gcs_address = f"127.0.0.1:{self.settings['gcs_port']}"
        self._head_node_id = FAKE_HEAD_NODE_ID       # `RAY_FAKE_CLUSTER=1 ray start --head` takes this node id
        self._launch_multiple = provider_config.get("launch_multiple", True)
        self._creation_error = self._termination_errors = None
        self._started = {}                           # worker id -> ray._private.node.Node, in this process

    # ---- node state, shared by ray up, the head's autoscaler and ray down
    @contextlib.contextmanager
    def _state(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        with self.lock, open(self.dir / "nodes.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            path = self.dir / "nodes.json"
            state = json.loads(path.read_text()) if path.is_file() else {"next": 1, "nodes": {}}
            yield state
            path.with_suffix(".tmp").write_text(json.dumps(state))
            path.with_suffix(".tmp").replace(path)

    @property
    def _nodes(self):
        """What the parent's read-only methods see: the nodes in the state file, less workers
        whose processes are all gone."""
        with self._state() as state:
            return {i: n for i, n in state["nodes"].items() if not n.get("pids") or any(map(_alive, n["pids"]))}

    def set_node_tags(self, node_id, tags):
        with self._state() as state:
            state["nodes"][node_id]["tags"].update(tags)

    def create_node(self, node_config, tags, count):
        self.create_node_with_resources_and_labels(node_config, tags, count, {}, {})

    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        if tags.get(TAG_RAY_NODE_KIND) == NODE_KIND_HEAD:    # ray up: the head is this machine;
            with self._state() as state:                     # its start commands start Ray
                state["nodes"][self._head_node_id] = {"tags": dict(tags)}
            return
        import ray._private.node
        from ray._private import ray_constants
        from ray._private.parameter import RayParams
        resources = dict(resources)
        with self._state() as state:                         # the parent's id scheme, ids never reused
            node_id = "f" * 51 + str(state["next"]).zfill(5)
            state["next"] += 1
        node_type = tags[TAG_RAY_USER_NODE_TYPE]
        params = RayParams(
            node_ip_address="127.0.0.1", gcs_address=self._gcs_address, redis_address=self._gcs_address,
            min_worker_port=0, max_worker_port=0, dashboard_port=None, dashboard_agent_listen_port=0,
            temp_dir=str(self.dir / f"node{node_id[-5:]}"),   # its own runtime_resources, as on a machine of
            # its own: in the head's, one node's agent deletes a job's working_dir that another's workers run in
            num_cpus=resources.pop("CPU", 0), num_gpus=resources.pop("GPU", 0),
            object_store_memory=resources.pop("object_store_memory", None), resources=resources, labels=labels,
            env_vars={"RAY_OVERRIDE_NODE_ID_FOR_TESTING": node_id, "RAY_CLOUD_INSTANCE_ID": node_id,
                      "RAY_NODE_TYPE_NAME": node_type, "RAYMTL_LOCAL_NODE": f"{node_id}@{self.dir}",
                      ray_constants.RESOURCES_ENVIRONMENT_VARIABLE: json.dumps(resources),
                      ray_constants.LABELS_ENVIRONMENT_VARIABLE: json.dumps(labels)})
        # This process (the head's autoscaler) inherited the head's own overrides from `ray up`
        # (RAY_OVERRIDE_RESOURCES={"CPU": 0}); Ray would apply them to this node too.
        for var in (ray_constants.RESOURCES_ENVIRONMENT_VARIABLE, ray_constants.LABELS_ENVIRONMENT_VARIABLE):
            os.environ.pop(var, None)
        node = ray._private.node.Node(params, head=False, shutdown_at_exit=False, spawn_reaper=False)
        self._started[node_id] = node
        pids = [p.process.pid for infos in node.all_processes.values() for p in infos]
        with self._state() as state:
            state["nodes"][node_id] = {"tags": {**tags, TAG_RAY_NODE_STATUS: STATUS_UP_TO_DATE}, "pids": pids}

    def terminate_node(self, node_id):
        with self._state() as state:
            node = state["nodes"].pop(node_id, None)
        self._started.pop(node_id, None)
        if node_id == self._head_node_id:           # the head and everything started from it
            _stop(_pids_with_env("RAYMTL_LOCAL_HEAD", str(self.dir)))
        elif node:
            _stop(set(node.get("pids", [])) | _pids_with_env("RAYMTL_LOCAL_NODE", f"{node_id}@{self.dir}"))

    # ---- the head's commands run here, not over SSH
    def cluster_env(self) -> dict:
        env = {SETTINGS[k][0]: v for k, v in self.settings.items()}
        return {**env, "RAYMTL_LOCAL_HEAD": str(self.dir)}

    def get_command_runner(self, log_prefix, node_id, *args, **kwargs):
        return LocalCommandRunner(self, log_prefix)


class LocalCommandRunner(CommandRunnerInterface):
    """Runs a node's commands with ``bash -c`` on this machine, in $HOME like an SSH login."""

    def __init__(self, provider: LocalTwinProvider, log_prefix: str):
        self.provider, self.log_prefix = provider, log_prefix

    def run(self, cmd=None, timeout=120, exit_on_fail=False, port_forward=None, with_output=False,
            environment_variables=None, run_env="auto", ssh_options_override_ssh_key="",
            shutdown_after_run=False):
        if cmd and re.match(r"\s*ray stop\b", cmd):
            print(f"{self.log_prefix}skipped `{cmd}`: it stops every Ray on this machine; "
                  "this cluster's nodes stop when the provider terminates them", flush=True)
            return b"" if with_output else None
        full = _with_environment_variables(cmd or "bash", environment_variables or {})
        proc = subprocess.run(["bash", "-c", full], cwd=os.path.expanduser("~"), stdout=subprocess.PIPE
                              if with_output else None, env={**os.environ, **self.provider.cluster_env()})
        if proc.returncode:
            if exit_on_fail:
                raise SystemExit(proc.returncode)
            raise ProcessRunnerError("Command failed", "ssh_command_failed", code=proc.returncode, command=cmd)
        return proc.stdout if with_output else None

    def run_rsync_up(self, source, target, options=None):
        _copy(source, os.path.expanduser(target), (options or {}).get("rsync_exclude"))

    def run_rsync_down(self, source, target, options=None):
        _copy(os.path.expanduser(source), target, (options or {}).get("rsync_exclude"))

    def remote_shell_command_str(self):
        return "bash"

    def run_init(self, *, as_head, file_mounts, sync_run_yet):
        return None


def _copy(source: str, target: str, exclude=None) -> None:
    if os.path.isdir(source):
        shutil.copytree(source, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*(exclude or [])))
    elif not (os.path.exists(target) and os.path.samefile(source, target)):
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        shutil.copy2(source, target)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _pids_with_env(name: str, value: str) -> set[int]:
    """Processes whose environment has ``name=value``, not counting this one."""
    needle, pids = f"\0{name}={value}\0".encode(), set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if needle in b"\0" + (proc / "environ").read_bytes():
                    pids.add(int(proc.name))
            except OSError:
                continue
    return pids


def _stop(pids: set[int], grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL what is left after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.time() + grace_s
        while any(map(_alive, pids)) and time.time() < deadline:
            time.sleep(0.2)
        pids = {p for p in pids if _alive(p)}
