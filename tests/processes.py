"""Helpers of the tests that start real Ray processes from the command line (``ray start``,
``ray up``, ``ray job submit``): run a command, find free ports, find a cluster's processes."""
import socket
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
