"""Memory per worker for DeepSpeed ZeRO stages 0-3 with 2 data-parallel workers, measured.

    .venv/bin/python bench/memory.py --encoder bert-base   # BERT-base shape, random init; ~8 GB RAM
    .venv/bin/python bench/memory.py                       # the default encoder (MiniLM, 22.6 M)
    .venv/bin/python bench/memory.py --smoke               # tiny model, stages 0 and 2; ~3 min here

(Each run records its wall time with its table.)

For each stage the script starts the workers itself (processes in one gloo group on
127.0.0.1; no Ray): each builds raymtl's model and raymtl's DeepSpeed engine
(``raymtl.train.engine.initialize``, the config every run gets, with ``--zero-stage``
changed) and trains ``--steps`` steps of the summed loss (``--fusion sum``: ZeRO-3
partitions the gradients that fusion needs) on the same fixed batches of every task.
What ZeRO partitions lives in that engine; the Ray Train loop adds the same runtime to
every stage. Measured per worker (the largest over the workers):

* peak RSS (``ru_maxrss``): everything, transients included;
* training state: the bytes of every live tensor after the last step's backward (weights,
  gradients, AdamW moments, DeepSpeed's flat partitions and buckets; the activations are
  freed by then), each storage counted once;
* of which AdamW state: the optimizer's ``exp_avg`` and ``exp_avg_sq``.

Next to them, the per-worker bytes that the stage keeps in theory (fp32: weights 4 +
gradients 4 + AdamW 8 bytes per parameter; ZeRO-1 partitions the 8, ZeRO-2 also the
gradients' 4, ZeRO-3 all 16), and what each stage saves against stage 0, measured and in
theory. ``--encoder bert-base`` is a BERT-base-shaped encoder (hidden 768, 12 layers, 12
heads, feed-forward 3072; 109 M parameters with the heads) with random weights, written once
to ``OUTPUT/bert-base-random`` with the default encoder's tokenizer (no download): its 16 bytes
per parameter (1.7 GB) are more than half of a worker's peak at stage 0, where MiniLM's are a
fifth.

The table is printed and written, with the date, the command and the machine, to
``--results`` (default ``docs/results/memory.md``, one section per encoder and worker count;
``--smoke`` writes nothing unless given ``--results``).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import random
import resource
import shlex
import sys
import time
from pathlib import Path

import torch

BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
WORDS = "the a film movie is was very not good bad great dull plot actor scene story question how why what".split()


def state_bytes_per_worker(params: int, stage: int, workers: int) -> float:
    """fp32 weights (4 B), gradients (4 B) and AdamW moments (8 B) held by one worker."""
    weights, grads, optim = 4 * params, 4 * params, 8 * params
    if stage >= 1:
        optim /= workers
    if stage >= 2:
        grads /= workers
    if stage >= 3:
        weights /= workers
    return weights + grads + optim


def adam_bytes_per_worker(params: int, stage: int, workers: int) -> float:
    return 8 * params / (workers if stage >= 1 else 1)


def bert_base_encoder(directory: Path) -> str:
    """A BERT-base-shaped encoder with random weights and the default encoder's tokenizer,
    saved once to ``directory`` (a local Hugging Face directory: any raymtl run can use it)."""
    if not (directory / "config.json").is_file():
        from transformers import AutoTokenizer, BertConfig, BertModel

        from raymtl.models.encoder import default_encoder_path
        torch.manual_seed(0)
        BertModel(BertConfig(vocab_size=30522, **BERT_BASE), add_pooling_layer=False).save_pretrained(directory)
        AutoTokenizer.from_pretrained(default_encoder_path()).save_pretrained(directory)
    return str(directory)


# ------------------------------------------------------------------------ one worker
def live_tensor_bytes() -> int:
    """Bytes of every tensor storage reachable from Python (and each tensor's ``.grad``),
    each storage counted once."""
    gc.collect()                                            # not garbage awaiting collection
    sizes: dict[int, int] = {}
    for obj in gc.get_objects():
        if not torch.is_tensor(obj) or obj.layout != torch.strided:
            continue
        grad = obj.grad if obj.is_leaf else None
        for t in (obj, grad) if grad is not None else (obj,):
            storage = t.untyped_storage()
            if storage.data_ptr():
                sizes[storage.data_ptr()] = max(sizes.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(sizes.values())


def optimizer_state_bytes(engine) -> int:
    opt = getattr(engine.optimizer, "optimizer", engine.optimizer)   # ZeRO wraps torch's AdamW
    sizes = {v.untyped_storage().data_ptr(): v.untyped_storage().nbytes()
             for state in opt.state.values() for v in state.values() if torch.is_tensor(v) and v.dim() > 0}
    return sum(sizes.values())


def fixed_batches(cfg, modes: dict[str, str | None], rows: int) -> dict[str, dict[str, torch.Tensor]]:
    """``rows`` rows of every task, sentences of random words at about ``max_length`` tokens,
    labels in the task's range, through the real tokenization (``batch_from_rows``)."""
    from transformers import AutoTokenizer

    from raymtl.data.multitask import batch_from_rows
    from raymtl.models.encoder import tokenizer_source
    from raymtl.tasks import TASKS
    tok = AutoTokenizer.from_pretrained(tokenizer_source(cfg.model.encoder))
    rng = random.Random(0)

    def sentence():
        return " ".join(rng.choice(WORDS) for _ in range(cfg.data.max_length))

    def label(spec):
        return rng.randrange(spec.num_labels) if spec.label_type == "class" else rng.uniform(*spec.label_range)
    out = {}
    for t in cfg.data.tasks:
        spec = TASKS[t]
        out[t] = batch_from_rows(tok, [{"text_a": sentence(), "text_b": sentence() if spec.is_pair else "",
                                        "label": label(spec), "line": i} for i in range(rows)],
                                 modes[t], cfg.data.max_length)
    return out


def worker(rank: int, world: int, port: int, cfg_dict: dict, steps: int, queue) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from raymtl.config import MTLConfig
    from raymtl.models.multitask import MultiTaskModel
    from raymtl.objectives.multitask import task_loss
    from raymtl.train.engine import initialize
    cfg = MTLConfig.from_dict(cfg_dict)
    torch.set_num_threads(max(1, int(cfg.scale.cpus_per_worker)))
    model = MultiTaskModel.from_config(cfg.model, list(cfg.data.tasks), seed=cfg.train.seed)
    batches = fixed_batches(cfg, model.modes, cfg.micro_batch_size())
    engine = initialize(model, cfg)
    for step in range(steps):
        losses = [task_loss(engine.module.heads[t].kind, engine(t, b).float(), b) for t, b in batches.items()]
        engine.backward(sum(losses))
        del losses
        if step == steps - 1:                       # gradients held, AdamW state there since step 1
            state, adam = live_tensor_bytes(), optimizer_state_bytes(engine)
        engine.step()
    queue.put({"rank": rank, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
               "state": state, "adam": adam})
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def measure(cfg, workers: int, steps: int, port: int) -> dict[str, float]:
    """One stage: ``workers`` fresh processes (so each peak RSS is this stage's alone)."""
    import torch.multiprocessing as mp
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(worker, args=(workers, port, cfg.to_dict(), steps, queue), nprocs=workers, join=True)
    rows = [queue.get() for _ in range(workers)]
    for r in sorted(rows, key=lambda r: r["rank"]):
        print(f"ZeRO-{cfg.scale.zero_stage} rank {r['rank']}: peak RSS {mb(r['peak_rss'])}, "
              f"training state {mb(r['state'])}, AdamW state {mb(r['adam'])}", flush=True)
    return {k: max(r[k] for r in rows) for k in ("peak_rss", "state", "adam")}


# ------------------------------------------------------------------------ table and file
def machine() -> str:
    import deepspeed
    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
              if line.startswith("model name")]
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{platform.node()}: {os.cpu_count()} x {models[0] if models else platform.processor()}, "
            f"{mem:.0f} GiB RAM, {platform.system()} {platform.release()}; Python {platform.python_version()}, "
            f"torch {torch.__version__}, DeepSpeed {deepspeed.__version__}")


