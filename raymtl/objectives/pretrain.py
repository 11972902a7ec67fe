"""Further pre-training objectives, one short function each.

    mask_tokens / mlm_loss   BERT masked language modelling (Devlin et al. 2019): 15 % of the
                             non-special tokens are targets; of those 80 % become [MASK], 10 % a
                             random token, 10 % stay unchanged. Masks are drawn per batch
                             ("dynamic masking", Liu et al. 2019, RoBERTa).
    simcse_unsup_loss        SimCSE (Gao et al. 2021), unsupervised: the same sentence encoded
                             twice with different dropout is the positive, the other sentences
                             of the batch are the negatives.
    simcse_sup_loss          SimCSE, supervised: NLI premise -> entailment hypothesis is the
                             positive, contradiction hypotheses are hard negatives.

With several data-parallel workers the keys (positives, negatives) are gathered from every
worker (``gather_with_grad``): each worker scores its own queries against B x world keys.
The gathered copies carry no gradient; the local slot is the local tensor itself, so the
gradient through this worker's own keys is kept (as in the SimCSE reference code).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

IGNORE = -100    # label of positions that are not MLM targets (the cross-entropy ignore index)


def mask_tokens(ids: torch.Tensor, special: torch.Tensor, mask_id: int, vocab_size: int,
                prob: float = 0.15, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) token ids, (B, T) bool "never mask" (special tokens, padding)
    -> (B, T) corrupted inputs, (B, T) labels (the original id at targets, else -100)."""
    p = torch.full(ids.shape, prob).masked_fill(special.cpu(), 0.0)
    target = torch.bernoulli(p, generator=generator).bool().to(ids.device)          # (B, T)
    r = torch.rand(ids.shape, generator=generator).to(ids.device)                   # (B, T)
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator).to(ids.device)
    inputs = torch.where(target & (r < 0.8), torch.full_like(ids, mask_id), ids)
    inputs = torch.where(target & (r >= 0.8) & (r < 0.9), random_ids, inputs)
    return inputs, ids.masked_fill(~target, IGNORE)


def mlm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N, V) logits at the N target positions, (N,) original ids -> mean cross-entropy.
    A batch without a target (possible for a few very short rows) contributes 0."""
    if targets.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), targets)


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B, H) on each of W workers -> ((W * B, H) in rank order, offset of this worker's rows).
    Other workers' rows are detached copies; this worker's rows are ``x`` itself."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    world, rank = dist.get_world_size(), dist.get_rank()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = x
    return torch.cat(parts), rank * x.shape[0]


def info_nce(queries: torch.Tensor, keys: torch.Tensor, targets: torch.Tensor,
             temperature: float) -> torch.Tensor:
    """(B, H) queries, (K, H) keys, (B,) index of each query's positive key -> cross-entropy
    over cosine similarities / temperature."""
    sim = F.normalize(queries.float(), dim=-1) @ F.normalize(keys.float(), dim=-1).T   # (B, K)
    return F.cross_entropy(sim / temperature, targets)


def simcse_unsup_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.05,
                      gather: bool = True) -> torch.Tensor:
    """(B, H) first and (B, H) second dropout view of the same sentences -> loss."""
    keys, offset = gather_with_grad(z2) if gather else (z2, 0)                    # (W*B, H)
    targets = offset + torch.arange(len(z1), device=z1.device)
    return info_nce(z1, keys, targets, temperature)


def simcse_sup_loss(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                    temperature: float = 0.05, gather: bool = True) -> torch.Tensor:
    """(B, H) premises, (B, H) entailment and (B, H) contradiction hypotheses -> loss.
    Every premise's keys: all positives and all hard negatives (of every worker)."""
    pos, offset = gather_with_grad(positive) if gather else (positive, 0)         # (W*B, H)
    neg, _ = gather_with_grad(negative) if gather else (negative, 0)              # (W*B, H)
    targets = offset + torch.arange(len(anchor), device=anchor.device)
    return info_nce(anchor, torch.cat([pos, neg]), targets, temperature)
