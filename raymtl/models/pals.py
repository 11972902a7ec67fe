"""PALs: Projected Attention Layers (Stickland & Murray 2019, "BERT and PALs").

Each encoder layer gets, per task, a small attention block in parallel to it, working in a
low-rank space: ``h_out = layer(h) + V_D · MHA(V_E · h)``, with ``V_E: H -> r`` and
``V_D: r -> H`` shared across layers (as in the paper) and one attention per layer and task.
The decoder starts at zero, so a fresh PAL leaves the encoder's output unchanged.

litgpt shape: ``PALConfig`` adds only its fields; ``add_pals`` attaches the modules;
``mark_only_pals_as_trainable`` freezes the rest (heads stay trainable);
``pal_state_dict`` is the filter deciding which weights go in ``adapters.safetensors``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class PALConfig:
    # Sized for the default encoder (MiniLM-L6, hidden size 384); the paper's BERT-base (768)
    # used r = 204 with 12 heads. ModelConfig's pal_rank / pal_heads take these defaults.
    rank: int = 96
    heads: int = 8
    tasks: tuple[str, ...] = ()   # the tasks that get PALs; empty = every task of the model

    def __post_init__(self):
        self.tasks = tuple(self.tasks)
        if self.rank <= 0 or self.heads <= 0 or self.rank % self.heads:
            raise ValueError(f"pal_rank={self.rank} must be a positive multiple of pal_heads={self.heads}")


class PAL(nn.Module):
    """Low-rank multi-head self-attention for one task in one layer."""

    def __init__(self, rank: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(rank, heads, batch_first=True)

    def forward(self, z: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """(B, T, r), (B, T) bool padding -> (B, T, r)."""
        return self.attn(z, z, z, key_padding_mask=pad, need_weights=False)[0]


class TaskPALs(nn.Module):
    """One task's PALs across all layers, with its shared encoder/decoder projections."""

    def __init__(self, hidden: int, layers: int, cfg: PALConfig):
        super().__init__()
        self.enc = nn.Linear(hidden, cfg.rank, bias=False)          # V_E
        self.dec = nn.Linear(cfg.rank, hidden, bias=False)          # V_D
        nn.init.zeros_(self.dec.weight)
        self.layers = nn.ModuleList(PAL(cfg.rank, cfg.heads) for _ in range(layers))

    def forward(self, i: int, h: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        return self.dec(self.layers[i](self.enc(h), pad))           # (B, T, H)

    def forward_packed(self, i: int, h: torch.Tensor, packing) -> torch.Tensor:
        """The same on packed real tokens (``raymtl.models.unpad``): (N, H) -> (N, H)."""
        z = self.layers[i](packing.unpack(self.enc(h)), packing.padding)
        return self.dec(packing.pack(z))


def add_pals(model, tasks: list[str], cfg: PALConfig) -> None:
    """Attach ``model.pals[task]`` (for ``cfg.tasks`` if set) and hook every encoder layer to
    add the active task's PAL; a task without PALs runs the plain encoder. (The unpadded
    forward calls no layer module, so no hook fires there: ``MultiTaskModel.embed`` passes
    ``TaskPALs.forward_packed`` as its ``layer_extra``.)"""
    if cfg.tasks:
        tasks = [t for t in tasks if t in cfg.tasks]
    enc = model.encoder
    layers = enc.encoder.layer
    model.pals = nn.ModuleDict({t: TaskPALs(enc.config.hidden_size, len(layers), cfg) for t in tasks})
    model.pal_config = cfg

    def hook(i):
        def add_pal(module, args, kwargs, output):
            task, pad = model.active_task, model.active_padding
            if task is None or task not in model.pals:
                return output
            h_in = args[0] if args else kwargs["hidden_states"]
            extra = model.pals[task](i, h_in, pad)
            if isinstance(output, tuple):
                return (output[0] + extra, *output[1:])
            return output + extra
        return add_pal

    own = [(len(layers) - len(ls) + j, layer) for ls in getattr(model, "task_layers", {}).values()
           for j, layer in enumerate(ls)]                 # a task's own top layers (raymtl.model)
    for i, layer in [*enumerate(layers), *own]:
        layer.register_forward_hook(hook(i), with_kwargs=True)


def mark_only_pals_as_trainable(model) -> None:
    for name, p in model.named_parameters():
        p.requires_grad = not name.startswith("encoder.")


def pal_state_dict(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.startswith("pals.")}
