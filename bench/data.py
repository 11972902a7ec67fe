"""Ray Data at scale (issue 28): preparing a Wiki-103-sized pre-training corpus, and how long
training waits for its data stream.

    .venv/bin/python bench/data.py                  # 10, 100 and 500 MB corpora; default run 2 x 2 x 30 steps
    .venv/bin/python bench/data.py --sizes 10,100   # smaller corpora only
    .venv/bin/python bench/data.py --smoke          # 0.5 and 2 MB, the tiny model, 6 steps; writes nothing (~2.5 min)

(Each run records its wall time with its table.)

Corpora: the WikiText-2 files (``<data_dir>/wikitext-2/{valid,test}.txt``) repeated, the order
of their lines (paragraphs and headings, each followed by WikiText's blank line) shuffled with
a new seed per repetition, until ``--sizes`` MB (10^6 bytes) of text; written once under
``--work`` and reused.

Prepare: one fresh child process per size (so its ``ru_maxrss`` is that size's driver peak)
joins the Ray instance running on this machine or starts one (``ensure_ray(num_cpus=2)``, as
every raymtl job does) and calls ``prepare_shards(cfg, tokenizer, force=True)`` on the
pre-training config (``PretrainJobConfig``, ``pretrain_smoke()`` with ``--smoke``) with the
corpus as its only Wiki file, the default NLI files (``--no-nli``, the default with
``--smoke``: none, supervised SimCSE off) and the STS split. A thread polls the object store
meanwhile.

Training: one child process trains the default multi-task run (``MTLConfig()``, what
``python jobs/mtl.py`` trains; ``smoke()`` with ``--smoke``) for ``--train-steps`` steps, twice
per round: streamed (the datasets as ``stage.prepare`` returns them) and in memory (each
``.materialize()``d before ``build_trainer``), alternating which goes first; then the
pre-training stage streamed from the largest corpus. A multi-task run validates half-way and
at the end, so its history (``metrics_history.json``) has two windows: the first half (the
run's start-up: Ray Data's first reads, worker processes starting) and the second (its steady
state). From them: ``s_per_step`` and ``data_wait_fraction`` per window and for the whole run
(weighted by the timed steps; the 3 warm-up steps left out).

The table is printed and written, with the date, the command and the machine, to
``--results`` (default ``docs/results/data.md``; ``--smoke`` writes nothing unless given
``--results``).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))    # bench/report.py, also when loaded by path
import report  # noqa: E402

TAG = "[bench-data] "                   # a child's result line: TAG + JSON
WIKI = ("wikitext-2/valid.txt", "wikitext-2/test.txt")
TARGET_RSS, TARGET_WAIT, TARGET_RATIO = 0.10, 0.02, 1.03


# ------------------------------------------------------------------------------ corpora
def build_corpus(data_dir: str, mb: float, seed: int, out: Path) -> tuple[Path, bool]:
    """WikiText-2's lines repeated and shuffled to ``mb`` MB of text; (path, built now)."""
    path = out / f"wikitext2-x-{mb:g}MB-seed{seed}.txt"
    if path.is_file():
        return path, False
    lines = [line.strip() for f in WIKI for line in Path(data_dir, f).read_text(encoding="utf-8").splitlines()
             if line.strip()]
    rng, target, written = random.Random(seed), int(mb * 1e6), 0
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        while written < target:
            rng.shuffle(lines)
            for line in lines:
                text = f" {line} \n \n"                          # WikiText: a line, then a blank line
                f.write(text)
                written += len(text.encode())
                if written >= target:
                    break
    tmp.rename(path)
    return path, True


