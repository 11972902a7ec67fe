"""Training-loop speed: raymtl's Ray Train + DeepSpeed loop against plain PyTorch loops, in fp32 and bf16.

    .venv/bin/python bench/speed.py             # every loop, default encoder, 3 rounds x 40 steps (~80 min here)
    .venv/bin/python bench/speed.py --rounds 2 --steps 30 --loops raymtl-default,raymtl-default-bf16,\
        raymtl,raymtl-bf16,plain-bucketed,plain-bucketed-bf16-autocast,plain-bucketed-compiled   # ~30 min
    .venv/bin/python bench/speed.py --smoke     # tiny model, one round, every loop, ~3 min
    .venv/bin/python bench/speed.py --profile   # no Ray: where a step's CPU time goes, fp32 vs bf16 autocast

Same model (in train mode: dropout on), optimizer groups, clipping, batches (3 tasks x 32
rows per step) and data (the same Ray datasets) in all of them; only the machinery and the
precision differ (each row's precision is in the table):

* plain-padded:   a plain loop over Hugging Face's forward, each batch padded to its longest row;
* plain-bucketed: the same plain loop over length-bucketed batches (raymtl's bucketing);
* plain-bucketed-bf16-autocast: that loop with ``torch.autocast('cpu', dtype=torch.bfloat16)``
                  around forward and loss (fp32 weights, gradients and AdamW);
* plain-bucketed-compiled: that loop (fp32) with ``torch.compile`` on the encoder; the compile
                  happens in extra warm-up steps, timed apart ("compile + warm-up" below); a
                  compile that fails or runs past ``--compile-limit`` is recorded in the row;
* raymtl-padded:  ``jobs/mtl.py``'s path with Hugging Face's padded forward (``--no-unpad``):
                  TorchTrainer worker + DeepSpeed engine (fused AdamW on CPU, no gradient
                  all-reduce with a single ZeRO-0 worker), on the summed loss (``--fusion
                  sum``), the plain loops' arithmetic: what the machinery alone costs;
* raymtl:         the same with raymtl's default padding-free encoder forward (``raymtl.models.unpad``);
* raymtl-bf16:    that loop with ``--precision bf16`` (DeepSpeed's bf16 mode: bf16 module,
                  fp32 master weights and AdamW state);
* raymtl-default: the default loop: that, with the default fusion (IMTL-G weights refreshed
                  every 10 steps: three per-task backwards on those steps);
* raymtl-default-bf16: the default loop with ``--precision bf16``.

Runs are interleaved round after round; each run's s/step, examples/s and tokens/s are means
over its timed steps; reported are medians over rounds and ratios against the fp32 default
loop and raymtl's summed-loss loop measured in the same run (round by round), plus Ray
start-up time and Ray Data tokenization throughput against the rate training consumes rows.
Useful tokens are the real (non-padding) ones. ``--loops`` picks the loops (default: all).

Each row also says how much CPU the *other* processes took while that loop trained (sampled
from ``/proc`` every 2 s, over the intervals in which the loop's own process used at least
3/4 of its cores), and the largest of them during raymtl's runs are listed by name: on a
small machine every core Ray's daemons and actors take is a core the training threads lack.

Everything printed goes to ``docs/results/speed.md`` too (with the date, commit, command and
machine); ``--smoke`` writes to a temporary file instead, ``--results`` elsewhere.

``--profile`` starts no Ray: it tokenizes a few thousand rows in-process and runs the plain
bucketed loop (padding-free forward, as the default loop; ``--profile-padded`` for Hugging
Face's) under ``torch.profiler`` in fp32 and in bf16 autocast, and prints the wall time per
step by phase, the self CPU time per kind of op side by side, and the top ops of each.
"""
import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from raymtl.config import MTLConfig, smoke
from raymtl.data.streams import cycle_batches
from raymtl.models.multitask import MultiTaskModel
from raymtl.objectives.multitask import LOSSES
from raymtl.recipes import PLAIN_ENCODER, SUM_LOSS
from raymtl.train.engine import param_groups
from raymtl.train.loop import Progress

