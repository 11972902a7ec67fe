"""Task prefixes (CompassMTL, Zhang et al. 2022): tell the shared encoder which task it serves.

Two kinds, switchable per run with ``--task-prefix``:

* ``text``: a plain-text prefix ("sst: ...") prepended to every input at tokenization
  (``text_prefix``; no parameters);
* ``learned``: ``length`` trainable vectors per task inserted after ``[CLS]`` in the
  embedding sequence (``TaskPrefix``), saved with the heads.
"""
from __future__ import annotations

import torch
from torch import nn


def text_prefix(task: str) -> str:
    return f"{task} : "


class TaskPrefix(nn.Module):
    def __init__(self, tasks: list[str], hidden: int, length: int):
        super().__init__()
        self.length = length
        self.vectors = nn.ParameterDict({t: nn.Parameter(torch.randn(length, hidden) * 0.02) for t in tasks})

    def forward(self, task: str, encoder, ids, mask, tt) -> dict[str, torch.Tensor]:
        """Encoder kwargs with the task's vectors spliced in after [CLS]: (B, T) -> (B, T + P)."""
        emb = encoder.get_input_embeddings()(ids)                    # (B, T, H)
        B, P = ids.shape[0], self.length
        pre = self.vectors[task].to(emb.dtype).unsqueeze(0).expand(B, P, -1)
        embeds = torch.cat([emb[:, :1], pre, emb[:, 1:]], 1)          # (B, T + P, H)
        ones = mask.new_ones(B, P)
        mask = torch.cat([mask[:, :1], ones, mask[:, 1:]], 1)
        tt = torch.cat([tt[:, :1], torch.zeros_like(ones), tt[:, 1:]], 1) if tt is not None else None
        return {"inputs_embeds": embeds, "attention_mask": mask, "token_type_ids": tt}