# ------------------------------------------------------------------------------ measuring
class StorePeak(threading.Thread):
    """Polls the raylets' object store stats (what ``ray memory --stats-only`` prints): the
    peak of the bytes held in the object store (shared memory plus its file-system fallback),
    summed over the cluster's nodes, and the bytes spilled to disk meanwhile."""

    def __init__(self, period: float = 0.2):
        super().__init__(daemon=True)
        self.period, self.done = period, threading.Event()
        self.peak = self.first = self.spilled = self.capacity = 0
        self.error = ""

    def run(self) -> None:
        import ray
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address
        try:
            state = get_state_from_address(ray.get_runtime_context().gcs_address)
            spilled0 = None
            while True:
                stop = self.done.is_set()                # one last poll after stop
                s = get_memory_info_reply(state, timeout_seconds=30).store_stats
                used = s.object_store_bytes_used + s.object_store_bytes_fallback
                if spilled0 is None:
                    spilled0, self.first = s.spilled_bytes_total, used
                self.peak, self.capacity = max(self.peak, used), s.object_store_bytes_avail
                self.spilled = s.spilled_bytes_total - spilled0
                if stop:
                    return
                self.done.wait(self.period)
        except Exception as e:                           # noqa: BLE001 -- a missing number, not a failed bench
            self.error = f"{type(e).__name__}: {e}"[:200]

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.join(timeout=60)

    def result(self) -> dict:
        return {"store_peak": self.peak, "store_first": self.first, "store_spilled": self.spilled,
                "store_capacity": self.capacity, "store_error": self.error}


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def emit(result: dict) -> None:
    print(TAG + json.dumps(result), flush=True)


def join_ray() -> bool:
    """``ensure_ray`` as every raymtl job calls it: join the instance running on this machine,
    else start one (2 CPUs). Tells the parent where that instance logs; True if it joined."""
    import ray
    from ray._private.services import find_gcs_addresses

    from raymtl.train.trainer import ensure_ray
    joined = bool(find_gcs_addresses())
    ensure_ray(num_cpus=2, verbose=False)
    node = getattr(ray._private.worker, "_global_node", None)
    emit({"session_dir": node.get_session_dir_path() if node else ""})
    return joined


def pending_demands(session_dir: str) -> str:
    """The last 'Pending Demands' the autoscaler logged (why a run waits forever), or ''."""
    log = Path(session_dir, "logs", "monitor.log")
    text = log.read_text(errors="replace") if session_dir and log.is_file() else ""
    demands = []
    for line in text.rsplit("Pending Demands:", 1)[-1].splitlines()[1:] if "Pending Demands:" in text else []:
        if not line.startswith(" "):               # the block's lines are indented
            break
        demands.append(line.strip())
    return "; ".join(d for d in demands if d != "(no resource demands)")