sys.path.insert(0, str(Path(__file__).resolve().parent))    # bench/report.py, also when loaded by path
import report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results" / "speed.md"

# Every loop, in the order a round runs them, with its precision as the table states it:
# "bf16 autocast" = fp32 weights, forward and loss under torch.autocast; "bf16 DeepSpeed" =
# DeepSpeed's bf16 mode (bf16 module, fp32 master weights and optimizer state).
LOOPS = {"plain-padded": "fp32",
         "plain-bucketed": "fp32",
         "plain-bucketed-bf16-autocast": "bf16 autocast",
         "plain-bucketed-compiled": "fp32",
         "raymtl-padded": "fp32",
         "raymtl": "fp32",
         "raymtl-bf16": "bf16 DeepSpeed",
         "raymtl-default": "fp32",
         "raymtl-default-bf16": "bf16 DeepSpeed"}
BASELINE = "raymtl-default"         # the ratio column: this loop in fp32, measured in the same run
# bf16 (or compiled) loop -> its fp32 twin, for the "speed-up over the same loop" line
TWINS = {"raymtl-default-bf16": "raymtl-default", "raymtl-bf16": "raymtl",
         "plain-bucketed-bf16-autocast": "plain-bucketed", "plain-bucketed-compiled": "plain-bucketed"}
TARGET_TOKENS, TARGET_RATIO = 2800, 1.9     # issue 27: the default loop in bf16
COMPILE_WARMUP = 4                          # extra untimed steps of the compiled loop (recompiles for new shapes)
COMPILE_SCOPES = ("blocks", "encoder")      # see compile_encoder


def process_name(cmdline: list[str], comm: str = "?") -> str:
    """A short name for a process: ``ray::Actor`` and other set titles (one argument with
    spaces) by their first word, else program + script; no command line: the kernel's name."""
    if not cmdline:
        return comm
    if cmdline[0].startswith("ray::") or (len(cmdline) == 1 and " " in cmdline[0]):
        return cmdline[0].split()[0]
    script = next((os.path.basename(c) for c in cmdline[1:] if c.endswith(".py")), "")
    return " ".join(filter(None, [os.path.basename(cmdline[0]), script]))


class CpuSampler:
    """Every process's CPU time (Linux ``/proc``), sampled every ``period`` seconds in a thread,
    so a loop's row can say what the *other* processes took from the machine while it trained:
    Ray's daemons and actors compete with the training threads for the same cores."""

    def __init__(self, period: float = 2.0):
        self.period, self.samples = period, []
        self.available = os.path.isdir("/proc/self/task")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def snapshot() -> dict[int, tuple[float, str]]:
        tick, out = os.sysconf("SC_CLK_TCK"), {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    comm, fields = f.read().rsplit(")", 1)
                with open(f"/proc/{pid}/cmdline") as f:
                    cmd = [c for c in f.read().split("\0") if c]
            except OSError:                 # the process ended meanwhile
                continue
            fields = fields.split()
            out[int(pid)] = ((int(fields[11]) + int(fields[12])) / tick,
                             process_name(cmd, comm.split("(", 1)[1]))
        return out

    def _run(self):
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), self.snapshot()))
            self._stop.wait(self.period)

    def __enter__(self):
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.available:
            self._thread.join()
            self.samples.append((time.perf_counter(), self.snapshot()))

    def others(self, is_trainer, busy: float) -> dict | None:
        """Over the sampling intervals in which the training process (``is_trainer(pid, name)``)
        used at least ``busy`` cores, the other processes' CPU: ``machine`` (share of all
        cores) and ``by_name`` (cores, largest first). None if no interval qualified."""
        cores, seconds, other, by_name = os.cpu_count() or 1, 0.0, 0.0, defaultdict(float)
        for (t0, a), (t1, b) in zip(self.samples, self.samples[1:]):
            used = {pid: cpu - a[pid][0] for pid, (cpu, _) in b.items() if pid in a}
            trainer = [pid for pid in used if is_trainer(pid, b[pid][1])]
            if not trainer or sum(used[p] for p in trainer) < busy * (t1 - t0):
                continue
            seconds += t1 - t0
            for pid, cpu in used.items():
                if pid not in trainer and cpu > 0:
                    other += cpu
                    by_name[b[pid][1]] += cpu
        if not seconds:
            return None
        return {"machine": other / (seconds * cores), "seconds": seconds,
                "by_name": dict(sorted(((k, v / seconds) for k, v in by_name.items()),
                                       key=lambda kv: -kv[1]))}


