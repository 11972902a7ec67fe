"""One real training step per fusion method, in one process without Ray; prints one JSON
line per case. ``tests/test_fusion_train.py`` runs it in a subprocess (DeepSpeed's 1-process
gloo group must not leak into the pytest process that later drives Ray) and asserts on it.

    .venv/bin/python tests/fused_step.py --methods pcgrad,imtl_g --stages 0,2   # ~1 min here

Every case builds the smoke model (tiny random BERT with the multi-task default's PALs and
own SST layers) through ``MTLStage`` and raymtl's DeepSpeed engine, and takes fixed batches
of the three tasks. From the same per-task losses it computes

* the expected gradient: each task's gradient of the shared (``encoder.*``) parameters
  flattened into the ``[T, D]`` matrix, and the method applied to that matrix directly
  (a fresh instance, the same random state as the step);
* the real step, as ``raymtl.train.loop.train_loop_per_worker`` takes it:
  ``fused_surrogate`` (``fusion_every`` 1) or ``PeriodicFusion.loss`` (``fusion_every`` 10,
  its refresh step 0 and the step after it, which reuses step 0's weights),
  ``engine.backward``, ``engine.step``.

and reports the largest difference, relative to the expected gradient's largest entry, of

* ``grad``: the shared gradient DeepSpeed holds before its step (``safe_get_full_grad``; ZeRO-2
  keeps it in its partitioned buffers, not in ``p.grad``);
* ``moment``: AdamW's first moment after the step, ``(1 - beta1) x`` the gradient it stepped
  on (the first step; global clipping scales every gradient by the same factor, computed here);
* ``others``: the other parameters' (heads, PALs, SST's own layers) gradient against the plain
  gradient of the summed losses;

and ``vs_sum``: how far the expected gradient is from the plain sum (a method that changed
nothing on these batches would pass vacuously).
"""
from __future__ import annotations

import argparse
import json
import os

import torch

# (text_a, text_b, label). For a random model the words hardly matter; the labels are chosen
# so that at the smoke model's seed every pair of task gradients conflicts (cosines about
# -0.20, -0.08, -0.04): PCGrad and GradVac project, and no method is the plain sum.
ROWS = {
    "sst": [("a gripping , beautifully acted film", "", 0), ("dull and far too long", "", 4),
            ("it has its moments", "", 2), ("the worst script of the year", "", 4)],
    "quora": [("how do i learn python ?", "what is the best way to learn python ?", 1),
              ("why is the sky blue ?", "how do planes fly ?", 1),
              ("what is a black hole ?", "what are black holes ?", 1),
              ("how to cook rice ?", "is rice healthy ?", 1)],
    "sts": [("a man is playing a guitar .", "a man plays the guitar .", 4.8),
            ("a dog runs in the park .", "a cat sleeps on the sofa .", 0.4),
            ("the woman is slicing onions .", "a woman cuts an onion .", 4.2),
            ("kids are playing football .", "the market closed higher .", 0.0)],
}


def flat(tensors, params) -> torch.Tensor:
    return torch.cat([(t if t is not None else torch.zeros_like(p)).reshape(-1).float()
                      for t, p in zip(tensors, params)])


def first_moments(engine, params) -> list[torch.Tensor]:
    """AdamW's ``exp_avg`` of each of ``params``: torch's own state under ZeRO 0; under ZeRO 1-2
    the slice of its flat partition. (DeepSpeed 0.19 links those slices after stepping its
    first parameter group, before the others have any state: re-link every group.)"""
    from deepspeed.utils import lazy_init_hp_params_optimizer_state, safe_get_full_optimizer_state
    opt = engine.optimizer
    if engine.zero_optimization_stage() == 0:
        return [opt.state[p]["exp_avg"] for p in params]
    for lp, hp in zip(opt.bit16_groups, opt.single_partition_of_fp32_groups):
        lazy_init_hp_params_optimizer_state(lp, hp, opt.optimizer.state)
    return [safe_get_full_optimizer_state(p, "exp_avg") for p in params]


