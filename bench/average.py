"""Average checkpoints after the fact and score the average on the run's validation split:
latest weight averaging (Kaddour 2022; checkpoint averaging as in Vaswani et al. 2017) over
one run's checkpoints, or a uniform "model soup" (Wortsman et al. 2022) over runs of one config
with other seeds on the same split; with ``--ensemble`` also the output ensemble of the same
checkpoints (mean log-probabilities, mean similarity), the bound a soup aims at. Measured, and
neither kept in the recipe (docs/quality-log.md, "Averaging the last checkpoints" and "Several
seeds").

    python bench/average.py runs/hour/NAME/checkpoint_002250 runs/hour/NAME/checkpoint_002700 \\
        runs/hour/NAME/checkpoint_003150 --output runs/averaged/last3
    python bench/average.py runs/soup/default-s42/checkpoint_000900 runs/soup/default-s1/checkpoint_000900 \\
        runs/soup/default-s2/checkpoint_000900 --output runs/soup/soup3 --ensemble

The uniform mean of the fp32 weights (encoder, heads, per-task parts); the checkpoints must
hold the same tasks and parts, and for ``--ensemble`` come from one validation split. Prints
each checkpoint's own validation scores (its ``metrics.json``), the average's, as ``raymtl
evaluate`` scores it, and the ensemble's.
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from raymtl.analysis.evaluation import format_table, predict_batches, row_batches
from raymtl.analysis.metrics import overall, task_metric
from raymtl.api import OVERALL_TASKS, load
from raymtl.cli import main as raymtl_main
from raymtl.cli import validation_rows


def average_states(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The uniform average of model states (floating tensors; others from the last state)."""
    return {k: torch.stack([st[k] for st in states]).mean(0) if v.is_floating_point() else v
            for k, v in states[-1].items()}


SPLIT_FIELDS = ("data_dir", "val_fraction", "split_seed", "max_rows")     # what carves a validation split


def ensemble_scores(checkpoints: list[Path], models) -> dict[str, float]:
    """Validation scores of the checkpoints' output ensemble (``models``: ``raymtl.load`` of
    each): per row the mean of the heads' log-probabilities (classifiers; the argmax is the
    prediction) or of their outputs (the similarity head, mapped as ``raymtl predict`` maps
    one), on the split they share."""
    rows = validation_rows(checkpoints[0], list(models[0].model.heads))
    scores = {}
    for t, task_rows in rows.items():
        outs, labels = [], None
        for m in models:
            out, labels, _ = predict_batches(m.model, t, row_batches(m.model, m.tokenizer, t, task_rows, m.max_length),
                                             read=lambda o: o)
            outs.append(torch.from_numpy(out))
        head = models[0].model.heads[t]
        if head.kind == "classifier":
            pred = torch.stack([o.log_softmax(-1) for o in outs]).mean(0).argmax(-1)      # (N,)
        else:
            pred = head.predict(torch.stack(outs).mean(0))
        scores[t] = task_metric(t, pred.numpy(), np.asarray(labels))
    if set(OVERALL_TASKS) <= set(scores):
        scores["overall"] = overall(scores)
    return scores


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="checkpoint directories of one run, or of one config's seeds")
    p.add_argument("--output", required=True, help="new directory for the averaged checkpoint")
    p.add_argument("--ensemble", action="store_true", help="also score the checkpoints' output ensemble")
    a = p.parse_args(argv)
    dirs, out = [Path(c) for c in a.checkpoints], Path(a.output)
    if len(dirs) < 2:
        p.error("give at least two checkpoints")
    if out.exists():
        p.error(f"--output {out} exists: choose a new directory")
    if a.ensemble:
        splits = {tuple(json.loads((d / "config.json").read_text())["data"].get(f) for f in SPLIT_FIELDS)
                  for d in dirs}
        if len(splits) > 1:
            p.error(f"the checkpoints were validated on different splits ({', '.join(SPLIT_FIELDS)} differ): "
                    "an ensemble is scored on one split")
    loaded = [load(d, "cpu") for d in dirs]
    models = [m.model for m in loaded]
    if len({tuple(m.state_dict()) for m in models}) > 1:
        p.error("the checkpoints hold different parts (tasks, PALs, own layers): average checkpoints of one run "
                "or of one config")
    for d in dirs:
        m = json.loads((d / "metrics.json").read_text())
        print(f"{d.parent.name}/{d.name}: " + " ".join(f"{k}={v:.4f}" for k, v in m.items() if k.startswith("val_") or k == "overall"))
    ensembled = ensemble_scores(dirs, loaded) if a.ensemble else None     # before the last model becomes the average
    model = models[-1]
    model.load_state_dict(average_states([m.state_dict() for m in models]))
    model.save(out, loaded[-1].tokenizer, extra={"max_length": loaded[-1].max_length})
    shutil.copy(dirs[-1] / "config.json", out / "config.json")      # the run's split, for evaluate
    print(f"average of {len(dirs)} checkpoints: {out}")
    status = raymtl_main(["evaluate", "--checkpoint", str(out)])
    if ensembled is not None:
        print(f"ensemble of {len(dirs)} checkpoints:\n{format_table(ensembled)}")
    return status

if __name__ == "__main__":
    sys.exit(main())
