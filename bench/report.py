"""Where a bench script's measurement goes: a markdown file under ``docs/results/`` that the
script itself writes, with the date, the commit, the exact command and the machine, so a
published number is a file a command produced, not a README edit."""
from __future__ import annotations

import contextlib
import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from raymtl.models.device import cpu_flags, native_bf16

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"


def git(*args: str) -> str:
    try:        # --no-optional-locks: reading the status never rewrites the index
        return subprocess.run(["git", "--no-optional-locks", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine() -> str:
    """CPUs, CPU model and its bf16 flags, memory, GPU if any, torch and DeepSpeed versions."""
    import deepspeed
    model = "?"
    with contextlib.suppress(OSError):
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "?")
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    bf16 = sorted(f for f in cpu_flags() if "bf16" in f or f.startswith("amx"))
    gpu = f"; GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "; no GPU"
    return (f"{os.cpu_count()} x {model}, {mem:.0f} GiB RAM{gpu}; bf16 CPU flags: {', '.join(bf16) or 'none'} "
            f"(native bf16 on CPU: {native_bf16(False)[0]}); Python {platform.python_version()}, "
            f"torch {torch.__version__}, DeepSpeed {deepspeed.__version__}")


def provenance(script: str, argv: list[str], started: datetime.datetime, wall_s: float) -> list[str]:
    """The lines that say where a measurement came from."""
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    python = os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT)) else sys.executable
    return [f"- date: {started:%Y-%m-%d %H:%M} UTC, {wall_s / 60:.0f} min",
            f"- commit: `{head}`" + (" with uncommitted changes in the working tree" if dirty else ""),
            f"- command: `{shlex.join([python, script, *argv])}`",
            f"- machine: {machine()}"]


def write(name: str, title: str, script: str, argv: list[str], started: datetime.datetime,
          lines: list[str], path: Path | None = None) -> Path:
    """Write ``docs/results/<name>.md`` (or ``path``): title, provenance, then ``lines``."""
    wall = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
    path = path or RESULTS / f"{name}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([f"# {title}", "", f"Written by `{script}` (every full run overwrites it; the "
                               "history is in git).", "", *provenance(script, argv, started, wall), "",
                               *lines, ""]))
    return path


def publish(lines: list[str], name: str, title: str, script: str, argv: list[str] | None,
            started: datetime.datetime, smoke: bool = False) -> Path | None:
    """Print a bench's table and, unless ``smoke`` (the code path, not a number), write it with
    :func:`write` and say where; ``argv`` None means the command line."""
    print("\n" + "\n".join(lines))
    if smoke:
        return None
    path = write(name, title, script, sys.argv[1:] if argv is None else list(argv), started, lines)
    print(f"[bench] written to {path}")
    return path


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)
