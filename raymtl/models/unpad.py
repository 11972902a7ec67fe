"""A padding-free encoder forward ("unpadding"), for BERT-shaped Hugging Face encoders.

A padded batch of B rows × T tokens spends the encoder's arithmetic on every position,
padding included, though a padding position never changes a real one (attention masks it as
a key). Here the real tokens are packed into one (N, H) matrix after the embeddings, and
every per-token operation of every layer (the query/key/value and output projections, the
feed-forward block, layer norms, dropout: nearly all of the arithmetic) runs on those N rows
only. Only the attention itself goes back to (B, heads, T, d) for one
``scaled_dot_product_attention`` call. The result equals the padded forward's at the real
positions (up to float rounding); the model's weights and checkpoints are the Hugging Face
ones, unchanged.

Every submodule is called as a module (``layer.attention.output(...)``), so hooks on the
projections and layer norms (DeepSpeed ZeRO-3's parameter gathering) fire as usual. The
layer modules themselves are not called, so a caller adds per-layer extras (PALs) through
``layer_extra`` instead of forward hooks on the layers.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

# encoders whose layers have BERT's module layout (attention.self.{query,key,value},
# attention.output, intermediate, output) and absolute position embeddings
UNPADDED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta")


def supports_unpadding(encoder) -> bool:
    """Whether ``unpadded_forward`` reproduces this encoder's own forward."""
    cfg = getattr(encoder, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in UNPADDED_MODEL_TYPES:
        return False
    if cfg.is_decoder or getattr(cfg, "position_embedding_type", "absolute") != "absolute":
        return False
    if getattr(cfg, "chunk_size_feed_forward", 0):
        return False
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    return layers is not None and all(
        hasattr(layer, "attention") and hasattr(layer.attention, "self") and hasattr(layer, "intermediate")
        for layer in layers)


class Packing:
    """The real (mask == 1) positions of a (B, T) batch, row-major."""

    def __init__(self, mask: torch.Tensor):
        self.shape = tuple(mask.shape)
        self.padding = mask == 0                                         # (B, T) bool
        self.index = mask.reshape(-1).nonzero().squeeze(1)              # (N,)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (N, C)."""
        return x.reshape(-1, x.shape[-1]).index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C) -> (B, T, C), zeros at padding."""
        out = x.new_zeros(self.shape[0] * self.shape[1], x.shape[-1])
        return out.index_copy(0, self.index, x).view(*self.shape, x.shape[-1])


LayerExtra = Callable[[int, torch.Tensor, Packing], torch.Tensor]


def unpadded_forward(encoder, attention_mask: torch.Tensor, input_ids: torch.Tensor | None = None,
                     token_type_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                     layer_extra: LayerExtra | None = None,
                     layers: list | None = None) -> tuple[torch.Tensor, Packing]:
    """The encoder's last hidden state at the real positions, packed: ((N, H), packing).

    ``layer_extra(i, h_in, packing)``, if given, returns an (N, H) term added to layer i's
    output, where ``h_in`` is that layer's packed input (as a forward hook would see it).
    ``layers`` replaces the encoder's own layer list (a task's own top layers, ``raymtl.model``)."""
    packing = Packing(attention_mask)
    h = packing.pack(encoder.embeddings(input_ids=input_ids, token_type_ids=token_type_ids,
                                        inputs_embeds=inputs_embeds))
    B, T = packing.shape
    keep = attention_mask.bool()[:, None, None, :]                       # (B, 1, 1, T)
    for i, layer in enumerate(encoder.encoder.layer if layers is None else layers):
        att = layer.attention.self
        d = att.attention_head_size

        def heads(proj):                                                 # (N, H) -> (B, heads, T, d)
            return packing.unpack(proj(h)).view(B, T, -1, d).transpose(1, 2)

        ctx = F.scaled_dot_product_attention(
            heads(att.query), heads(att.key), heads(att.value), attn_mask=keep,
            dropout_p=att.dropout.p if att.training else 0.0, scale=att.scaling)
        ctx = packing.pack(ctx.transpose(1, 2).reshape(B, T, -1))       # (N, H)
        out = layer.attention.output(ctx, h)
        out = layer.output(layer.intermediate(out), out)
        if layer_extra is not None:
            out = out + layer_extra(i, h, packing)
        h = out
    return h, packing
