"""Average checkpoints of one run after the fact and score the average on the run's validation
split: latest weight averaging (Kaddour 2022; checkpoint averaging as in Vaswani et al. 2017),
measured on hour runs and not kept in the loop (docs/quality-log.md, "Averaging the last
checkpoints").

    python bench/average.py runs/hour/NAME/checkpoint_002250 runs/hour/NAME/checkpoint_002700 \\
        runs/hour/NAME/checkpoint_003150 --output runs/averaged/last3

The uniform mean of the fp32 weights (encoder, heads, per-task parts); the checkpoints must
come from one run (the same tasks and parts). Prints each checkpoint's own validation scores
(its ``metrics.json``) and the average's, as ``raymtl evaluate`` scores it.
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from raymtl.cli import main as raymtl_main
from raymtl.models.multitask import MultiTaskModel, read_meta


def average_states(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The uniform average of model states (floating tensors; others from the last state)."""
    return {k: torch.stack([st[k] for st in states]).mean(0) if v.is_floating_point() else v
            for k, v in states[-1].items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="checkpoint directories of one run")
    p.add_argument("--output", required=True, help="new directory for the averaged checkpoint")
    a = p.parse_args(argv)
    dirs, out = [Path(c) for c in a.checkpoints], Path(a.output)
    if len(dirs) < 2:
        p.error("give at least two checkpoints")
    if out.exists():
        p.error(f"--output {out} exists: choose a new directory")
    models = [MultiTaskModel.load(d) for d in dirs]
    if len({tuple(m.state_dict()) for m in models}) > 1:
        p.error("the checkpoints hold different parts (tasks, PALs, own layers): average checkpoints of one run")
    for d in dirs:
        m = json.loads((d / "metrics.json").read_text())
        print(f"{d.name}: " + " ".join(f"{k}={v:.4f}" for k, v in m.items() if k.startswith("val_") or k == "overall"))
    model = models[-1]
    model.load_state_dict(average_states([m.state_dict() for m in models]))
    from transformers import AutoTokenizer
    model.save(out, AutoTokenizer.from_pretrained(str(dirs[-1] / "encoder")),
               extra={"max_length": read_meta(dirs[-1]).get("max_length", 128)})
    shutil.copy(dirs[-1] / "config.json", out / "config.json")      # the run's split, for evaluate
    print(f"average of {len(dirs)} checkpoints: {out}")
    return raymtl_main(["evaluate", "--checkpoint", str(out)])


if __name__ == "__main__":
    sys.exit(main())
