"""The multi-task model: the shared encoder, one head per task, and the per-task parts
(PALs, a learned prefix, own top layers), with save/load as a Hugging Face directory.

Checkpoint layout (everything loads without pickle; weights always fp32)::

    encoder/            AutoModel.save_pretrained (safetensors) + tokenizer
    heads.safetensors   task heads ("heads.<task>.*"), PALs ("pals.*"), learned prefixes,
                        tasks' own top layers ("task_layers.<task>.*")
    raymtl.json         model config (encoder source, pair modes, pooling and own layers per task)
"""
from __future__ import annotations

import dataclasses
import json
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from raymtl.models.device import check_device
from raymtl.models.encoder import build_encoder, encoder_state, pool, save_encoder
from raymtl.models.heads import Head
from raymtl.models.own_layers import layer_stack, own_layer_counts, own_top_layers
from raymtl.models.pals import PALConfig, add_pals, mark_only_pals_as_trainable
from raymtl.models.prefixes import TaskPrefix, text_prefix
from raymtl.models.unpad import supports_unpadding, unpadded_forward
from raymtl.tasks import TASKS


class CheckpointError(ValueError):
    """A checkpoint directory that does not load; the message names the file and what is wrong
    (a ValueError, so the ``raymtl`` commands print it as one ``error:`` line)."""