def fresh_model(cfg: MTLConfig) -> MultiTaskModel:
    torch.manual_seed(cfg.train.seed)
    torch.set_num_threads(int(cfg.scale.cpus_per_worker))
    model = MultiTaskModel.from_config(cfg.model, list(cfg.data.tasks), seed=cfg.train.seed)
    return model.train()    # dropout on, as in raymtl (from_pretrained leaves a model in eval mode)


def plain_step(model, streams: dict, opt, cfg: MTLConfig, amp: bool, clock=None) -> int:
    """One step of the plain loop over every task's next batch -> its useful tokens.
    ``amp``: forward and loss under bf16 autocast. ``clock(phase)``, if given, is called as
    each phase ends (data, forward, backward, clip, optimizer)."""
    tick = clock or (lambda phase: None)
    batches = {t: next(streams[t]) for t in cfg.data.tasks}
    n_tok = sum(int(v.sum()) for b in batches.values() for k, v in b.items() if k.startswith("attention_mask"))
    tick("data")
    with torch.autocast("cpu", dtype=torch.bfloat16) if amp else contextlib.nullcontext():
        loss = sum(LOSSES[model.heads[t].kind](model(t, b).float(), b["label"]) for t, b in batches.items())
    tick("forward")
    loss.backward()
    tick("backward")
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
    tick("clip")
    opt.step()
    opt.zero_grad(set_to_none=True)
    tick("optimizer")
    return n_tok


def optimizer(model, cfg: MTLConfig, fused: bool = False) -> torch.optim.Optimizer:
    groups, lrs = param_groups(model, cfg)
    return torch.optim.AdamW([{**g, "lr": lr} for g, lr in zip(groups, lrs)], fused=fused or None)


def graphs_compiled() -> int:
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


class CompileTooSlow(RuntimeError):
    pass


def compile_encoder(model: MultiTaskModel, scope: str) -> None:
    """``torch.compile`` the encoder in place (parameter names, hooks and checkpoints unchanged).
    'blocks': every layer's per-token blocks (``attention.output``: projection + dropout +
    residual + LayerNorm, ``intermediate``: projection + GELU, ``output``: the same as the
    first), tasks' own layers included: one compiled graph serves every layer (same code, the
    weights are inputs), and they are the modules both the padded and the padding-free forward
    (``raymtl.models.unpad``) call, so the result carries over to raymtl's forward. 'encoder':
    the whole Hugging Face encoder forward (the padded forward only; PAL hooks and SST's layer
    swap recompile it per task)."""
    if scope == "encoder":
        model.encoder.compile()
        return
    layers = [*model.encoder.encoder.layer, *(layer for own in model.task_layers.values() for layer in own)]
    for layer in layers:
        for block in (layer.attention.output, layer.intermediate, layer.output):
            block.compile(dynamic=True)     # lengths vary batch to batch: one dynamic graph, not one per shape


