"""Training-loop speed: raymtl's Ray Train + DeepSpeed loop against two plain PyTorch loops.

    .venv/bin/python bench/speed.py             # default encoder, 3 rounds x 40 steps, ~45 min here (35 with --steps 30)
    .venv/bin/python bench/speed.py --smoke     # tiny model, one round, ~1 min

Same model (in train mode: dropout on), optimizer groups, clipping, batches (3 tasks x 32
rows per step, fp32) and data (the same Ray datasets) in all of them; only the machinery differs:

* plain-padded:   a plain loop over Hugging Face's forward, each batch padded to its longest row;
* plain-bucketed: the same plain loop over length-bucketed batches (raymtl's bucketing);
* raymtl-padded:  ``jobs/mtl.py``'s path with Hugging Face's padded forward (``--no-unpad``):
                  TorchTrainer worker + DeepSpeed engine (fused AdamW on CPU, no gradient
                  all-reduce with a single ZeRO-0 worker), on the summed loss (``--fusion
                  sum``), the plain loops' arithmetic: what the machinery alone costs;
* raymtl:         the same with raymtl's default padding-free encoder forward (``raymtl.models.unpad``);
* raymtl-default: the default loop: that, with the default fusion (IMTL-G weights refreshed
                  every 10 steps: three per-task backwards on those steps).

Runs are interleaved round after round; each run's s/step, examples/s and tokens/s are means
over its timed steps; reported are medians over rounds and ratios against the plain
loops measured in the same run, plus Ray start-up time and Ray Data tokenization throughput
against the rate training consumes rows. Useful tokens are the real (non-padding) ones.

Each row also says how much CPU the *other* processes took while that loop trained (sampled
from ``/proc`` every 2 s, over the intervals in which the loop's own process used at least
3/4 of its cores), and the largest of them during raymtl's runs are listed by name: on a
small machine every core Ray's daemons and actors take is a core the training threads lack.
"""
import argparse
import os
import statistics
import tempfile
import threading
import time
from collections import defaultdict

import torch
from raymtl.objectives.multitask import LOSSES

from raymtl.config import PLAIN_ENCODER, SUM_LOSS, MTLConfig, smoke
from raymtl.data.streams import cycle_batches
from raymtl.models.multitask import MultiTaskModel
from raymtl.train.engine import param_groups
from raymtl.train.loop import Progress


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


