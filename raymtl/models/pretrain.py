"""The further pre-training model: the encoder with a tied masked-LM head (MLM + SimCSE)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from raymtl.models.device import check_device
from raymtl.models.encoder import TINY_BERT, default_encoder_path, encoder_state, pool, save_encoder
from raymtl.models.unpad import supports_unpadding, unpadded_forward


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
        check_device(batch, self)
        if kind == "embed":
            return self.embed(batch["input_ids"], batch["attention_mask"])
        hidden = self.hidden(batch["input_ids"], batch["attention_mask"])
        return self.mlm_head(hidden[batch["mlm_labels"] != -100])   # (B, T, H) -> (N, H) -> (N, V)

    def head_state(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The MLM head's own weights (not the matrix tied to the word embeddings), from
        ``state`` (a full state dict) when given."""
        tied = {id(p) for p in self.encoder.parameters()}
        return {k: (p if state is None else state[f"mlm_head.{k}"]).detach().contiguous().cpu()
                for k, p in self.mlm_head.named_parameters() if id(p) not in tied}

    def save(self, directory: str | Path, tokenizer=None, extra: dict | None = None,
             state: dict[str, torch.Tensor] | None = None) -> None:
        """``state``: a full state dict to write instead of the module's (fp32 master weights)."""
        d = save_encoder(self.encoder, directory, tokenizer, encoder_state(state))
        save_file({}, str(d / "heads.safetensors"))
        save_file(self.head_state(state), str(d / "mlm_head.safetensors"))
        meta = {"source": self.source, "pooling": self.pooling, "modes": {}, "pals": None,
                "task_prefix": "none", "prefix_length": 4, "stage": "pretrain"}
        (d / "raymtl.json").write_text(json.dumps({**meta, **(extra or {})}, indent=2))


def has_mlm_head(encoder: str) -> bool:
    """Whether ``encoder`` (a name, Hugging Face id or checkpoint) brings trained MLM head
    weights; loads it on the CPU once (the global random state is left as it was)."""
    if encoder == "tiny-random":
        return False
    with torch.random.fork_rng(devices=[]):
        return not _masked_lm(encoder, 0)[1]


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
        head = next(m for m in mlm.children() if m is not mlm.base_model)
        head.load_state_dict(load_file(str(raymtl_head)), strict=False)
        created = False
    mlm.tie_weights()
    return mlm, created