def plain_loop(cfg: MTLConfig, datasets: dict, steps: int, bucket: int, amp: bool = False,
               compiled: str = "", compile_limit_s: float = 900.0) -> dict:
    """``compiled``: '' (eager) or a ``compile_encoder`` scope."""
    model = fresh_model(cfg)
    warm = Progress.warmup
    if compiled:
        torch._dynamo.reset()       # each round's fresh model compiles afresh (never against the recompile limit)
        compile_encoder(model, compiled)
        warm += COMPILE_WARMUP
    opt = optimizer(model, cfg)
    streams = {t: cycle_batches(datasets[f"train_{t}"], cfg.train.batch_size, cfg.train.seed, bucket)
               for t in cfg.data.tasks}
    times, tokens, warm_s, graphs = [], 0, 0.0, 0
    for i in range(steps + warm):
        t0 = time.perf_counter()
        n_tok = plain_step(model, streams, opt, cfg, amp)
        dt = time.perf_counter() - t0
        if i < warm:
            warm_s += dt
            if compiled and warm_s > compile_limit_s:
                raise CompileTooSlow(f"compile + warm-up passed --compile-limit {compile_limit_s:.0f} s "
                                     f"after {i + 1} of {warm} warm-up steps")
            if i == warm - 1 and compiled:
                graphs = graphs_compiled()
            continue
        times.append(dt)
        tokens += n_tok
    rows = steps * cfg.train.batch_size * len(cfg.data.tasks)
    out = {"s_per_step": sum(times) / steps, "examples_per_s": rows / sum(times),
           "tokens_per_s": tokens / sum(times)}
    if compiled:    # warm-up beyond what the timed steps' mean would have taken: the compile
        out.update(compile_s=warm_s - warm * out["s_per_step"], warmup_s=warm_s, graphs=graphs,
                   timed_recompiles=graphs_compiled() - graphs)
        torch._dynamo.reset()
    return out


def raymtl_loop(cfg: MTLConfig, steps: int, **overrides) -> dict:
    from raymtl.train.trainer import fit
    total = steps + Progress.warmup          # raymtl's reported throughput leaves these out
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        s = fit(cfg.replace(steps=total, eval_every=total, log_every=total, output=tmp, warmup_ratio=0.0,
                            **overrides), verbose=False)
        wall = time.perf_counter() - t0
    m = s.metrics
    return {"s_per_step": m["s_per_step"], "examples_per_s": m["examples_per_s"],
            "tokens_per_s": m["tokens_per_s"], "fit_wall_s": wall}


def loop_runners(cfg: MTLConfig, datasets: dict, steps: int, compile_scope: str, compile_limit_s: float) -> dict:
    """Loop name -> a function that trains it once and returns its measurements."""
    plain = cfg.replace(unpad=False)         # a plain loop runs Hugging Face's padded forward
    bucket = cfg.data.bucket_batches
    return {
        "plain-padded": lambda: plain_loop(plain, datasets, steps, bucket=1),
        "plain-bucketed": lambda: plain_loop(plain, datasets, steps, bucket),
        "plain-bucketed-bf16-autocast": lambda: plain_loop(plain, datasets, steps, bucket, amp=True),
        "plain-bucketed-compiled": lambda: plain_loop(plain, datasets, steps, bucket, compiled=compile_scope,
                                                      compile_limit_s=compile_limit_s),
        "raymtl-padded": lambda: raymtl_loop(plain, steps, **SUM_LOSS),
        "raymtl": lambda: raymtl_loop(cfg, steps, **SUM_LOSS),
        "raymtl-bf16": lambda: raymtl_loop(cfg, steps, precision="bf16", **SUM_LOSS),
        "raymtl-default": lambda: raymtl_loop(cfg, steps),
        "raymtl-default-bf16": lambda: raymtl_loop(cfg, steps, precision="bf16"),
    }


# ----------------------------------------------------------------------------- --profile
class ArrayShard:
    """Rows in memory with the one method ``cycle_batches`` calls on a Ray Data shard."""

    def __init__(self, columns: dict[str, np.ndarray]):
        self.columns = columns

    def iter_batches(self, batch_size: int, batch_format: str, local_shuffle_buffer_size: int,
                     local_shuffle_seed: int):
        n = len(next(iter(self.columns.values())))
        order = np.random.default_rng(local_shuffle_seed).permutation(n)
        for i in range(0, n, batch_size):
            yield {k: v[order[i:i + batch_size]] for k, v in self.columns.items()}


