"""Recipes: the measured configurations as named presets (big_vision's habit).

Components own their neutral defaults (each config section, ``PALConfig``, the stages'
configs); a recipe is a Python function that returns a whole config, and states the exact
command, its runtime on the 2-core EPYC VM used for every number in ``docs/`` and the scores
measured with it. Jobs take ``--preset NAME`` (their own recipe by default); flags and
``--config`` files apply on top of the preset, ``--smoke`` shrinks it.

    python jobs/mtl.py --preset single-sst      # one of the single-task baselines
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from raymtl.config import MTLConfig
from raymtl.stages.pretrain import PretrainJobConfig
from raymtl.stages.relations import RelationsJobConfig

# Building blocks of the recipes below.
SUM_LOSS = {"fusion": "sum", "fusion_every": 1}        # the plain summed loss: nothing to fuse
PLAIN_ENCODER = {"pals": False, "task_layers": {}}      # the shared encoder alone: no PALs, no own layers


@dataclass(frozen=True)
class Recipe:
    build: Callable[[], MTLConfig]
    command: str
    runtime: str        # on the 2-core EPYC VM, fp32
    expected: str       # what it scored, where measured

    def __call__(self) -> MTLConfig:
        return self.build()


def mtl() -> MTLConfig:
    """The multi-task default: one task per step, drawn by temperature sampling (T = 2: Quora,
    the largest task, gets 1.6-1.9x SST's batches), 900 steps (the compute of 300 round-robin
    steps), PALs for STS, SST's own top half. IMTL-G stays set but has nothing to fuse in a
    one-task step; round robin (``--sampling round_robin --steps 300 --eval-every 100``) is
    where it acts. Measured against that on 3 seeds: docs/methods.md (``--sampling`` row)."""
    return MTLConfig().replace(sampling="temperature", steps=900, eval_every=300)


def hour() -> MTLConfig:
    """The one-hour recipe: round robin with IMTL-G (the default before temperature sampling),
    bf16 where the hardware has it natively (``auto``; emulated bf16 is far slower than fp32),
    six times the steps (each task sees
    several epochs; the learning rate decays over the whole run), validated every 150 steps,
    stopped when the overall score has not improved for 4 validations. Each task's own parts
    (head, PALs, own layers) are kept at its best validation (``keep_task_best``): SST peaks
    after 2.5 epochs while Quora and STS go on improving (seed 2: +0.006 overall; seed 42: +0.000 to
    step 1,050, SST +0.009 at its best step 1,500; docs/quality-log.md)."""
    return MTLConfig().replace(name="hour", steps=1800, eval_every=150, early_stop=4, precision="auto",
                               keep_task_best=True)


def single_task(task: str) -> Callable[[], MTLConfig]:
    """One task alone on the plain encoder and its summed loss: the baseline a multi-task
    model must beat (the same rows in the same order as the multi-task run of its seed)."""
    return lambda: MTLConfig().replace(tasks=(task,), name=f"single-{task}", **SUM_LOSS, **PLAIN_ENCODER)


def teacher() -> MTLConfig:
    """``jobs/teacher.py``: one task and its related stream on the summed loss (as measured)."""
    return MTLConfig().replace(**SUM_LOSS, **PLAIN_ENCODER)


def pretrain() -> PretrainJobConfig:
    """``jobs/pretrain.py``: MLM (weight 0.1, its fresh head warmed up alone for 100 steps) +
    supervised SimCSE on NLI, 200 steps of 32 rows per objective. Unsupervised SimCSE is off:
    its loss is ~0 from the start (MiniLM already tells Wiki sentences apart) and it costs a
    third of a step. Measured in bench/pretrain.py (``mlm-sup``)."""
    return PretrainJobConfig().replace(lr=3e-5, steps=200, eval_every=100, head_warmup_steps=100,
                                       simcse_unsup_weight=0.0)     # the stage sums its losses


def relations() -> RelationsJobConfig:
    """``raymtl relations``: the task-relationship map, measured on the plain encoder."""
    return RelationsJobConfig().replace(name="relations", **PLAIN_ENCODER)


def transfer() -> MTLConfig:
    """``jobs/transfer.py``: the transfer strategies were measured on the summed loss and plain encoder."""
    return MTLConfig().replace(output="runs/transfer", **SUM_LOSS, **PLAIN_ENCODER)


RECIPES: dict[str, Recipe] = {
    "mtl": Recipe(mtl, "python jobs/mtl.py", "12-13 min",
                  "validation, bench/quality.py seeds 42/1/2: SST 0.498, Quora 0.848, STS 0.875, overall 0.761 "
                  "(three single-task models: 0.764); round robin's official dev (independent): 0.459 / 0.826 / 0.868"),
    "hour": Recipe(hour, "python jobs/mtl.py --preset hour", ("25-40 min in native bf16 (1.3-1.4 s/step); fp32 2.2-2.8 s/step, "
                    "79 min to the early stop at step 1650 (seed 2)"),
                   "validation, bench/quality.py seeds 42/1/2, before keep_task_best: SST 0.511, Quora 0.853, STS 0.881, "
                   "overall 0.768 (+0.007 over mtl, -0.010 against three single-task models on the hour's budget, "
                   "seed 2); with keep_task_best, seeds 2 / 42 / 1: overall 0.7655 / 0.7664 / 0.7808, mean 0.5152 / "
                   "0.8569 / 0.8811 = 0.7709 (against its single-task models on the same budget: Quora, STS level, "
                   "SST -0.011 [-0.004, +0.026], raymtl compare); docs/results/quality.md, docs/quality-log.md"),
    **{f"single-{t}": Recipe(single_task(t), f"python jobs/mtl.py --preset single-{t}", runtime, expected)
       for t, runtime, expected in (("sst", "3 min", "validation, 5 seeds: SST 0.502"),
                                    ("quora", "4-5 min", "validation, 5 seeds: Quora 0.832"),
                                    ("sts", "3 min", "validation, 5 seeds: STS 0.873"))},
    "teacher": Recipe(teacher, "python jobs/teacher.py --task sst", "8-9 min (300 steps)",
                      "SST teacher (+SST-2, CFIMDB) above the student on SST (docs/pipeline.md)"),
    "pretrain": Recipe(pretrain, "python jobs/pretrain.py", "about 12 min (head warm-up and 200 steps: 10.4 training min)",
                       "seed 1: zero-shot STS 0.833 -> 0.852, MLM perplexity 52,389 -> 899 (warm-up) -> 607; the "
                       "default multi-task run from it: -0.003 overall (docs/results/pretrain-s1.md)"),
    "relations": Recipe(relations, "raymtl relations", "about 3 min", "affinity and gradient cosines (docs/relations.md)"),
    "transfer": Recipe(transfer, "python jobs/transfer.py --target sst --support sts", "10-20 min",
                       "per strategy (docs/transfer.md)"),
}


def preset(name: str) -> MTLConfig:
    """The config of recipe ``name``; an unknown name fails listing the valid ones."""
    if name not in RECIPES:
        raise ValueError(f"preset {name!r}: valid are {', '.join(RECIPES)}")
    return RECIPES[name]()