class MultiTaskModel(nn.Module):
    def __init__(self, encoder: nn.Module, tasks: list[str], pair_mode: dict[str, str],
                 pooling: str = "mean", head_dropout: float = 0.1, source: str = "default",
                 pals: dict | None = None, task_prefix: str = "none", prefix_length: int = 4,
                 unpad: bool = True, task_pooling: dict[str, str] | None = None,
                 task_layers: dict[str, int | str] | None = None):
        super().__init__()
        self.encoder, self.pooling, self.source = encoder, pooling, source
        self.task_pooling = {t: how for t, how in (task_pooling or {}).items() if t in tasks and how != pooling}
        self.modes = {t: (pair_mode.get(t, TASKS[t].default_pair_mode) if TASKS[t].is_pair else None)
                      for t in tasks}
        hidden = encoder.config.hidden_size
        self.heads = nn.ModuleDict({t: Head(TASKS[t], self.modes[t], hidden, head_dropout) for t in tasks})
        self.active_task, self.active_padding = None, None      # read by the PAL hooks
        self.task_layers = own_top_layers(encoder, task_layers or {}, tasks)   # before PALs hook the layers
        if pals and pals.get("tasks"):    # PALs only for this model's tasks (a checkpoint's others are dropped)
            kept = [t for t in tasks if t in pals["tasks"]]
            pals = {**pals, "tasks": kept} if kept else None
        self.pal_settings, self.task_prefix, self.prefix_length = pals, task_prefix, prefix_length
        if pals:
            add_pals(self, list(tasks), PALConfig(**pals))
        self.prefix = TaskPrefix(list(tasks), hidden, prefix_length) if task_prefix == "learned" else None
        # compute only on real tokens (raymtl.models.unpad) where the encoder allows; else Hugging Face's forward
        self.unpad = unpad and supports_unpadding(encoder)

    def text_prefix(self, task: str) -> str:
        return text_prefix(task) if self.task_prefix == "text" else ""

    OWN_PARTS = ("heads", "pals", "task_layers")       # per-task modules: one task's loss reaches them

    def own_named_parameters(self) -> dict[str, dict[str, nn.Parameter]]:
        """Per task, its trainable parameters that no other task's loss reaches, by name: its
        head, PALs and own top layers."""
        own: dict[str, dict[str, nn.Parameter]] = {}
        for name, p in self.named_parameters():
            part, task = (name.split(".") + [""])[:2]
            if part in self.OWN_PARTS and task in self.heads and p.requires_grad:
                own.setdefault(task, {})[name] = p
        return own

    def own_parameters(self) -> dict[str, list[nn.Parameter]]:
        """``own_named_parameters`` without the names (``raymtl.methods.fusion.PeriodicFusion``
        hands them their task's plain gradient)."""
        return {t: list(named.values()) for t, named in self.own_named_parameters().items()}

    def pooling_of(self, task: str) -> str:
        return self.task_pooling.get(task, self.pooling)

    def layers_of(self, task: str) -> list[nn.Module]:
        """The encoder layers a task's rows run: the shared ones, its own at the top."""
        shared = list(layer_stack(self.encoder).layer)
        own = list(self.task_layers[task]) if task in self.task_layers else []
        return shared[:len(shared) - len(own)] + own

    @contextmanager
    def _layers_in_place(self, task: str):
        """Hugging Face's forward runs the encoder's own layer list: the task's, for one call."""
        if task not in self.task_layers:
            yield
            return
        stack = layer_stack(self.encoder)
        shared = stack.layer
        stack.layer = nn.ModuleList(self.layers_of(task))
        try:
            yield
        finally:
            stack.layer = shared

    @classmethod
    def from_config(cls, model_cfg, tasks, seed: int = 0) -> "MultiTaskModel":
        extras = dict(pals=model_cfg.pal_settings(), task_prefix=model_cfg.task_prefix,
                      prefix_length=model_cfg.prefix_length, unpad=model_cfg.unpad,
                      task_pooling=model_cfg.task_pooling, task_layers=model_cfg.task_layers)
        if model_cfg.init_from:
            model = cls.load(model_cfg.init_from, tasks=tasks, pair_mode=model_cfg.pair_mode,
                             head_dropout=model_cfg.head_dropout, **extras)
        else:
            model = cls(build_encoder(model_cfg.encoder, seed), list(tasks), model_cfg.pair_mode,
                        model_cfg.pooling, model_cfg.head_dropout, source=model_cfg.encoder, **extras)
        if model_cfg.train_only_adapters:
            mark_only_pals_as_trainable(model)
        return model

    def embed(self, task: str, ids: torch.Tensor, mask: torch.Tensor, tt: torch.Tensor | None = None) -> torch.Tensor:
        inputs = (self.prefix(task, self.encoder, ids, mask, tt) if self.prefix is not None else
                  {"input_ids": ids, "attention_mask": mask, "token_type_ids": tt})
        mask = inputs["attention_mask"]
        if self.unpad:
            pals = getattr(self, "pals", {})
            extra = pals[task].forward_packed if task in pals else None
            layers = self.layers_of(task) if task in self.task_layers else None
            packed, packing = unpadded_forward(self.encoder, layer_extra=extra, layers=layers, **inputs)
            return pool(packing.unpack(packed), mask, self.pooling_of(task))  # (B, H)
        self.active_task, self.active_padding = task, mask == 0      # read by the PAL hooks
        try:
            with self._layers_in_place(task):
                hidden = self.encoder(**inputs).last_hidden_state    # (B, T, H)
        finally:
            self.active_task, self.active_padding = None, None
        return pool(hidden, mask, self.pooling_of(task))             # (B, H)

    def forward(self, task: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        check_device(batch, self)
        u = self.embed(task, batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        v = (self.embed(task, batch["input_ids_b"], batch["attention_mask_b"])
             if self.modes[task] == "bi" else None)
        return self.heads[task](u, v)

    # ------------------------------------------------------------------ checkpoints
    def meta(self) -> dict:
        return {"source": self.source, "pooling": self.pooling, "task_pooling": self.task_pooling,
                "modes": self.modes,
                "head_dropout": self.heads[next(iter(self.heads))].drop.p,
                "pals": self.pal_settings, "task_prefix": self.task_prefix,
                "prefix_length": self.prefix_length,
                "task_layers": {t: len(layers) for t, layers in self.task_layers.items()}}

    def extra_state(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Weights outside the HF encoder: heads, PALs, learned prefixes, tasks' own layers
        (``heads.safetensors``), from ``state`` (default: the module's own state dict)."""
        keep = ("heads.", "pals.", "prefix.", "task_layers.")
        state = self.state_dict() if state is None else state
        return {k: v.detach().contiguous().cpu() for k, v in state.items() if k.startswith(keep)}

    def save(self, directory: str | Path, tokenizer=None, extra: dict | None = None,
             state: dict[str, torch.Tensor] | None = None) -> None:
        """``state``: a full state dict to write instead of the module's (fp32 master weights)."""
        d = save_encoder(self.encoder, directory, tokenizer, encoder_state(state))
        save_file(self.extra_state(state), str(d / "heads.safetensors"))
        (d / "raymtl.json").write_text(json.dumps({**self.meta(), **(extra or {})}, indent=2))

    @classmethod
    def load(cls, directory: str | Path, tasks: list[str] | None = None, pair_mode: dict | None = None,
             head_dropout: float | None = None, task_pooling: dict | None = None,
             task_layers: dict | None = None, **overrides) -> "MultiTaskModel":
        """Load a raymtl checkpoint. With ``tasks``, heads missing from it start fresh, in
        ``pair_mode`` and ``task_pooling`` (the checkpoint's own modes and poolings win for the
        heads it has), and its heads of tasks not in ``tasks`` are left out; a checkpoint without
        heads (``jobs/pretrain.py``) takes ``head_dropout`` too. ``task_layers`` gives tasks
        without their own layers in the checkpoint fresh copies of its top layers (a different
        count for a task that has them is an error). ``overrides`` (pals, task_prefix,
        prefix_length) add adapters the checkpoint lacks, which start fresh.
        Everything the checkpoint's ``raymtl.json`` says it has (heads, PALs, learned prefixes,
        own layers of its tasks: ``saved_parts``) must be in ``heads.safetensors``, and the file
        may hold nothing else, each key in the model's shape. A damaged checkpoint (a file missing,
        truncated or not what it should hold) raises ``CheckpointError`` naming the file."""
        d = Path(directory)
        meta = read_meta(d)
        file = d / "heads.safetensors"
        saved = read_safetensors(file)
        encoder = load_encoder(d / "encoder")
        tasks = list(tasks or meta["modes"])
        extras = {k: meta.get(k) for k in ("pals", "task_prefix", "prefix_length") if meta.get(k) is not None}
        extras.update({k: v for k, v in overrides.items() if v not in (None, "none")})
        modes = {**(pair_mode or {}), **{t: m for t, m in meta["modes"].items() if m}}
        saved_pooling = meta.get("task_pooling", {})        # checkpoints before task_pooling: none
        pooling = {**{t: p for t, p in (task_pooling or {}).items() if t not in meta["modes"]},
                   **{t: saved_pooling.get(t, meta["pooling"]) for t in meta["modes"]}}
        dropout = meta.get("head_dropout", head_dropout if head_dropout is not None else 0.1)
        saved_layers = meta.get("task_layers", {})          # checkpoints before task_layers: none
        asked = task_layers or {}
        for t, n in own_layer_counts(encoder, asked, tasks).items():
            if saved_layers.get(t, n) != n:
                raise ValueError(f"{d} has {saved_layers[t]} own layer(s) for {t}; task_layers asks "
                                 f"{asked[t]!r} ({n}): pass task_layers {t}={saved_layers[t]} "
                                 f"(--task-layers {t}={saved_layers[t]}) to go on from it")
        model = cls(encoder, tasks, modes, meta["pooling"], dropout, source=meta["source"],
                    task_pooling=pooling, task_layers={**(task_layers or {}), **saved_layers}, **extras)
        state = {k: v for k, v in model.state_dict().items() if not k.startswith("encoder.")}
        has, built = saved_parts(meta), {part_of(k) for k in state}
        missing = [k for k in state if part_of(k) in has and k not in saved]
        if missing:
            raise CheckpointError(f"{file} lacks {missing}, which {d / 'raymtl.json'} says the checkpoint has; "
                                  "the file is incomplete or from another checkpoint")
        # a key of no part the checkpoint has, or one the model's same part does not have
        unexpected = [k for k in saved if part_of(k) not in has or (part_of(k) in built and k not in state)]
        if unexpected:
            raise CheckpointError(f"{file} holds {unexpected}, which {d / 'raymtl.json'} does not describe "
                                  f"(tasks {list(meta['modes'])}); the file is from another checkpoint")
        misshapen = [f"{k} {list(saved[k].shape)} (model: {list(v.shape)})"
                     for k, v in state.items() if k in saved and saved[k].shape != v.shape]
        if misshapen:
            raise CheckpointError(f"{file} holds {', '.join(misshapen)}, of other shapes than the model "
                                  f"{d / 'raymtl.json'} describes; the file is from another checkpoint")
        model.load_state_dict({k: saved[k] for k in state if k in saved}, strict=False)
        return model


def part_of(key: str) -> tuple[str, str]:
    """The (part, task) a ``heads.safetensors`` key belongs to: ``heads.sst.out.weight`` ->
    ('heads', 'sst'), ``prefix.vectors.sst`` -> ('prefix', 'sst')."""
    names = key.split(".") + ["", ""]
    return names[0], names[2] if names[0] == "prefix" else names[1]


def saved_parts(meta: dict) -> set[tuple[str, str]]:
    """The (part, task) pairs whose weights a checkpoint's ``raymtl.json`` (``meta``) says its
    ``heads.safetensors`` holds: each task's head, the PALs of its PAL tasks (every task when
    the settings name none), each task's learned prefix, the own layers of the tasks that have them."""
    tasks = list(meta["modes"])
    pals = meta.get("pals")
    return ({("heads", t) for t in tasks}
            | ({("pals", t) for t in pals.get("tasks") or tasks} if pals else set())
            | ({("prefix", t) for t in tasks} if meta.get("task_prefix") == "learned" else set())
            | {("task_layers", t) for t in meta.get("task_layers") or {}})


# ---------------------------------------------------------------- reading a checkpoint's files
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _per_task(ok):
    """A check of a ``{task: value}`` object: known task names, every value passing ``ok``."""
    return lambda v: isinstance(v, dict) and all(t in TASKS and ok(x) for t, x in v.items())


PAL_FIELDS = {f.name for f in dataclasses.fields(PALConfig)}

# raymtl.json: key -> (does every checkpoint have it, what it must be, the check)
META = {
    "source": (True, "a string", lambda v: isinstance(v, str)),
    "pooling": (True, "a string", lambda v: isinstance(v, str)),
    "modes": (True, "an object of task: 'cross', 'bi' or null", _per_task(lambda m: m in (None, "cross", "bi"))),
    "task_pooling": (False, "an object of task: pooling", _per_task(lambda p: isinstance(p, str))),
    "head_dropout": (False, "a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    "pals": (False, f"null or an object of {sorted(PAL_FIELDS)}", lambda v: v is None or (
        isinstance(v, dict) and set(v) <= PAL_FIELDS)),
    "task_prefix": (False, "a string", lambda v: isinstance(v, str)),
    "prefix_length": (False, "an integer", _is_int),
    "task_layers": (False, "an object of task: layer count", _per_task(_is_int)),
    "max_length": (False, "an integer", _is_int),      # written by the train loop, read by raymtl.load
}


def read_meta(directory: Path) -> dict:
    """A checkpoint's ``raymtl.json``, every key ``MultiTaskModel.load`` reads checked."""
    file = directory / "raymtl.json"
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a raymtl checkpoint: "
                              f"{'not a directory' if directory.exists() else 'no such directory'}")
    if not file.is_file():
        raise CheckpointError(f"{directory} is not a raymtl checkpoint (no raymtl.json)")
    try:
        meta = json.loads(file.read_bytes())
    except ValueError as e:                         # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{file} is not valid JSON ({e}); the checkpoint is damaged") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{file} holds {type(meta).__name__} {str(meta)[:60]}, not a JSON object; "
                              "the checkpoint is damaged")
    for key, (required, what, ok) in META.items():
        if key not in meta and required:
            raise CheckpointError(f"{file} lacks {key!r} ({what}), which every raymtl checkpoint has; "
                                  "the checkpoint is damaged")
        if key in meta and not ok(meta[key]):
            raise CheckpointError(f"{file}: {key!r} must be {what}, got {str(meta[key])[:80]}; "
                                  "the checkpoint is damaged")
    return meta


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(f"{file} is missing; the checkpoint is incomplete")
    try:
        return load_file(str(file))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{file} is not a readable safetensors file ({e}); it is damaged or truncated") from None


def load_encoder(directory: Path) -> nn.Module:
    """The Hugging Face encoder a checkpoint holds (``encoder/``), fp32; every weight must be in its files."""
    from transformers import AutoModel
    weights = directory / "model.safetensors"
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is missing; the checkpoint has no encoder")
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory / 'config.json'} is missing; the checkpoint's encoder is incomplete")
    if not weights.is_file() and not (directory / "model.safetensors.index.json").is_file():
        raise CheckpointError(f"{weights} is missing; the checkpoint's encoder weights are gone")
    for file in sorted(directory.glob("*.safetensors")):    # a truncated file names itself
        try:
            with safe_open(str(file), "pt"):
                pass
        except (OSError, SafetensorError) as e:
            raise CheckpointError(f"{file} is not a readable safetensors file ({e}); "
                                  "it is damaged or truncated") from None
    try:
        encoder, info = AutoModel.from_pretrained(directory, add_pooling_layer=False, dtype=torch.float32,
                                                  output_loading_info=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise CheckpointError(f"{directory} does not load as a Hugging Face model: {e}") from None
    if info["missing_keys"]:        # Hugging Face would start them at random, with a warning
        raise CheckpointError(f"{directory} lacks encoder weights {sorted(info['missing_keys'])}; "
                              "the files are incomplete or from another model")
    return encoder
