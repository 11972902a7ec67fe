"""Helpers of the tests that start real Ray processes from the command line (``ray start``,
``ray up``, ``ray job submit``): run a command, find free ports, find a cluster's processes."""
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def sh(*args, env=None, check=True, timeout=300):
    """Run ``args`` in the project root; with ``check``, a non-zero exit fails the test with the output's tail."""
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode:
        raise AssertionError(f"{' '.join(args[:3])} ... exited {proc.returncode}:\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now."""
    socks = [socket.socket() for _ in range(n)]
    for sock in socks:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in socks]
    for sock in socks:
        sock.close()
    return ports


def pids_naming(text: str) -> set[int]:
    """Processes whose command line contains ``text`` (a cluster's temp dir)."""
    pids = set()
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_text(errors="replace"):
                pids.add(int(proc.name))
        except OSError:
            continue
    return pids


def submit_smoke_job(address: str, env: dict, data_dir: str, out: Path, context: str = "") -> tuple[Path, str]:
    """`ray job submit --working-dir . -- python jobs/mtl.py --smoke` to ``address``; waits for it
    to succeed and returns its best checkpoint (under ``out``) and its logs. ``context`` is added
    to a failed submission's message."""
    submit = (RAY, "job", "submit", f"--address={address}", "--working-dir=.", "--no-wait",
              "--", "python", "jobs/mtl.py", "--smoke", f"--data-dir={data_dir}", f"--output={out}")
    deadline = time.time() + 120
    while True:   # a fresh head's job agent takes a while to come up on a busy machine
        proc = sh(*submit, env=env, check=False)
        if proc.returncode == 0 or "No available agent" not in proc.stderr or time.time() > deadline:
            break
        time.sleep(3)
    assert proc.returncode == 0, context + proc.stderr[-3000:]
    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", proc.stdout + proc.stderr).group(0)
    deadline, status = time.time() + 400, ""
    while time.time() < deadline:
        done = sh(RAY, "job", "status", f"--address={address}", job_id, env=env)
        status = (done.stdout + done.stderr).upper()  # "Job '…' succeeded", logged to stderr
        if any(s in status for s in ("SUCCEEDED", "FAILED", "STOPPED")):
            break
        time.sleep(3)
    logs = sh(RAY, "job", "logs", f"--address={address}", job_id, env=env).stdout
    assert "SUCCEEDED" in status, logs[-3000:]
    assert "[raymtl] step 12/12" in logs and "[raymtl] best checkpoint:" in logs
    best = Path(logs.split("[raymtl] best checkpoint:")[1].split()[0])
    assert best.is_relative_to(out)
    assert json.loads((best / "metrics.json").read_text())["step"] in (6, 12)
    return best, logs
