"""Further pre-training stage: MLM + SimCSE (unsupervised on Wiki sentences, supervised on
NLI triplets) on the shared loop (``raymtl.train.loop``), before multi-task fine-tuning.

Its config adds one section, ``pretrain`` (``PretrainConfig``), to the multi-task sections;
field names stay unique across all of them. Its checkpoint is a raymtl checkpoint without
task heads: ``jobs/mtl.py --init-from CKPT`` adds fresh heads to its encoder.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
import torch.distributed as dist

from raymtl.analysis.metrics import pearson
from raymtl.config import SECTIONS, ModelConfig, MTLConfig, RunSettings, TrainConfig, _help, _positive, smoke
from raymtl.data.corpus import prepare_shards
from raymtl.data.multitask import _pad
from raymtl.data.readers import DataError
from raymtl.data.streams import cycle_batches
from raymtl.methods.weighting import make_weighting
from raymtl.models.device import to_device
from raymtl.models.encoder import tokenizer_source
from raymtl.models.pretrain import PretrainModel, has_mlm_head
from raymtl.objectives.pretrain import (
    IGNORE,
    mask_tokens,
    mlm_loss,
    simcse_sup_loss,
    simcse_unsup_loss,
)
from raymtl.stages.base import Stage
from raymtl.train.loop import say

OBJECTIVES = ("mlm", "simcse_unsup", "simcse_sup")     # stream name == shard kind


@dataclass
class PretrainConfig:
    wiki_files: tuple[str, ...] = _help(
        "Wiki text files (relative to data_dir, absolute, a URI, or hf:NAME[:CONFIG[:SPLIT]] for a "
        "Hugging Face dataset's text column)", default=("wikitext-2/valid.txt", "wikitext-2/test.txt"))
    nli_files: tuple[str, ...] = _help("NLI JSON-lines files (premise, hypothesis, label) for "
                                       "supervised SimCSE", default=("nli/snli.jsonl", "nli/mnli.jsonl"))
    mlm_weight: float = _help("weight of the MLM loss (0 = off); SimCSE's auxiliary MLM used 0.1", default=0.1)
    simcse_unsup_weight: float = _help("weight of unsupervised SimCSE on Wiki sentences (0 = off)", default=1.0)
    simcse_sup_weight: float = _help("weight of supervised SimCSE on NLI triplets (0 = off)", default=1.0)
    mlm_mask_prob: float = _help("fraction of non-special tokens that are MLM targets", default=0.15)
    simcse_temperature: float = _help("SimCSE softmax temperature", default=0.05)
    mlm_batch_size: int = _help("global MLM rows per step (0 = batch_size)", default=0)
    unsup_batch_size: int = _help("global Wiki sentences per step for SimCSE (0 = batch_size)", default=0)
    sup_batch_size: int = _help("global NLI triplets per step (0 = batch_size)", default=0)
    gather_negatives: bool = _help("SimCSE negatives from every worker, not only the local batch", default=True)
    heldout_paragraphs: int = _help("Wiki paragraphs held out for the MLM loss / perplexity", default=200)
    min_words: int = _help("skip Wiki paragraphs and sentences with fewer words (counted)", default=4)
    max_lines: int = _help("read at most this many lines per Wiki/NLI file (0 = all); smoke runs", default=0)
    rows_per_shard: int = _help("rows per Parquet file", default=4096)
    head_warmup_steps: int = _help(
        "steps that train only the MLM head (encoder frozen, MLM alone, at head_lr) before the stage, in a run "
        "of its own (<name>-head, read back when finished); 0 = none. A head created fresh starts at perplexity "
        "~40,000, and its gradients through the encoder are noise until it has learned", default=0)
    train_only_head: bool = _help("train only the MLM head, the encoder frozen (the head warm-up's run)", default=False)

    def __post_init__(self):
        self.wiki_files, self.nli_files = tuple(self.wiki_files), tuple(self.nli_files)
        if not self.wiki_files:
            raise ValueError("wiki_files must name at least one file (MLM validation reads Wiki text)")
        for name in ("mlm_weight", "simcse_unsup_weight", "simcse_sup_weight", "mlm_batch_size",
                     "unsup_batch_size", "sup_batch_size", "max_lines", "head_warmup_steps"):
            _positive(name, getattr(self, name), allow_zero=True)
        for name in ("simcse_temperature", "heldout_paragraphs", "min_words", "rows_per_shard"):
            _positive(name, getattr(self, name))
        if not 0 < self.mlm_mask_prob < 1:
            raise ValueError(f"mlm_mask_prob={self.mlm_mask_prob!r} must be in (0, 1)")
        if not any(self.weights().values()):
            raise ValueError("mlm_weight, simcse_unsup_weight and simcse_sup_weight are all 0; "
                             "at least one objective must be on")
        if self.simcse_sup_weight and not self.nli_files:
            raise ValueError("simcse_sup_weight > 0 needs nli_files")
        if self.head_warmup_steps and not self.mlm_weight:
            raise ValueError(f"head_warmup_steps={self.head_warmup_steps} warms up the MLM head, but mlm_weight=0 "
                             "turns MLM off: set mlm_weight > 0 or head_warmup_steps=0")
        if self.train_only_head and (self.simcse_unsup_weight or self.simcse_sup_weight or self.head_warmup_steps):
            raise ValueError("train_only_head=True freezes the encoder, which SimCSE trains: set "
                             "simcse_unsup_weight=0, simcse_sup_weight=0 and head_warmup_steps=0")

    def weights(self) -> dict[str, float]:
        """Loss weight per objective (stream name)."""
        return {"mlm": self.mlm_weight, "simcse_unsup": self.simcse_unsup_weight,
                "simcse_sup": self.simcse_sup_weight}


@dataclass
class PretrainJobConfig(MTLConfig):
    SECTIONS: ClassVar[dict[str, type]] = {**SECTIONS, "pretrain": PretrainConfig}
    pretrain: PretrainConfig = _help("the further pre-training section", default_factory=PretrainConfig)
    # The stage's own defaults: the whole plain encoder trains (no PALs, no own layers) on the
    # weighted sum of its objectives' losses.
    model: ModelConfig = field(default_factory=lambda: ModelConfig(pals=False, task_layers={}))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(fusion="sum", fusion_every=1))
    run: RunSettings = field(default_factory=lambda: RunSettings(name="pretrain"))

    def __post_init__(self):
        super().__post_init__()
        m = self.model
        if m.pals or m.task_prefix != "none" or m.train_only_adapters or m.task_layers:
            raise ValueError("pals, task_prefix, task_layers and train_only_adapters belong to the multi-task stage; "
                             "pre-training trains the whole encoder")
        if self.train.smart_weight > 0:
            raise ValueError(f"smart_weight={self.train.smart_weight}: SMART regularises task heads' outputs, "
                             "which pre-training has none of; it belongs to the multi-task stage")
        for name in ("mlm_batch_size", "unsup_batch_size", "sup_batch_size"):
            if getattr(self.pretrain, name) % self.micro_divisor():
                raise ValueError(f"{name}={getattr(self.pretrain, name)} must be divisible by "
                                 f"num_workers x grad_accum = {self.micro_divisor()}")

    def objective_micro_batch(self, name: str) -> int:
        """Rows per worker per micro-step for one objective."""
        own = {"mlm": self.pretrain.mlm_batch_size, "simcse_unsup": self.pretrain.unsup_batch_size,
               "simcse_sup": self.pretrain.sup_batch_size}[name]
        return (own or self.train.batch_size) // self.micro_divisor()


def head_warmup_config(cfg: PretrainJobConfig) -> PretrainJobConfig:
    """The MLM head's warm-up run of ``cfg``: MLM alone, the encoder frozen, its own name, in
    the stage's precision (a bf16 run saves the frozen encoder's fp32 values)."""
    steps = cfg.pretrain.head_warmup_steps
    return cfg.replace(name=f"{cfg.run.name}-head", steps=steps, eval_every=steps, early_stop=0, mlm_weight=1.0,
                       simcse_unsup_weight=0.0, simcse_sup_weight=0.0, head_warmup_steps=0, train_only_head=True)


def pretrain_smoke(cfg: PretrainJobConfig | None = None) -> PretrainJobConfig:
    """The same code path on a tiny random BERT, a few hundred lines, a dozen steps (a head
    warm-up, if any, of 4)."""
    cfg = smoke(cfg or PretrainJobConfig())
    return cfg.replace(max_lines=300, heldout_paragraphs=16, head_warmup_steps=min(cfg.pretrain.head_warmup_steps, 4))


def collate_pretrain(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Pad each ``ids_a|b|c`` column to its own longest row (``input_ids[_b|_c]`` + masks)."""
    out = {}
    for col, suffix in (("ids_a", ""), ("ids_b", "_b"), ("ids_c", "_c")):
        if col in batch:
            out["input_ids" + suffix], out["attention_mask" + suffix] = _pad(batch[col])
    if "label" in batch:
        out["label"] = torch.tensor(np.asarray(batch["label"], dtype=np.float32))
    return out


