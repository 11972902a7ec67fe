"""Model merging: one multi-task checkpoint from single-task checkpoints of the same base
encoder, the baseline joint training has to beat (``raymtl merge``).

A checkpoint's task vector is its encoder's weights minus the base encoder's (Ilharco et al.
2023, "Editing Models with Task Arithmetic"). The merged encoder is the base plus ``scale``
times the combined task vectors:

* ``task_arithmetic``: their sum (``scale`` default 1/k for k checkpoints: weight averaging);
* ``ties`` (Yadav et al. 2023, "TIES-Merging"): each task vector trimmed to its ``density``
  largest-magnitude entries per tensor, a sign elected per entry (the sign of the trimmed
  vectors' sum), then the mean of the trimmed entries that agree with it (``scale`` default 1).

Each checkpoint's heads come over unchanged. PALs, learned prefixes and tasks' own layers are
per-task parts trained against that checkpoint's encoder; merging refuses them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from raymtl.models.encoder import build_encoder
from raymtl.models.multitask import MultiTaskModel, read_meta

Merge = Callable[[list[torch.Tensor], float, float], torch.Tensor]


def task_arithmetic(vectors: list[torch.Tensor], scale: float, density: float) -> torch.Tensor:
    return scale * torch.stack(vectors).sum(0)


def ties(vectors: list[torch.Tensor], scale: float, density: float) -> torch.Tensor:
    trimmed = []
    for v in vectors:
        k = max(1, int(round(density * v.numel())))
        cut = v.abs().flatten().kthvalue(v.numel() - k + 1).values if k < v.numel() else -1.0
        trimmed.append(torch.where(v.abs() >= cut, v, torch.zeros_like(v)))
    t = torch.stack(trimmed)
    sign = torch.sign(t.sum(0))
    agree = (torch.sign(t) == sign) & (t != 0)
    return scale * (t * agree).sum(0) / agree.sum(0).clamp(min=1)


MERGE_METHODS: dict[str, Merge] = {"task_arithmetic": task_arithmetic, "ties": ties}
DEFAULT_DENSITY = 0.2            # TIES' k: the share of each task vector kept (the paper's 20 %)


def checkpoint_base(directory: Path) -> tuple[str, int]:
    """(encoder the checkpoint was fine-tuned from, its seed): ``init_from`` if the run started
    from a raymtl checkpoint, else the encoder name; the seed matters only for 'tiny-random'."""
    meta = read_meta(directory)
    cfg_file = directory / "config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    init_from = cfg.get("model", {}).get("init_from", "")
    return (f"{init_from}/encoder" if init_from else meta["source"]), int(cfg.get("train", {}).get("seed", 0))


def merge(checkpoints: list[str | Path], output: str | Path, method: str = "task_arithmetic",
          scale: float | None = None, density: float = DEFAULT_DENSITY, base: str | None = None,
          say=print) -> Path:
    """Merge ``checkpoints`` into a raymtl checkpoint at ``output``; returns its path."""
    if method not in MERGE_METHODS:
        raise ValueError(f"merge method {method!r}: valid are {sorted(MERGE_METHODS)}")
    if len(checkpoints) < 2:
        raise ValueError(f"merge needs at least two checkpoints, got {len(checkpoints)}")
    if not 0 < density <= 1:
        raise ValueError(f"density={density!r} must be in (0, 1]")
    dirs = [Path(c) for c in checkpoints]
    o = Path(output)
    if o.exists() and any(o.iterdir()):
        raise ValueError(f"output {o} exists and is not empty: choose a new directory")
    bases = {d: checkpoint_base(d) for d in dirs}
    if base is None:
        if len(set(bases.values())) > 1:
            raise ValueError("the checkpoints were fine-tuned from different base encoders ("
                             + "; ".join(f"{d}: {b}" + (f" seed {s}" if b == "tiny-random" else "")
                                         for d, (b, s) in bases.items())
                             + "); task vectors of different bases do not add up. Merge checkpoints of one base, "
                             "or name it with --base")
        base, seed = bases[dirs[0]]
    else:
        seed = bases[dirs[0]][1]
    models = [MultiTaskModel.load(d) for d in dirs]
    seen: dict[str, Path] = {}
    for d, m in zip(dirs, models):
        for t in m.heads:
            if t in seen:
                raise ValueError(f"task {t!r} has a head in both {seen[t]} and {d}: merge checkpoints of different tasks")
            seen[t] = d
        if m.pal_settings or m.prefix is not None or len(m.task_layers):
            raise ValueError(f"{d} has per-task parts besides its heads (PALs, learned prefixes or own layers), "
                             "trained against its own encoder: merge checkpoints of the plain encoder "
                             "(jobs/mtl.py --preset single-<task>)")
    base_encoder = build_encoder(base, seed)
    base_state = base_encoder.state_dict()
    for d, m in zip(dirs, models):
        theirs = m.encoder.state_dict()
        if theirs.keys() != base_state.keys() or any(theirs[k].shape != v.shape for k, v in base_state.items()):
            raise ValueError(f"{d}: its encoder's weights do not match the base {base!r} (other names or shapes); "
                             "it was not fine-tuned from that base")
    scale = (1.0 / len(models) if method == "task_arithmetic" else 1.0) if scale is None else scale
    combine = MERGE_METHODS[method]
    states = [m.encoder.state_dict() for m in models]
    merged = {}
    for k, v in base_state.items():
        if not v.is_floating_point():
            merged[k] = v
            continue
        vectors = [st[k].float() - v.float() for st in states]
        merged[k] = v.float() + combine(vectors, scale, density)
    base_encoder.load_state_dict(merged)
    first = models[0]
    modes = {t: mode for m in models for t, mode in m.modes.items() if mode}
    out = MultiTaskModel(base_encoder, list(seen), modes, first.pooling, first.heads[next(iter(first.heads))].drop.p,
                         source=first.source, task_pooling={t: p for m in models for t, p in m.task_pooling.items()},
                         unpad=first.unpad)
    heads = {k: v for m in models for k, v in m.state_dict().items() if k.startswith("heads.")}
    out.load_state_dict(heads, strict=False)
    o.mkdir(parents=True, exist_ok=True)
    from transformers import AutoTokenizer
    first_meta = read_meta(dirs[0])
    out.save(o, AutoTokenizer.from_pretrained(str(dirs[0] / "encoder")),
             extra={"max_length": first_meta.get("max_length", 128)})
    cfg_file = dirs[0] / "config.json"
    if cfg_file.is_file():            # evaluate without files reads the data settings (the split) from it
        cfg = json.loads(cfg_file.read_text())
        cfg.setdefault("data", {})["tasks"] = list(seen)
        (o / "config.json").write_text(json.dumps(cfg, indent=2))
    (o / "merge.json").write_text(json.dumps({
        "method": method, "scale": scale, "density": density if method == "ties" else None, "base": base,
        "checkpoints": {t: str(d) for t, d in seen.items()}}, indent=2))
    say(f"[raymtl] merged {len(models)} checkpoints ({', '.join(seen)}) by {method} (scale {scale:g}"
        f"{f', density {density:g}' if method == 'ties' else ''}) onto {base}: {o}")
    return o

