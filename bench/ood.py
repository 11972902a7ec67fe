"""Out of domain: checkpoints side by side on related data sets no run trains on by default,
each set scored by the head of the task it relates to (``raymtl evaluate --related``).

    .venv/bin/python bench/ood.py default=runs/mtl/checkpoint_000900 hour=runs/hour/checkpoint_001050
    .venv/bin/python bench/ood.py --sets sick,mrpc NAME=CKPT ...
    .venv/bin/python bench/ood.py --smoke                  # a tiny random checkpoint, 60 rows a set, seconds
    .venv/bin/python bench/ood.py --smoke NAME=CKPT        # those checkpoints on 60 rows a set, nothing written

Sets (``--sets``, default ``sick,mrpc,cfimdb``): SICK relatedness by the STS head (Pearson),
MRPC paraphrases by the Quora head (accuracy), IMDB reviews by the SST head (binary accuracy:
the probability mass on SST's two negative classes against its two positive ones). Next to
them, each checkpoint's own validation score (its ``metrics.json``: ``overall``, or a
single-task checkpoint's task metric; such a checkpoint scores only the sets of its head). Writes
``docs/results/ood.md``.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from raymtl import load
from raymtl.analysis.evaluation import related_score
from raymtl.config import DEFAULT_DATA_DIR
from raymtl.data.related import get_related, read_related

sys.path.insert(0, str(Path(__file__).resolve().parent))    # bench/report.py, also when loaded by path
import report  # noqa: E402

SMOKE_ROWS = 60


def tiny_checkpoint(path: Path, tasks=("sst", "quora", "sts")) -> str:
    """A randomly initialised smoke model with ``tasks``' heads, saved as a checkpoint."""
    import torch
    from transformers import AutoTokenizer

    from raymtl.config import smoke
    from raymtl.models.encoder import tokenizer_source
    from raymtl.models.multitask import MultiTaskModel
    cfg = smoke()
    torch.manual_seed(0)
    model = MultiTaskModel.from_config(cfg.model, list(tasks))
    model.save(path, AutoTokenizer.from_pretrained(tokenizer_source(cfg.model.encoder)),
               extra={"max_length": cfg.data.max_length})
    return str(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="*", metavar="NAME=CKPT", help="a checkpoint directory and its row name")
    p.add_argument("--sets", default="sick,mrpc,cfimdb", help="comma-separated related data sets")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    p.add_argument("--device", default="auto")
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args(argv)
    try:
        sets = [get_related(name) for name in a.sets.split(",") if name]
    except ValueError as e:
        p.error(f"--sets: {e}")
    if not sets:
        p.error("--sets: name at least one related data set")
    named = [c.split("=", 1) for c in a.checkpoints]
    if any(len(c) != 2 or not c[0] for c in named):
        p.error(f"checkpoints are NAME=CKPT, got {a.checkpoints}")
    for name, ckpt in named:
        if not (Path(ckpt) / "raymtl.json").is_file():
            p.error(f"{name}={ckpt}: not a raymtl checkpoint (no raymtl.json)")
    tmp = tempfile.TemporaryDirectory()
    if a.smoke and not named:
        named = [("tiny", tiny_checkpoint(Path(tmp.name) / "tiny"))]
    if not named:
        p.error("give at least one NAME=CKPT (or --smoke)")
    started = report.now()
    rows = {rs.name: read_related(rs.name, a.data_dir, max_rows=SMOKE_ROWS if a.smoke else 0)[0] for rs in sets}
    lines = [f"Related sets read from {a.data_dir}: " + "; ".join(
                 f"{rs.name} ({len(rows[rs.name]):,} rows, by the {rs.target} head: {rs.note})" for rs in sets)
             + ". Validation: the checkpoint's own `metrics.json` (overall; a single-task checkpoint's task "
             "metric, and `-` for the sets of heads it lacks).", "",
             "| checkpoint | " + " | ".join(f"{rs.name} ({rs.target} head)" for rs in sets)
             + " | validation | path |",
             "|---|" + "---|" * len(sets) + "---|---|"]
    for name, ckpt in named:
        t0 = time.perf_counter()
        m = load(ckpt, a.device)
        if not any(rs.target in m.tasks for rs in sets):
            p.error(f"{name}={ckpt} has none of the heads {sorted({rs.target for rs in sets})}")
        scores = [related_score(m.model, m.tokenizer, rs, rows[rs.name], m.max_length) if rs.target in m.tasks
                  else None for rs in sets]                      # a single-task checkpoint: its own head's sets
        metrics = json.loads((Path(ckpt) / "metrics.json").read_text()) if (Path(ckpt) / "metrics.json").is_file() else {}
        val = metrics.get(f"val_{m.tasks[0]}") if len(m.tasks) == 1 else metrics.get("overall")
        cells = ["-" if x is None else f"{x:.4f}" for x in scores]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'-' if val is None else f'{val:.4f}'} | `{ckpt}` |")
        print(f"[bench] {name}: " + " ".join(f"{rs.name}={c}" for rs, c in zip(sets, cells))
              + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    report.publish(lines, "ood", "Out of domain: related sets scored by the target heads (bench/ood.py)",
                   "bench/ood.py", argv, started, a.smoke)
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