def say(msg: str) -> None:
    """A child's progress line (the parent shows it on stderr)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pretrain_cfg(a, corpus: Path):
    from raymtl.stages.pretrain import PretrainJobConfig, pretrain_smoke
    cfg = pretrain_smoke() if a.smoke else PretrainJobConfig()
    nli = {} if a.nli else {"nli_files": (), "simcse_sup_weight": 0.0}
    return cfg.replace(wiki_files=(str(corpus),), max_lines=0, data_dir=a.data_dir,
                       cache_dir=str(Path(a.work) / "shards" / corpus.stem), **nli)


# ------------------------------------------------------------------------------ the children
def child_prepare(a, corpus: Path) -> None:
    import ray

    from raymtl.data.corpus import prepare_shards
    from raymtl.models.encoder import tokenizer_source
    cfg = pretrain_cfg(a, corpus)
    shutil.rmtree(Path(a.work) / "shards" / corpus.stem, ignore_errors=True)    # the disk holds one cache per size
    joined = join_ray()
    try:
        inputs = [Path(f) if Path(f).is_absolute() else Path(a.data_dir, f)
                  for f in (*cfg.pretrain.wiki_files, *cfg.pretrain.nli_files, "sts/train.csv")]
        rss0 = rss_now()
        say(f"preparing {corpus.name}")
        with StorePeak() as store:
            t0 = time.perf_counter()
            shards = prepare_shards(cfg, tokenizer_source(cfg.model.encoder), force=True)
            wall = time.perf_counter() - t0
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        lazy = type(shards.dataset("mlm")).__name__ != "MaterializedDataset"
        emit({"corpus_bytes": corpus.stat().st_size, "input_bytes": sum(p.stat().st_size for p in inputs),
              "rows": sum(shards.counts.values()), "counts": shards.counts,
              "tokenized": getattr(shards, "tokenized", None),
              "wall_s": wall, "shard_bytes": sum(p.stat().st_size for p in Path(shards.path).rglob("*") if p.is_file()),
              "rss_start": rss0, "rss_peak": peak_rss, "joined": joined, "lazy_dataset": lazy, **store.result()})
    finally:
        ray.shutdown()


def train_run(cfg, stage, in_memory: bool) -> dict:
    from raymtl.train.loop import HISTORY
    from raymtl.train.trainer import build_trainer, run_dir_of
    shutil.rmtree(run_dir_of(cfg), ignore_errors=True)                  # a fresh run, never a resumed one
    say(f"{cfg.run.name}: preparing the data")
    t0 = time.perf_counter()
    datasets, sizes = stage.prepare(cfg, verbose=False)
    if in_memory:                                                       # today's: in the object store before fit
        datasets = {k: ds.materialize() for k, ds in datasets.items()}
    prepare_s = time.perf_counter() - t0
    say(f"{cfg.run.name}: data ready in {prepare_s:.1f} s; training {cfg.train.steps} steps")
    with StorePeak() as store:
        t0 = time.perf_counter()
        result = build_trainer(cfg, datasets, sizes, stage=stage).fit()
        fit_s = time.perf_counter() - t0
    say(f"{cfg.run.name}: trained in {fit_s:.1f} s")
    return {"prepare_s": prepare_s, "fit_s": fit_s, "steps": cfg.train.steps, **store.result(),
            **step_windows(Path(result.checkpoint.path) / HISTORY)}


def step_windows(history: Path) -> dict:
    """s/step and data wait per validation window of a run (its checkpoint's history), and for
    the whole run (weighted by the timed steps: each window's, the first's minus the warm-up)."""
    from raymtl.train.loop import Progress
    reports, out, start = json.loads(history.read_text()), {}, 0
    timed = []
    for i, m in enumerate(reports):
        n = max(0, m["step"] - start - (Progress.warmup if i == 0 else 0))
        timed.append((n, m["s_per_step"], m["data_wait_fraction"]))
        out[f"s_per_step_{i}"], start = m["s_per_step"], m["step"]
    total = sum(n for n, _, _ in timed)
    out["s_per_step"] = sum(n * s for n, s, _ in timed) / total if total else timed[-1][1]
    out["data_wait_fraction"] = (sum(n * s * w for n, s, w in timed) / sum(n * s for n, s, _ in timed)
                                 if total else timed[-1][2])
    return out


def child_train(a, corpus: Path | None) -> None:
    import ray

    from raymtl.config import MTLConfig, smoke
    from raymtl.stages.multitask import MTLStage
    from raymtl.stages.pretrain import PretrainStage
    join_ray()
    runs = str(Path(a.work) / "runs")
    try:
        mtl = smoke() if a.smoke else MTLConfig()
        # validated half-way too: the first window holds the run's start-up, the second its steady state
        mtl = mtl.replace(steps=a.train_steps, eval_every=a.train_steps // 2, log_every=a.train_steps, output=runs,
                          data_dir=a.data_dir, cache_dir=str(Path(a.work) / "shards" / "mtl"))
        for r in range(a.rounds):
            for mode in ("streamed", "in memory")[::1 if r % 2 == 0 else -1]:
                name = f"mtl-{mode.replace(' ', '-')}-r{r}"
                emit({"run": "mtl", "mode": mode, "round": r,
                      **train_run(mtl.replace(name=name), MTLStage, mode == "in memory")})
        if corpus is not None:
            pre = pretrain_cfg(a, corpus).replace(steps=a.pretrain_steps, eval_every=a.pretrain_steps,
                                                  log_every=a.pretrain_steps, output=runs, name="pretrain")
            emit({"run": "pretrain", "mode": "streamed", "round": 0, "corpus_bytes": corpus.stat().st_size,
                  **train_run(pre, PretrainStage, False)})
    finally:
        ray.shutdown()


def run_child(a, kind: str, corpus: Path | None) -> tuple[list[dict], str]:
    """Run one child (``--child kind``); its result lines, and an error ('' if none; a run that
    waits forever for resources times out naming Ray's pending demands). Its other output goes
    to stderr, indented."""
    timeout = a.timeout or (300.0 if a.smoke else 3 * 3600.0 if kind == "prepare" else 3600.0)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--work", a.work, "--data-dir",
           a.data_dir, "--train-steps", str(a.train_steps), "--pretrain-steps", str(a.pretrain_steps),
           "--rounds", str(a.rounds), *(["--smoke"] if a.smoke else []), "--nli" if a.nli else "--no-nli",
           *(["--corpus", str(corpus)] if corpus else [])]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    results, tail, error, session = [], collections.deque(maxlen=40), "", {}

    def pump():
        for line in proc.stdout:
            if line.startswith(TAG):
                result = json.loads(line[len(TAG):])
                if "session_dir" in result:
                    session.update(result)
                else:
                    results.append(result)
            else:
                tail.append(line.rstrip())
                print("    " + line.rstrip(), file=sys.stderr, flush=True)
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        waits = pending_demands(session.get("session_dir", ""))
        error = f"timed out after {timeout:.0f} s" + (f" (Ray's pending demands: {waits})" if waits else "")
        proc.send_signal(signal.SIGINT)                 # its finally: ray.shutdown()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    reader.join(timeout=30)
    if proc.returncode and not error:
        last = next((t.strip() for t in reversed(tail) if re.match(r"\s*[\w.]*(Error|Exception)\b", t)),
                    next((t for t in reversed(tail) if t.strip()), ""))
        error = f"exit {proc.returncode}: {last[:300]}"
    return results, error


# ------------------------------------------------------------------------------ the tables
def mb(n: float) -> str:
    n /= 1e6
    return f"{n:,.2f} MB" if n < 10 else f"{n:,.0f} MB"


def pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f} %"


def prepare_table(rows: list[tuple[float, dict, str]]) -> list[str]:
    out = ["| Wiki corpus | input read | rows written | prepare wall | rows/s | MB/s | shards on disk "
           "| driver RSS: start → peak | object store peak (spilled) |", "|---|---|---|---|---|---|---|---|---|"]
    for size, r, err in rows:
        if err:
            out.append(f"| {size:g} MB | failed: {err} | | | | | | | |")
            continue
        joined = "*" if r["joined"] else ""
        store = "n/a" if r["store_error"] else f"{mb(r['store_peak'])}{joined} ({mb(r['store_spilled'])})"
        out.append(f"| {size:g} MB | {mb(r['input_bytes'])} | {r['rows']:,} | {r['wall_s']:.1f} s "
                   f"| {r['rows'] / r['wall_s']:,.0f} | {r['input_bytes'] / 1e6 / r['wall_s']:.2f} "
                   f"| {mb(r['shard_bytes'])} | {mb(r['rss_start'])} → {mb(r['rss_peak'])} | {store} |")
    return out


def median(runs: list[dict], key: str):
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def train_table(runs: list[dict], ratio) -> list[str]:
    out = ["| run | data | rounds | s/step | first half, second half | data wait (share of step time) "
           "| streamed ÷ in memory (s/step): run, first half, second half | fit wall | object store peak |",
           "|---|---|---|---|---|---|---|---|---|"]
    groups = {}
    for r in runs:
        groups.setdefault((r["run"], r["mode"]), []).append(r)
    for (run, mode), rs in groups.items():
        what = ("multi-task, default run" if run == "mtl" else f"pre-training, {mb(rs[0]['corpus_bytes'])} corpus")
        data = "in memory (materialized before fit)" if mode == "in memory" else "streamed"
        s = median(rs, "s_per_step")
        halves = ", ".join(f"{h:.3f}" for h in (median(rs, "s_per_step_0"), median(rs, "s_per_step_1"))
                           if h is not None and "s_per_step_1" in rs[0])
        ratios = [step_ratio(runs, k) for k in ("s_per_step", "s_per_step_0", "s_per_step_1")]
        out.append(f"| {what} | {data} | {len(rs)} | {'n/a' if s is None else f'{s:.3f}'} | {halves} "
                   f"| {pct(median(rs, 'data_wait_fraction'))} "
                   f"| {', '.join(f'{x:.3f}' for x in ratios if x) if run == 'mtl' and mode == 'streamed' else ''} "
                   f"| {median(rs, 'fit_s'):.0f} s | {mb(max(r['store_peak'] for r in rs))} |")
    return out


def verdict(ok) -> str:
    return "not measured" if ok is None else ("met" if ok else "NOT met")


def targets(prep: list[tuple[float, dict, str]], runs: list[dict], ratio) -> list[str]:
    done = [(s, r) for s, r, err in prep if not err]
    lines = []
    if len(done) >= 2:
        (s0, r0), (s1, r1) = done[0], done[-1]
        growth = r1["rss_peak"] / r0["rss_peak"] - 1
        lines.append(f"- the driver's peak RSS does not grow with the corpus (within {TARGET_RSS:.0%} from "
                     f"{s0:g} to {s1:g} MB): {mb(r0['rss_peak'])} → {mb(r1['rss_peak'])}, {growth:+.1%}: "
                     f"{verdict(growth <= TARGET_RSS)}")
    else:
        lines.append("- the driver's peak RSS does not grow with the corpus: not measured (fewer than 2 sizes "
                     "prepared)")
    streamed = [r for r in runs if r["mode"] == "streamed"]
    waits = [r["data_wait_fraction"] for r in streamed if r.get("data_wait_fraction") is not None]
    worst = max(waits) if waits else None
    lines.append(f"- training waits for data less than {TARGET_WAIT:.0%} of step time (every streamed run, every "
                 f"round): worst {pct(worst)}: {verdict(None if worst is None else worst < TARGET_WAIT)}")
    lines.append(f"- streamed steps within {TARGET_RATIO - 1:.0%} of in-memory steps on the default run: "
                 f"{'n/a' if ratio is None else f'{ratio:.3f}'}: "
                 f"{verdict(None if ratio is None else ratio <= TARGET_RATIO)}")
    return lines


def step_ratio(runs: list[dict], key: str = "s_per_step"):
    """Median over rounds of streamed ÷ in-memory s/step (``key``: the run's, or a window's) on
    the default run."""
    by = {(r["round"], r["mode"]): r.get(key) for r in runs if r["run"] == "mtl"}
    ratios = [by[(k, "streamed")] / by[(k, "in memory")] for k in {k for k, _ in by}
              if by.get((k, "streamed")) and by.get((k, "in memory"))]
    return statistics.median(ratios) if ratios else None


# ------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    from raymtl.config import DEFAULT_DATA_DIR
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="0.5 and 2 MB corpora, the tiny model, 6 steps per run")
    p.add_argument("--sizes", default=None,
                   help="comma-separated corpus sizes in MB (default 10,100,500; --smoke 0.5,2)")
    p.add_argument("--work", default=None, help="corpora, shards and runs (default /tmp/raymtl-bench-data, "
                   "--smoke /tmp/raymtl-bench-data-smoke)")
    p.add_argument("--data-dir", default=os.environ.get("RAYMTL_DATA_DIR", DEFAULT_DATA_DIR))
    p.add_argument("--seed", type=int, default=0, help="seed of the corpora's shuffles")
    p.add_argument("--nli", action=argparse.BooleanOptionalAction, default=None,
                   help="with the default NLI files (supervised SimCSE); --no-nli: without (default: with; "
                   "--smoke: without)")
    p.add_argument("--train-steps", type=int, default=None, help="steps per multi-task run (default 30; --smoke 6)")
    p.add_argument("--pretrain-steps", type=int, default=None, help="pre-training steps (default 30; --smoke 6)")
    p.add_argument("--rounds", type=int, default=None, help="streamed + in-memory pairs (default 2; --smoke 1)")
    p.add_argument("--skip-training", action="store_true", help="prepare only")
    p.add_argument("--timeout", type=float, default=None, help="seconds per child process (default: 3 h per "
                   "prepare, 1 h for the training; --smoke 300)")
    p.add_argument("--results", default=None, help="markdown file for the table (default docs/results/data.md; "
                   "--smoke: none)")
    p.add_argument("--child", choices=("prepare", "train"), help=argparse.SUPPRESS)
    p.add_argument("--corpus", default=None, help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else list(argv)
    a = p.parse_args(argv)
    a.work = a.work or ("/tmp/raymtl-bench-data-smoke" if a.smoke else "/tmp/raymtl-bench-data")
    a.train_steps = a.train_steps or (6 if a.smoke else 30)
    a.pretrain_steps = a.pretrain_steps or (6 if a.smoke else 30)
    a.rounds = a.rounds or (1 if a.smoke else 2)
    a.nli = (not a.smoke) if a.nli is None else a.nli
    if min(a.train_steps, a.pretrain_steps) < 4:
        p.error("--train-steps and --pretrain-steps must be at least 4 (3 warm-up steps are not measured)")
    if a.child:
        corpus = Path(a.corpus) if a.corpus else None
        child_prepare(a, corpus) if a.child == "prepare" else child_train(a, corpus)
        return 0
    try:
        sizes = sorted(float(s) for s in (a.sizes or ("0.5,2" if a.smoke else "10,100,500")).split(","))
    except ValueError:
        p.error(f"--sizes {a.sizes!r}: comma-separated numbers of MB")
    if not sizes or min(sizes) <= 0:
        p.error("--sizes must be positive")
    started, t_start = report.now(), time.perf_counter()

    prep, corpus = [], None
    for size in sizes:
        t0 = time.perf_counter()
        path, built = build_corpus(a.data_dir, size, a.seed, Path(a.work) / "corpora")
        how = f"built in {time.perf_counter() - t0:.1f} s" if built else "reused"
        print(f"[bench] corpus {size:g} MB: {path} ({how})", flush=True)
        t0 = time.perf_counter()
        results, err = run_child(a, "prepare", path)
        if results and not err:
            corpus = path
        prep.append((size, results[0] if results else {}, err or ("" if results else "no result")))
        done = err or f"{results[0]['rows']:,} rows in {results[0]['wall_s']:.1f} s"
        print(f"[bench] prepared {size:g} MB: {done} (child process {time.perf_counter() - t0:.0f} s)", flush=True)
    runs, train_err = [], ""
    if not a.skip_training:
        t0 = time.perf_counter()
        runs, train_err = run_child(a, "train", corpus)
        print(f"[bench] training child process: {time.perf_counter() - t0:.0f} s", flush=True)
        for r in runs:
            step = "n/a" if r["s_per_step"] is None else f"{r['s_per_step']:.3f}"
            print(f"[bench] {r['run']} {r['mode']} round {r['round']}: s/step {step}, "
                  f"data wait {pct(r['data_wait_fraction'])}", flush=True)

    ratio = step_ratio(runs)
    p0 = next((r for _, r, err in prep if not err), {})
    lines = [f"Corpora: WikiText-2 (valid + test) repeated and shuffled to {', '.join(f'{s:g}' for s in sizes)} MB "
             f"of text; prepared by `prepare_shards(..., force=True)` on the {'smoke ' if a.smoke else ''}pre-training "
             f"config ({'with' if a.nli else 'without'} the NLI files), one fresh driver process per size.", "",
             *prepare_table(prep), "",
             f"Input read: every file prepare reads (the corpus, {'the NLI files, ' if a.nli else ''}sts/train.csv); "
             "rows written: the rows of every kind of shard; rows/s and MB/s: those over the prepare's wall time "
             "(Ray Data start-up included); shards on disk: the Parquet files' bytes; driver RSS: the prepare "
             "process's resident memory after its imports and Ray start-up, and its peak (`ru_maxrss`, the whole "
             "process life); "
             "object store peak: the largest `object_store_bytes_used` (+ file-system fallback) the raylets "
             "reported, polled every 0.2 s, and the bytes spilled meanwhile"
             + (" (* the prepare joined a Ray instance already running: its objects count too)"
                if any(r.get("joined") for _, r, _ in prep) else "") + "."
             + (f" `Shards.dataset()` returns a {'lazy (streaming)' if p0['lazy_dataset'] else 'materialized'} "
                "dataset." if p0 else ""), ""]
    if not a.skip_training:
        lines += [f"Training: {a.train_steps} steps per multi-task run ({'smoke config' if a.smoke else 'MTLConfig()'}"
                  f", validated half-way and at the end), {a.rounds} round(s) of streamed and in-memory, alternating which "
                  f"runs first; {a.pretrain_steps} pre-training steps streamed from the largest corpus.", "",
                  *train_table(runs, ratio), ""]
        if train_err:
            lines += [f"Training child failed: {train_err}", ""]
        lines += ["s/step: training time per step after the 3 warm-up steps (validation excluded), median over "
                  "rounds, for the whole run and for each half (the multi-task runs); data wait: of that time, the share spent in `next(stream)` waiting for the data stream "
                  "(`data_wait_fraction`); fit wall: `TorchTrainer.fit` including worker start-up and validation; "
                  "object store peak: as above, while fit ran.", ""]
    met = targets(prep, runs, ratio)
    lines += ["Targets of issue 28:", "", *(met[:1] if a.skip_training else met), "",
              f"Wall time of the bench: {(time.perf_counter() - t_start) / 60:.1f} min."]
    print("\n" + "\n".join(lines), flush=True)
    results = a.results or (None if a.smoke else "")
    if results is not None:
        path = report.write("data", "Ray Data at scale: prepare and stream (bench/data.py)", "bench/data.py", argv,
                            started, lines, Path(results) if results else None)
        print(f"\n[bench] written to {path}", flush=True)
    failed = [e for _, _, e in prep if e] + ([train_err] if train_err else [])
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