def local_datasets(cfg: MTLConfig) -> dict[str, ArrayShard]:
    """``train_<task>`` shards tokenized in this process (no Ray): the profile's data."""
    from transformers import AutoTokenizer

    from raymtl.data.multitask import encode, label_set_of, load_splits
    from raymtl.models.encoder import tokenizer_source
    from raymtl.tasks import TASKS
    splits, _ = load_splits(cfg.data)
    tok = AutoTokenizer.from_pretrained(tokenizer_source(cfg.model.encoder))
    out = {}
    for t, parts in splits.items():
        rows = parts[0]
        enc = encode(tok, [r["text_a"] for r in rows], [r["text_b"] for r in rows],
                     cfg.model.mode_of(t) if TASKS[t].is_pair else None, cfg.data.max_length)
        columns = {"label": np.array([r["label"] for r in rows], np.float32),
                   "line": np.array([r["line"] for r in rows]),
                   "label_set": np.array([label_set_of(TASKS[t], r) for r in rows])}
        for k, v in enc.items():
            columns[k] = np.empty(len(rows), dtype=object)
            columns[k][:] = [np.asarray(x, np.int32) for x in v]
        out[f"train_{t}"] = ArrayShard(columns)
    return out


# self-CPU-time categories of the profile: first match (substring of the op name) wins
OP_KINDS = (("matmul", ("addmm", "aten::mm", "bmm", "matmul", "linear", "mkldnn", "onednn")),
            ("attention", ("scaled_dot_product", "flash_attention", "softmax")),
            ("layer norm", ("layer_norm",)),
            ("optimizer + clip", ("adam", "_foreach", "norm")),
            ("packing (index)", ("index", "nonzero", "masked", "gather", "scatter")),
            ("casts and copies", ("copy", "aten::to", "clone", "contiguous")),
            ("embedding", ("embedding",)),
            ("gelu, dropout", ("gelu", "dropout", "bernoulli", "native_dropout")))


def op_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in OP_KINDS if any(k in low for k in keys)), "other elementwise/ops")


