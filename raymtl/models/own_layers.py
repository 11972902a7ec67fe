"""A task's own top layers: copies of the encoder's top N layers that one task's rows run
instead of the shared ones (the layers below stay shared), trained by that task's gradient
alone. ``task_layers`` gives N per task, or a share of the encoder's depth ('half').
Checkpoint keys: ``task_layers.<task>.<i>.*`` in ``heads.safetensors``.
"""
from __future__ import annotations

import copy

from torch import nn

from raymtl.config import LAYER_SHARES

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