def run_case(method: str, stage: int, every: int, seed: int = 5) -> list[dict]:
    from deepspeed.utils import safe_get_full_grad
    from transformers import AutoTokenizer

    import raymtl.train.engine as eng
    from raymtl.config import smoke
    from raymtl.data.multitask import batch_from_rows
    from raymtl.methods.fusion import PeriodicFusion, make_fusion, task_weights
    from raymtl.models.encoder import tokenizer_source
    from raymtl.stages.multitask import MTLStage
    from raymtl.train.loop import backward

    cfg = smoke().replace(fusion=method, fusion_every=every, zero_stage=stage, num_workers=1)
    stage_ = MTLStage(cfg, {t: 100 for t in cfg.data.tasks})
    model = stage_.build_model()
    tok = AutoTokenizer.from_pretrained(tokenizer_source(cfg.model.encoder))
    batches = {t: batch_from_rows(tok, [{"text_a": a, "text_b": b, "label": y, "line": i}
                                        for i, (a, b, y) in enumerate(ROWS[t])], model.modes[t],
                                  cfg.data.max_length) for t in stage_.tasks}
    # the loop's split (raymtl.train.loop, section 2)
    shared = [p for n, p in model.named_parameters() if n.startswith("encoder.") and p.requires_grad]
    others = [p for n, p in model.named_parameters() if not n.startswith("encoder.") and p.requires_grad]
    fuse = make_fusion(method, len(stage_.sizes), cfg.train.cagrad_c) if cfg.train.per_task_gradients() else None
    periodic = (PeriodicFusion(fuse, every, model.own_parameters(), weigh_owners=cfg.train.weigh_own_params)
                if fuse and every > 1 else None)
    engine = eng.initialize(model, cfg)
    held, out = None, []
    for step in (0, 1) if every > 1 else (0,):
        torch.manual_seed(100 + step)                             # dropout on, as in training
        losses = {t: stage_.loss(engine.module, t, b, step) for t, b in batches.items()}
        G = torch.stack([flat(torch.autograd.grad(v, shared, retain_graph=True, allow_unused=True), shared)
                         for v in losses.values()])              # [T, D]
        if periodic is not None:      # its hooks rescale own gradients by the last loss call's 1 / w_t:
            periodic.unweigh = {}     # not this reference backward's
        plain_others = flat(torch.autograd.grad(sum(losses.values()), others, retain_graph=True,
                                                allow_unused=True), others)
        if held is None:   # the method's weights of the matrix (a fresh instance: stateful ones start equal)
            torch.manual_seed(seed)
            held = task_weights(make_fusion(method, len(losses), cfg.train.cagrad_c), G)
        expected = held @ G                                       # in between: the held weights
        torch.manual_seed(seed)                                   # the same task orders (PCGrad, GradVac)
        backward(engine, model, losses, step, shared, others, fuse, periodic)   # the loop's own step
        got = flat([safe_get_full_grad(p) for p in shared], shared)
        got_others = flat([safe_get_full_grad(p) for p in others], others)
        unit = torch.nn.functional.normalize(G, dim=1)
        cos = [float(unit[i] @ unit[j]) for i in range(len(G)) for j in range(i + 1, len(G))]
        scale = float(expected.abs().max())
        total = float(torch.cat([expected, plain_others]).norm())
        clip = min(1.0, cfg.train.grad_clip / (total + 1e-6)) if cfg.train.grad_clip else 1.0
        moment_err = None
        if step == 0:
            engine.step()                                         # the first AdamW step: m = (1 - b1) g
            moment = flat(first_moments(engine, shared), shared)
            beta1 = engine.optimizer.param_groups[0]["betas"][0]
            moment_err = float((moment / (1 - beta1) / clip - expected).abs().max()) / scale
        else:
            engine.zero_grad()
        out.append({"method": method, "zero_stage": stage, "fusion_every": every, "step": step,
                    "grad": float((got - expected).abs().max()) / scale, "moment": moment_err,
                    "others": float((got_others - plain_others).abs().max()) / float(plain_others.abs().max()),
                    "vs_sum": float((expected - G.sum(0)).abs().max()) / scale, "cos": cos, "scale": scale,
                    "clip": clip})
    return out


def main(argv=None) -> None:
    from raymtl.methods.fusion import FUSION_METHODS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(sorted(FUSION_METHODS)))
    p.add_argument("--stages", default="0,2", help="ZeRO stages, fusion_every 1")
    p.add_argument("--periodic-stage", type=int, default=0, help="ZeRO stage of the fusion_every 10 cases")
    p.add_argument("--port", type=int, default=29575, help="port of the 1-process gloo group")
    a = p.parse_args(argv)
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(a.port)}.items():
        os.environ.setdefault(k, v)
    torch.set_num_threads(1)
    for method in a.methods.split(","):
        cases = [(int(s), 1) for s in a.stages.split(",")] + [(a.periodic_stage, 10)]
        for stage, every in cases:
            for row in run_case(method, stage, every):
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