def mb(n: float) -> str:
    n /= 2**20
    return f"{n:,.1f} MB" if abs(n) < 100 else f"{n:,.0f} MB"


def table(rows: list[tuple[int, dict, float, float]]) -> list[str]:
    """One row per stage; "saved" is against the first stage measured (stage 0 by default)."""
    _, ref, ref_theory, _ = rows[0]
    out = ["| ZeRO | peak RSS / worker | saved | training state / worker, measured | saved "
           "| training state / worker, theory | saved, theory | AdamW state / worker, measured / theory |",
           "|---|---|---|---|---|---|---|---|"]
    for stage, m, theory, adam_theory in rows:
        out.append(f"| {stage} | {mb(m['peak_rss'])} | {mb(ref['peak_rss'] - m['peak_rss'])} "
                   f"| {mb(m['state'])} | {mb(ref['state'] - m['state'])} "
                   f"| {mb(theory)} | {mb(ref_theory - theory)} | {mb(m['adam'])} / {mb(adam_theory)} |")
    return out


def write_section(path: Path, key: str, lines: list[str]) -> None:
    """Replace the ``## key`` section of ``path`` (other encoders' sections stay)."""
    head = ["# Memory per worker, ZeRO stages 0-3 (measured)", "",
            "Written by `bench/memory.py` (its docstring says what each column measures); "
            "one section per encoder and worker count, the latest run of each.", ""]
    sections: dict[str, list[str]] = {}
    if path.is_file():
        current = None
        for line in path.read_text().splitlines():
            if line.startswith("## "):
                current = line[3:]
                sections[current] = []
            elif current is not None:
                sections[current].append(line)
    sections[key] = ["", *lines, ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    body = [line for k, lines_of_k in sections.items() for line in (f"## {k}", *lines_of_k)]
    path.write_text("\n".join(head + body).rstrip() + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model, stages 0 and 2, 2 steps")
    p.add_argument("--encoder", default=None,
                   help="'bert-base' (random weights, BERT-base shape), or any --encoder raymtl takes "
                        "(default: the default encoder; --smoke: tiny-random)")
    p.add_argument("--stages", default=None, help="comma-separated ZeRO stages (default 0,1,2,3; --smoke 0,2)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=None, help="steps per stage (default 3; --smoke 2)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per task per step, all workers")
    p.add_argument("--max-length", type=int, default=32,
                   help="tokens per sentence (about the tasks' longest; activations stay small next to the state)")
    p.add_argument("--output", default="runs/bench-memory", help="where --encoder bert-base is written")
    p.add_argument("--results", default=None, help="markdown file for the table (default "
                   "docs/results/memory.md; --smoke: none)")
    p.add_argument("--port", type=int, default=29581, help="port of the workers' gloo group")
    a = p.parse_args(argv)
    if a.steps is not None and a.steps < 2:
        p.error("--steps must be at least 2 (AdamW allocates its state in the first step)")
    from raymtl.config import MTLConfig, smoke
    from raymtl.models.multitask import MultiTaskModel
    from raymtl.recipes import PLAIN_ENCODER, SUM_LOSS
    stages = [int(s) for s in (a.stages or ("0,2" if a.smoke else "0,1,2,3")).split(",")]
    steps = a.steps or (2 if a.smoke else 3)
    name = a.encoder or ("tiny-random" if a.smoke else "default")
    encoder = bert_base_encoder(Path(a.output) / "bert-base-random") if name == "bert-base" else name
    base = (smoke() if a.smoke else MTLConfig()).replace(
        encoder=encoder, num_workers=a.workers, cpus_per_worker=max(1, (os.cpu_count() or 1) // a.workers),
        batch_size=a.batch_size, max_length=a.max_length, steps=max(steps, 2), **SUM_LOSS, **PLAIN_ENCODER)
    params = sum(q.numel() for q in MultiTaskModel.from_config(base.model, list(base.data.tasks)).parameters())
    rows, start = [], time.perf_counter()
    for stage in stages:
        m = measure(base.replace(zero_stage=stage), a.workers, steps, a.port)
        rows.append((stage, m, state_bytes_per_worker(params, stage, a.workers),
                     adam_bytes_per_worker(params, stage, a.workers)))
    about = (f"{name}: {params / 1e6:.1f} M parameters; {a.workers} workers; fp32; {a.batch_size} rows per task "
             f"per step ({base.micro_batch_size()} per worker) of {a.max_length} tokens; {steps} steps per stage")
    print(f"\n{about}\n")
    print("\n".join(table(rows)))
    results = a.results or (None if a.smoke else "docs/results/memory.md")
    if results:
        args = sys.argv[1:] if argv is None else argv
        command = " ".join([".venv/bin/python", "bench/memory.py", *map(shlex.quote, args)])
        write_section(Path(results), f"{name}, {a.workers} workers", [
            f"{datetime.date.today().isoformat()}, `{command}` ({(time.perf_counter() - start) / 60:.1f} min)", "",
            f"Machine: {machine()}", "",
            f"{about}.", "", *table(rows)])
        print(f"\nwritten to {results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
