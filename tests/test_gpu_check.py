"""scripts/gpu_check.py, the GPU acceptance script, on the CPU: ``--smoke --device cpu`` runs the
same code (real entry points through Ray, real data, the tiny model) and its table must list
every check and show every check it ran as passed.

On 2 CPU cores the test runs one check of each kind (``CHECKS``): every fusion method and
ZeRO stage also trains in tests/test_fusion_train.py and tests/test_train.py.
"""
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKS = "mtl,predict,zero3"        # the others (BERT-base, fusion, pipeline, tune) have their own CPU tests


def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module              # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def every_row(gc) -> list[str]:
    """Every row the table has, in order (the in-process check gives two)."""
    plan = gc.Plan(gc.argparse.Namespace(smoke=True, device="cpu", data_dir="d", encoder=None), Path("out"))
    return [n for c in plan.checks() for n in c.rows]


def test_the_default_is_every_check_and_every_fusion_method_is_one():
    gc = gpu_check()
    plan = gc.Plan(gc.argparse.Namespace(smoke=False, device="cuda", data_dir="d", encoder=None), Path("out"))
    names = [c.name for c in plan.checks()]
    assert [c.name for c in gc.select(plan.checks(), None)] == names
    assert {f"fusion-{m}" for m in gc.FUSION_METHODS} <= set(names)
    assert {"mtl", "predict", "bert-base", "zero2", "zero3", "pipeline", "tune"} <= set(names)
    assert [c.name for c in gc.select(plan.checks(), "zero,predict")] == ["predict", "zero2", "zero3"]
    with pytest.raises(SystemExit, match="unknown"):
        gc.select(plan.checks(), "mtl,nope")


def test_encoder_reaches_the_full_size_jobs_and_not_the_smoke_ones():
    gc = gpu_check()
    plan = gc.Plan(gc.argparse.Namespace(smoke=False, device="cuda", data_dir="d", encoder="/m/minilm"), Path("o"))
    commands = {c.name: c.command() for c in plan.checks() if c.name in ("mtl", "zero3", "fusion-pcgrad", "pipeline")}
    for name in ("mtl", "zero3", "fusion-pcgrad"):
        assert commands[name][commands[name].index("--encoder") + 1] == "/m/minilm", name
    assert "--smoke" in commands["pipeline"] and "--encoder" not in commands["pipeline"]
    plan = gc.Plan(gc.argparse.Namespace(smoke=False, device="cuda", data_dir="d", encoder=None), Path("o"))
    assert "--encoder" not in plan.checks()[0].command()                 # the jobs' own default


def test_peaks_and_mfu():
    gc = gpu_check()
    assert gc.bf16_peak_tflops("NVIDIA H200") == 989
    assert gc.bf16_peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert gc.bf16_peak_tflops("NVIDIA H100 PCIe") == 756
    assert gc.bf16_peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert gc.bf16_peak_tflops("NVIDIA L4") == 121 and gc.bf16_peak_tflops("NVIDIA A10G") == 70
    assert gc.bf16_peak_tflops("Tesla T4") is None and gc.bf16_peak_tflops(None) is None
    assert gc.mfu(6, 100_000_000, 1_000_000, 1000.0) == pytest.approx(0.6)     # 6e14 / 1e15
    assert gc.mfu(2, 100_000_000, 1_000_000, None) is None


@pytest.mark.timeout(900)
def test_smoke_on_cpu_every_check_it_runs_passes(data_dir, tmp_path):
    cmd = [sys.executable, "scripts/gpu_check.py", "--smoke", "--device", "cpu", "--checks", CHECKS,
           "--data-dir", data_dir, "--output", str(tmp_path / "runs"), "--report", str(tmp_path / "gpu_check.md")]
    # conftest runs this module before the session's Ray starts: the script starts its own Ray and its
    # jobs join it (raymtl.train.trainer.ensure_ray, token auth), as on a GPU machine
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=880)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    report = (tmp_path / "gpu_check.md").read_text()
    rows = dict(re.findall(r"^\| ([\w-]+) \| (pass|FAIL|timeout|skipped|not selected) \|", report, re.M))
    assert list(rows) == every_row(gpu_check())
    ran = {n: r for n, r in rows.items() if r != "not selected"}
    assert ran and all(r == "pass" for r in ran.values()), ran
    assert set(ran) == {"mtl", "predict", "zero3"}
    assert "CPU run" in report and "What multi-GPU adds" in report