def plain_loop(cfg: MTLConfig, datasets: dict, steps: int, bucket: int) -> dict:
    torch.manual_seed(cfg.train.seed)
    torch.set_num_threads(int(cfg.scale.cpus_per_worker))
    model = MultiTaskModel.from_config(cfg.model, list(cfg.data.tasks), seed=cfg.train.seed)
    model.train()       # dropout on, as in raymtl (from_pretrained leaves a model in eval mode)
    groups, lrs = param_groups(model, cfg)
    opt = torch.optim.AdamW([{**g, "lr": lr} for g, lr in zip(groups, lrs)])
    streams = {t: cycle_batches(datasets[f"train_{t}"], cfg.train.batch_size, cfg.train.seed, bucket)
               for t in cfg.data.tasks}
    warm, times, tokens = Progress.warmup, [], 0
    for i in range(steps + warm):
        t0 = time.perf_counter()
        losses, n_tok = [], 0
        for t in cfg.data.tasks:
            b = next(streams[t])
            n_tok += int(b["attention_mask"].sum()) + int(b.get("attention_mask_b", b["label"][:0]).sum())
            losses.append(LOSSES[model.heads[t].kind](model(t, b), b["label"]))
        sum(losses).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warm:
            times.append(time.perf_counter() - t0)
            tokens += n_tok
    rows = steps * cfg.train.batch_size * len(cfg.data.tasks)
    return {"s_per_step": sum(times) / steps, "examples_per_s": rows / sum(times),
            "tokens_per_s": tokens / sum(times)}


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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--plain-encoder", "--no-pals", dest="plain_encoder", action="store_true",
                   help="every loop on the plain encoder (the default gives STS PALs and SST its own top "
                        "half of the encoder, in every loop alike)")
    a = p.parse_args(argv)
    cfg = (smoke() if a.smoke else MTLConfig()).replace(batch_size=32 if not a.smoke else 8)
    if a.plain_encoder:
        cfg = cfg.replace(**PLAIN_ENCODER)
    rounds, steps = (1, 6) if a.smoke else (a.rounds, a.steps)    # smoke: the code path, not a number

    import ray

    from raymtl.data.streams import configure_ray_data
    from raymtl.train.trainer import prepare_data
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

    plain = cfg.replace(unpad=False)         # a plain loop runs Hugging Face's padded forward
    loops = {"plain-padded": lambda: plain_loop(plain, datasets, steps, bucket=1),
             "plain-bucketed": lambda: plain_loop(plain, datasets, steps, bucket=cfg.data.bucket_batches),
             "raymtl-padded": lambda: raymtl_loop(plain, steps, **SUM_LOSS),
             "raymtl": lambda: raymtl_loop(cfg, steps, **SUM_LOSS),
             "raymtl-default": lambda: raymtl_loop(cfg, steps)}
    driver = os.getpid()
    in_driver = lambda pid, name: pid == driver                                  # noqa: E731
    in_worker = lambda pid, name: name.startswith("ray::RayTrainWorker")         # noqa: E731
    trainer = {name: in_driver if name.startswith("plain") else in_worker for name in loops}
    busy = 0.75 * cfg.scale.cpus_per_worker          # "training": the loop's process uses most of its cores
    runs = {name: [] for name in loops}
    for r in range(rounds):
        for name, loop in loops.items():
            with CpuSampler(period=0.5 if a.smoke else 2.0) as sampler:
                result = loop()
            runs[name].append({**result, "others": sampler.others(trainer[name], busy)})
        print(f"[bench] round {r + 1}/{rounds}: " + ", ".join(
            f"{k} {v[-1]['tokens_per_s']:.0f} tok/s" for k, v in runs.items()), flush=True)

    def med(name, key):
        return statistics.median(x[key] for x in runs[name])

    print(f"\nencoder={cfg.model.encoder} batch={cfg.train.batch_size} rows/task/step, "
          f"{len(cfg.data.tasks)} tasks, fp32, {steps} timed steps x {rounds} interleaved rounds\n")

    def others(name):
        shares = [x["others"]["machine"] for x in runs[name] if x["others"]]
        return f"{100 * statistics.median(shares):.1f} %" if shares else "n/a"

    def ratio(a, b):                        # a ÷ b in useful tokens/s, round by round
        r = [x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(runs[a], runs[b])]
        return f"{statistics.median(r):.2f} [{min(r):.2f}–{max(r):.2f}]"

    print("| loop | s/step | examples/s | useful tokens/s | raymtl ÷ this (tokens/s, median [min–max]) "
          "| raymtl-default ÷ this | other processes' CPU while it trained (share of the machine) |")
    print("|---|---|---|---|---|---|---|")
    for name in runs:
        print(f"| {name} | {med(name, 's_per_step'):.2f} | {med(name, 'examples_per_s'):.1f} | "
              f"{med(name, 'tokens_per_s'):.0f} | {ratio('raymtl', name)} | {ratio('raymtl-default', name)} "
              f"| {others(name)} |")
    by_name = defaultdict(list)
    for x in runs["raymtl"]:
        for k, v in (x["others"] or {}).get("by_name", {}).items():
            by_name[k].append(v)
    if by_name:
        top = sorted(((statistics.median(v + [0.0] * (rounds - len(v))), k) for k, v in by_name.items()),
                     reverse=True)
        print(f"\nOther processes during raymtl's training, % of one core (median over rounds; "
              f"{os.cpu_count()} cores): " + ", ".join(f"{k} {100 * c:.1f}" for c, k in top[:12]))
    consume = med("raymtl", "examples_per_s")
    start = f"{ray_start:.1f} s" if fresh else "n/a (Ray was already running)"
    print(f"\nRay start-up (ray.init): {start}; TorchTrainer.fit wall incl. worker start, "
          f"{steps} steps, one validation: {med('raymtl', 'fit_wall_s'):.1f} s")
    print(f"Ray Data read+validate+tokenize: {total_rows} rows in {tokenize_s:.1f} s = "
          f"{total_rows / tokenize_s:.0f} rows/s; training consumes {consume:.1f} rows/s "
          f"({total_rows / tokenize_s / consume:.0f}x headroom)")


if __name__ == "__main__":
    main()