def profile(cfg: MTLConfig, steps: int, padded: bool, top: int, emit) -> None:
    """Profile the plain bucketed loop in fp32 and in bf16 autocast (see the docstring)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    if padded:
        cfg = cfg.replace(unpad=False)
    t0 = time.perf_counter()
    datasets = local_datasets(cfg)
    emit(f"[profile] {sum(len(next(iter(s.columns.values()))) for s in datasets.values())} rows tokenized "
         f"in-process in {time.perf_counter() - t0:.1f} s; encoder={cfg.model.encoder}, "
         f"forward={'Hugging Face padded' if padded else 'padding-free (raymtl default)'}, "
         f"{cfg.train.batch_size} rows/task/step, fused AdamW (as raymtl on CPU), "
         f"{torch.get_num_threads()} threads, {steps} profiled steps after {Progress.warmup} warm-up")
    results = {}
    for name, amp in (("fp32", False), ("bf16 autocast", True)):
        model = fresh_model(cfg)
        opt = optimizer(model, cfg, fused=True)
        streams = {t: cycle_batches(datasets[f"train_{t}"], cfg.train.batch_size, cfg.train.seed,
                                    cfg.data.bucket_batches) for t in cfg.data.tasks}
        for _ in range(Progress.warmup):
            plain_step(model, streams, opt, cfg, amp)
        phases, tokens, last = defaultdict(float), 0, [time.perf_counter()]

        def clock(phase):
            now = time.perf_counter()
            phases[phase] += now - last[0]
            last[0] = now
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                last[0] = time.perf_counter()
                tokens += plain_step(model, streams, opt, cfg, amp, clock)
        ops = [(e.key, e.self_cpu_time_total / 1e3 / steps, e.count // steps) for e in prof.key_averages()]
        results[name] = {"phases": {k: v / steps for k, v in phases.items()}, "ops": ops,
                         "tokens_per_s": tokens / sum(phases.values())}
    a, b = results["fp32"], results["bf16 autocast"]
    emit("\nWall time per step by phase (ms; under the profiler, so slower than the bench):\n")
    emit("| phase | fp32 | bf16 autocast | bf16 ÷ fp32 |")
    emit("|---|---|---|---|")
    for k in list(a["phases"]) + ["step"]:
        x = sum(a["phases"].values()) if k == "step" else a["phases"][k]
        y = sum(b["phases"].values()) if k == "step" else b["phases"][k]
        emit(f"| {k} | {1e3 * x:.0f} | {1e3 * y:.0f} | {y / x:.2f} |")
    emit(f"\nuseful tokens/s under the profiler: fp32 {a['tokens_per_s']:.0f}, "
         f"bf16 autocast {b['tokens_per_s']:.0f} ({b['tokens_per_s'] / a['tokens_per_s']:.2f}x)")
    kinds = {n: defaultdict(float) for n in results}
    for n, r in results.items():
        for key, ms, _ in r["ops"]:
            kinds[n][op_kind(key)] += ms
    ta, tb = sum(kinds["fp32"].values()), sum(kinds["bf16 autocast"].values())
    emit("\nSelf CPU time per step by kind of op (ms, share of the step's op time):\n")
    emit("| kind | fp32 | bf16 autocast | bf16 ÷ fp32 |")
    emit("|---|---|---|---|")
    for kind in sorted(kinds["fp32"], key=lambda k: -kinds["fp32"][k]):
        x, y = kinds["fp32"][kind], kinds["bf16 autocast"].get(kind, 0.0)
        emit(f"| {kind} | {x:.0f} ({100 * x / ta:.0f} %) | {y:.0f} ({100 * y / tb:.0f} %) | "
             f"{y / x if x else float('nan'):.2f} |")
    emit(f"| all ops | {ta:.0f} | {tb:.0f} | {tb / ta:.2f} |")
    for n, r in results.items():
        total = sum(ms for _, ms, _ in r["ops"])
        emit(f"\nTop {top} ops by self CPU time, {n} (ms per step, calls per step):\n")
        emit("| op | self CPU ms/step | share | calls/step |")
        emit("|---|---|---|---|")
        for key, ms, calls in sorted(r["ops"], key=lambda o: -o[1])[:top]:
            emit(f"| {key} | {ms:.1f} | {100 * ms / total:.1f} % | {calls} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model, one round of 6 steps: the code path, not a number")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--loops", default=",".join(LOOPS),
                   help=f"comma-separated loops to run, in this order whatever the order given: {', '.join(LOOPS)}")
    p.add_argument("--plain-encoder", "--no-pals", dest="plain_encoder", action="store_true",
                   help="every loop on the plain encoder (the default gives STS PALs and SST its own top "
                        "half of the encoder, in every loop alike)")
    p.add_argument("--compile-scope", choices=COMPILE_SCOPES, default="blocks",
                   help="what plain-bucketed-compiled compiles: every layer's per-token blocks (the modules the "
                        "padding-free forward calls too) or the whole Hugging Face encoder forward")
    p.add_argument("--compile-limit", type=float, default=900.0,
                   help="seconds of compile + warm-up after which plain-bucketed-compiled is recorded as too slow")
    p.add_argument("--results", default=None,
                   help=f"markdown file for the results (default {RESULTS.relative_to(ROOT)}; with --smoke a "
                        "temporary file, so a smoke run never overwrites the measured one)")
    p.add_argument("--profile", action="store_true",
                   help="only profile the plain bucketed loop, fp32 vs bf16 autocast (no Ray; nothing written)")
    p.add_argument("--profile-steps", type=int, default=4)
    p.add_argument("--profile-padded", action="store_true", help="profile Hugging Face's padded forward instead")
    p.add_argument("--profile-top", type=int, default=15, help="ops listed per precision")
    argv = sys.argv[1:] if argv is None else list(argv)
    a = p.parse_args(argv)
    chosen = [name.strip() for name in a.loops.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(LOOPS))
    if unknown or not chosen:
        p.error(f"--loops: unknown loop(s) {unknown}; valid: {', '.join(LOOPS)}")
    cfg = (smoke() if a.smoke else MTLConfig()).replace(batch_size=32 if not a.smoke else 8)
    if a.plain_encoder:
        cfg = cfg.replace(**PLAIN_ENCODER)
    if a.profile:       # a few thousand rows are batches enough; no Ray, nothing written
        profile(cfg.replace(max_rows=cfg.data.max_rows or 3000), 2 if a.smoke else a.profile_steps,
                a.profile_padded, a.profile_top, lambda line: print(line, flush=True))
        return
    rounds, steps = (1, 6) if a.smoke else (a.rounds, a.steps)    # smoke: the code path, not a number
    results = Path(a.results) if a.results else (
        Path(tempfile.gettempdir()) / "raymtl-speed-smoke.md" if a.smoke else RESULTS)
    started, lines = report.now(), []

    def emit(line: str = "") -> None:        # printed, and kept for the results file
        print(line, flush=True)
        lines.append(line)

    import ray

    from raymtl.data.streams import configure_ray_data
    from raymtl.stages.multitask import prepare_data

    configure_ray_data()
    t0 = time.perf_counter()
    fresh = not ray.is_initialized()        # the --smoke test runs inside an existing cluster
    if fresh:
        ray.init(num_cpus=2, dashboard_host="127.0.0.1")
    ray_start = time.perf_counter() - t0
    t0 = time.perf_counter()
    datasets, sizes = prepare_data(cfg, verbose=False)
    tokenize_s = time.perf_counter() - t0
    total_rows = sum(ds.count() for ds in datasets.values())

    runners = loop_runners(cfg, datasets, steps, a.compile_scope, a.compile_limit)
    loops = {name: runners[name] for name in LOOPS if name in chosen}
    driver = os.getpid()
    in_driver = lambda pid, name: pid == driver                                  # noqa: E731
    in_worker = lambda pid, name: name.startswith("ray::RayTrainWorker")         # noqa: E731
    trainer = {name: in_driver if name.startswith("plain") else in_worker for name in loops}
    busy = 0.75 * cfg.scale.cpus_per_worker          # "training": the loop's process uses most of its cores
    runs = {name: [] for name in loops}
    emit("```")
    for r in range(rounds):
        for name, loop in loops.items():
            with CpuSampler(period=0.5 if a.smoke else 2.0) as sampler:
                try:
                    result = loop()
                except Exception as e:            # noqa: BLE001 -- a failed compile is a result, not a crash
                    if name != "plain-bucketed-compiled":
                        raise
                    result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
            runs[name].append({**result, "others": sampler.others(trainer[name], busy)})
        emit(f"[bench] round {r + 1}/{rounds}: " + ", ".join(
            f"{k} {v[-1]['tokens_per_s']:.0f} tok/s" if "tokens_per_s" in v[-1] else f"{k} failed"
            for k, v in runs.items()))
    emit("```")

    def ok(name):                           # the rounds in which a loop ran to the end
        return [x for x in runs.get(name, []) if "tokens_per_s" in x]

    def med(name, key):
        return statistics.median(x[key] for x in ok(name))

    def ratios(a, b):                       # a ÷ b in useful tokens/s, round by round
        return [x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(runs.get(a, []), runs.get(b, []))
                if "tokens_per_s" in x and "tokens_per_s" in y]

    def ratio(a, b):
        r = ratios(a, b)
        if not r:
            return "–"
        return "1.00" if a == b else f"{statistics.median(r):.2f} [{min(r):.2f}–{max(r):.2f}]"

    emit(f"\nencoder={cfg.model.encoder} batch={cfg.train.batch_size} rows/task/step, "
         f"{len(cfg.data.tasks)} tasks, {steps} timed steps x {rounds} interleaved rounds; "
         f"each row's precision in its column\n")

    def others(name):
        shares = [x["others"]["machine"] for x in ok(name) if x["others"]]
        return f"{100 * statistics.median(shares):.1f} %" if shares else "n/a"

    emit(f"| loop | precision | s/step | examples/s | useful tokens/s | this ÷ {BASELINE} (fp32) "
         "(tokens/s, median [min–max]) | raymtl ÷ this | other processes' CPU while it trained "
         "(share of the machine) |")
    emit("|---|---|---|---|---|---|---|---|")
    for name in runs:
        if not ok(name):
            emit(f"| {name} | {LOOPS[name]} | failed: {runs[name][-1]['error']} | | | | | |")
            continue
        emit(f"| {name} | {LOOPS[name]} | {med(name, 's_per_step'):.2f} | {med(name, 'examples_per_s'):.1f} | "
             f"{med(name, 'tokens_per_s'):.0f} | {ratio(name, BASELINE)} | {ratio('raymtl', name)} "
             f"| {others(name)} |")

    emit("")
    twins = [f"{n} ÷ {t} {ratio(n, t)}" for n, t in TWINS.items() if ratios(n, t)]
    if twins:
        emit("Speed-up over the same loop in fp32 (useful tokens/s, median [min–max]): " + "; ".join(twins))
    if ok("raymtl-default-bf16") and ratios("raymtl-default-bf16", BASELINE):
        tok = med("raymtl-default-bf16", "tokens_per_s")
        rat = statistics.median(ratios("raymtl-default-bf16", BASELINE))
        met = tok >= TARGET_TOKENS and rat >= TARGET_RATIO
        emit(f"\nIssue 27 target, the default loop in bf16 at >= {TARGET_TOKENS:,} useful tokens/s and >= "
             f"{TARGET_RATIO}x the fp32 default loop of the same run: {tok:,.0f} tokens/s, {rat:.2f}x: "
             f"{'met' if met else 'not met'}")
    if "plain-bucketed-compiled" in runs:
        done = ok("plain-bucketed-compiled")
        failed = [x["error"] for x in runs["plain-bucketed-compiled"] if "error" in x]
        if done:
            emit(f"\ntorch.compile (plain-bucketed-compiled, scope '{a.compile_scope}'): compile + warm-up "
                 f"{med('plain-bucketed-compiled', 'warmup_s'):.0f} s per round over "
                 f"{Progress.warmup + COMPILE_WARMUP} untimed steps, of which ≈"
                 f"{med('plain-bucketed-compiled', 'compile_s'):.0f} s beyond the steps' own time (median); "
                 f"{med('plain-bucketed-compiled', 'graphs'):.0f} graphs compiled, "
                 f"{max(x['timed_recompiles'] for x in done)} more during the timed steps; "
                 f"compiled ÷ eager (plain-bucketed): {ratio('plain-bucketed-compiled', 'plain-bucketed')}")
        if failed:
            emit(f"\ntorch.compile failed or was too slow in {len(failed)} of {rounds} rounds: {failed[0]}")

    raymtl_rows = [n for n in ("raymtl", BASELINE, *runs) if n.startswith("raymtl") and ok(n)]
    if raymtl_rows:
        ref = raymtl_rows[0]
        by_name = defaultdict(list)
        for x in ok(ref):
            for k, v in (x["others"] or {}).get("by_name", {}).items():
                by_name[k].append(v)
        if by_name:
            top = sorted(((statistics.median(v + [0.0] * (len(ok(ref)) - len(v))), k) for k, v in by_name.items()),
                         reverse=True)
            emit(f"\nOther processes during {ref}'s training, % of one core (median over rounds; "
                 f"{os.cpu_count()} cores): " + ", ".join(f"{k} {100 * c:.1f}" for c, k in top[:12]))
    start = f"{ray_start:.1f} s" if fresh else "n/a (Ray was already running)"
    fit_wall = (f"; TorchTrainer.fit wall incl. worker start, {steps} steps, one validation: "
                f"{med(raymtl_rows[0], 'fit_wall_s'):.1f} s ({raymtl_rows[0]})" if raymtl_rows else "")
    emit(f"\nRay start-up (ray.init): {start}{fit_wall}")
    consumer = raymtl_rows[0] if raymtl_rows else next((n for n in runs if ok(n)), None)
    consume = f"; training consumes {med(consumer, 'examples_per_s'):.1f} rows/s ({consumer}, " \
              f"{total_rows / tokenize_s / med(consumer, 'examples_per_s'):.0f}x headroom)" if consumer else ""
    emit(f"\nRay Data read+validate+tokenize: {total_rows} rows in {tokenize_s:.1f} s = "
         f"{total_rows / tokenize_s:.0f} rows/s{consume}")
    report.write("speed", "Training-loop speed", "bench/speed.py", argv, started, lines, path=results)
    print(f"\n[bench] wrote {results}", flush=True)


if __name__ == "__main__":
    main()