def stack_padded(batch: dict, suffixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Sentences of several columns as one (k * B, T) batch, padded to the longest."""
    T = max(batch["input_ids" + s].shape[1] for s in suffixes)
    pad = lambda x: torch.nn.functional.pad(x, (0, T - x.shape[1]))          # noqa: E731
    return {"input_ids": torch.cat([pad(batch["input_ids" + s]) for s in suffixes]),
            "attention_mask": torch.cat([pad(batch["attention_mask" + s]) for s in suffixes])}


class PretrainStage(Stage):
    """MLM + SimCSE streams on the shared loop; validation: held-out MLM loss / perplexity and
    zero-shot STS Pearson (cosine of pooled embeddings), also before step 0."""
    name = "pretrain"
    config_class = PretrainJobConfig
    score = "step"                  # the stage's output is its last checkpoint
    validate_at_start = True

    def __init__(self, cfg: PretrainJobConfig, sizes: dict[str, int]):
        from transformers import AutoTokenizer

        super().__init__(cfg, sizes)
        self.tok = AutoTokenizer.from_pretrained(tokenizer_source(self.cfg.model.init_from or self.cfg.model.encoder))
        self.special = torch.tensor(sorted(self.tok.all_special_ids))

    @classmethod
    def prepare(cls, cfg: PretrainJobConfig, verbose: bool = True) -> tuple[dict, dict[str, int]]:
        """Tokenized shards (cached) -> Ray datasets for the trainer and rows per training stream."""
        shards = prepare_shards(cfg, tokenizer_source(cfg.model.init_from or cfg.model.encoder))
        if verbose:
            print("[raymtl] data " + shards.summary(), flush=True)
        names = [n for n, w in cfg.pretrain.weights().items() if w > 0]
        empty = [k for k in (*names, "mlm_val", "sts_val") if not shards.counts.get(k)]
        if empty:
            raise DataError(f"no rows of kind {empty} in {shards.path}; see the data report above")
        datasets = {f"train_{n}": shards.dataset(n, seed=cfg.train.seed) for n in names}     # streamed
        datasets.update(val_mlm=shards.dataset("mlm_val", in_memory=True), val_sts=shards.dataset("sts_val", in_memory=True))
        return datasets, {n: shards.counts[n] for n in names}

    @classmethod
    def upstream(cls, cfg: PretrainJobConfig) -> PretrainJobConfig | None:
        """With ``head_warmup_steps``: the head's warm-up run (``head_warmup_config``), unless the
        encoder it starts from brings a trained MLM head (a raymtl pre-training checkpoint, a
        ``*ForMaskedLM`` model): then there is no fresh head to warm up."""
        if not cfg.pretrain.head_warmup_steps:
            return None
        source = cfg.model.init_from or cfg.model.encoder
        if has_mlm_head(source):
            print(f"[raymtl] {source} has a trained MLM head: no head warm-up "
                  f"(head_warmup_steps={cfg.pretrain.head_warmup_steps} skipped)", flush=True)
            return None
        return head_warmup_config(cfg)

    @classmethod
    def after_upstream(cls, cfg: PretrainJobConfig, metrics: dict) -> PretrainJobConfig:
        """The stage starts from the warmed-up head's checkpoint (its summary, with the held-out
        perplexity before and after, was printed when it trained)."""
        return cfg.replace(init_from=metrics["best_checkpoint"])

    @classmethod
    def print_summary(cls, summary) -> None:
        """Zero-shot STS and held-out MLM before and after, and how to fine-tune the result."""
        m = summary.best_metrics
        if m:
            was = lambda k, f: format(m[k + "_step0"], f) if k + "_step0" in m else "n/a"   # noqa: E731
            print(f"\n[raymtl] zero-shot STS Pearson (validation split of sts/train.csv): "
                  f"before {was('sts_zero_shot', '.4f')}, after {m['sts_zero_shot']:.4f}")
            print(f"[raymtl] held-out Wiki MLM loss {was('mlm_loss', '.3f')} -> {m['mlm_loss']:.3f} "
                  f"(perplexity {was('mlm_perplexity', '.1f')} -> {m['mlm_perplexity']:.1f})")
            print(f"[raymtl] fine-tune it: python jobs/mtl.py --init-from {summary.best_checkpoint}")
        super().print_summary(summary)

    def build_model(self) -> PretrainModel:
        cfg = self.cfg
        model = PretrainModel(cfg.model.init_from or cfg.model.encoder, cfg.model.pooling, seed=cfg.train.seed,
                              unpad=cfg.model.unpad)
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        if model.created_head and rank0:
            say("[raymtl] the encoder has no MLM head: created one, tied to the word embeddings")
        if cfg.pretrain.train_only_head:      # the tied output matrix is the word embeddings: frozen too
            model.encoder.requires_grad_(False)
            if rank0:
                say(f"[raymtl] training only the MLM head ({sum(p.numel() for p in model.parameters() if p.requires_grad):,} "
                    "parameters); the encoder is frozen")
        weights = cfg.pretrain.weights()
        model.weighting = make_weighting(cfg.train.weighting, list(self.sizes), {n: weights[n] for n in self.sizes},
                                         cfg.train.dwa_window, cfg.train.dwa_temperature)
        self.vocab_size = model.encoder.config.vocab_size
        return model

    def streams(self, rank: int, seed: int, skip: dict[str, int] | None = None) -> dict:
        import ray.train
        return {n: cycle_batches(ray.train.get_dataset_shard(f"train_{n}"), self.cfg.objective_micro_batch(n),
                                 seed, self.cfg.data.bucket_batches, collate_pretrain, (skip or {}).get(n, 0))
                for n in self.sizes}

    def masked(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        never = torch.isin(ids, self.special.to(ids.device)) | (mask == 0)           # (B, T)
        inputs, labels = mask_tokens(ids, never, self.tok.mask_token_id, self.vocab_size,
                                     self.cfg.pretrain.mlm_mask_prob, generator)
        return {"input_ids": inputs, "attention_mask": mask, "mlm_labels": labels}

    def fixed_masks(self, batch: dict) -> dict:
        """Validation masks, drawn per row from a seed of its own tokens: the same at every
        step, in every run, whatever the batch order or number of workers."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        inputs, labels = ids.clone(), torch.full_like(ids, IGNORE)
        for i in range(len(ids)):
            n = int(mask[i].sum())
            row = ids[i:i + 1, :n]                                                      # (1, n)
            g = torch.Generator().manual_seed(self.cfg.train.seed + zlib.crc32(row.numpy().tobytes()))
            b = self.masked({"input_ids": row, "attention_mask": mask[i:i + 1, :n]}, g)
            inputs[i, :n], labels[i, :n] = b["input_ids"][0], b["mlm_labels"][0]
        return {"input_ids": inputs, "attention_mask": mask, "mlm_labels": labels}

    def loss(self, forward, name: str, batch: dict, step: int) -> torch.Tensor:
        p = self.cfg.pretrain
        if name == "mlm":
            b = self.masked(batch)
            return mlm_loss(forward("mlm", b).float(), b["mlm_labels"][b["mlm_labels"] != -100])
        if name == "simcse_unsup":       # the same sentences twice: dropout makes the two views differ
            z1, z2 = forward("embed", stack_padded(batch, ("", ""))).float().chunk(2)             # (B, H) each
            return simcse_unsup_loss(z1, z2, p.simcse_temperature, p.gather_negatives)
        a, pos, neg = forward("embed", stack_padded(batch, ("", "_b", "_c"))).float().chunk(3)     # (B, H) each
        return simcse_sup_loss(a, pos, neg, p.simcse_temperature, p.gather_negatives)

    @torch.no_grad()
    def validate(self, module, rank: int, world: int) -> dict[str, float]:
        """Collective. Batches are divided among ranks, except under ZeRO-3 (every rank must
        run every forward). MLM masks are fixed per row (``fixed_masks``), so scores compare."""
        import ray.train
        share = self.cfg.scale.zero_stage < 3 and world > 1
        mine = lambda name: (b for i, b in enumerate(ray.train.get_dataset_shard(name).iter_batches(  # noqa: E731
            batch_size=32, batch_format="numpy")) if not share or i % world == rank)
        was_training = module.training
        module.eval()
        nll, n, cos, labels = 0.0, 0, [], []
        for raw in mine("val_mlm"):
            b = to_device(self.fixed_masks(collate_pretrain(raw)), module)
            targets = b["mlm_labels"][b["mlm_labels"] != -100]
            nll, n = nll + mlm_loss(module("mlm", b).float(), targets).item() * len(targets), n + len(targets)
        for raw in mine("val_sts"):
            b = to_device(collate_pretrain(raw), module)
            u, v = module("embed", stack_padded(b, ("", "_b"))).float().chunk(2)                      # (B, H) each
            cos.append(torch.nn.functional.cosine_similarity(u, v, dim=-1).float().cpu().numpy())
            labels.append(b["label"].cpu().numpy())
        module.train(was_training)
        cos, labels = np.concatenate(cos or [np.zeros(0)]), np.concatenate(labels or [np.zeros(0)])
        if share:
            parts = [None] * world
            dist.all_gather_object(parts, (nll, n, cos, labels))
            nll, n = sum(p[0] for p in parts), sum(p[1] for p in parts)
            cos, labels = np.concatenate([p[2] for p in parts]), np.concatenate([p[3] for p in parts])
        loss = nll / max(n, 1)
        return {"mlm_loss": loss, "mlm_perplexity": math.exp(min(loss, 50.0)), "sts_zero_shot": pearson(cos, labels)}
