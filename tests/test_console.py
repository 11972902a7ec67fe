"""The console of a training job: raymtl's progress and validation lines, not the libraries'
chatter (that stays in Ray's logs unless --verbose); the lines also land in <run>/train.log."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(600)
CHATTER = ("LOAD REPORT", "Loading weights", "deepspeed_shm_comm_op", "(TrainController", "(RayTrainWorker",
           "execution finished", "registers for logging", "RayDeprecationWarning", "Setting up process group",
           "Progress bars disabled", "Token authentication is enabled", "core_worker.cc",
           "constructor arguments in the object store")


def job(*flags, data_dir, out):
    return subprocess.run([sys.executable, "jobs/mtl.py", "--smoke", "--steps", "6", "--eval-every", "6",
                           "--log-every", "3", "--data-dir", data_dir, "--output", str(out), *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=500)


def test_the_default_console_is_quiet(data_dir, tmp_path):
    quiet = job("--force-prepare", data_dir=data_dir, out=tmp_path)      # the prepare pass runs too
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    console = quiet.stdout + quiet.stderr
    for line in ("[raymtl] step 3/6", "[raymtl] step 6/6", "[raymtl] validation step 6:", "[raymtl] best checkpoint:"):
        assert console.count(line) == 1, (line, console[-3000:])
    assert not [c for c in CHATTER if c in console], console[-3000:]
    log = (tmp_path / "mtl" / "train.log").read_text()
    assert "[raymtl] step 6/6" in log and "[raymtl] validation step 6:" in log
    # (--verbose connects as before this quiet console: log_to_driver, the workers' output on the console)
