"""GPU-path check: the parts of a training step that differ on a GPU, without Ray.

    python scripts/gpu_check.py            # on a machine with a CUDA GPU; ~1 min

raymtl's DeepSpeed engine (``raymtl.train.engine.initialize``: the same config builder as every
run) over the multi-task model (tiny random BERT), on one GPU with the NCCL backend, in
``--precision bf16`` and fp16, for ZeRO stages 0-3, with plain summed losses and with PCGrad
fusion (ZeRO 0-2), and distillation batches carrying teacher logits. Asserts finite losses
that go down on a repeated batch, bf16/fp16 weights on the GPU, and prints step times.
CI has no GPU; this is run by hand (it was run on an H100, see README "Scaling out").
"""
import os
import time

import torch


def batch(task: str, B: int, T: int, device, kind: str, n_classes: int) -> dict:
    g = torch.Generator().manual_seed(hash(task) % 1000)
    ids = torch.randint(1000, 30000, (B, T), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones(B, T, dtype=torch.long),
           "token_type_ids": torch.zeros(B, T, dtype=torch.long),
           "input_ids_b": torch.randint(1000, 30000, (B, T), generator=g),
           "attention_mask_b": torch.ones(B, T, dtype=torch.long)}
    if kind == "classifier":
        out["label"] = torch.randint(0, n_classes, (B,), generator=g).float()
        out["teacher"] = torch.randn(B, n_classes, generator=g)
    else:
        out["label"] = torch.rand(B, generator=g) * 5
        out["teacher"] = torch.rand(B, 1, generator=g)
    return {k: v.to(device) for k, v in out.items()}


def main() -> int:
    import deepspeed
    from raymtl.objectives.multitask import task_loss

    import raymtl.train.engine as eng
    from raymtl.config import smoke
    from raymtl.methods.fusion import fused_surrogate, make_fusion
    from raymtl.models.multitask import MultiTaskModel
    assert torch.cuda.is_available(), "no CUDA GPU here"
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29531")
    deepspeed.init_distributed(dist_backend="nccl")
    device = torch.device("cuda", 0)
    print(f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; deepspeed {deepspeed.__version__}; "
          f"backend {torch.distributed.get_backend()}")
    ok = True
    for precision in ("bf16", "fp16"):
        for zero in (0, 1, 2, 3):
            for fusion in ("sum", "pcgrad"):
                if fusion != "sum" and zero == 3:
                    continue
                cfg = smoke().replace(use_gpu=True, precision=precision, zero_stage=zero, fusion=fusion,
                                      teacher_outputs={}, steps=20, batch_size=16)
                model = MultiTaskModel.from_config(cfg.model, list(cfg.data.tasks), seed=0)
                engine = eng.initialize(model, cfg)
                fwd = engine.module if fusion != "sum" else engine
                tasks = list(cfg.data.tasks)
                shared = [p for n, p in model.named_parameters() if n.startswith("encoder.")]
                others = [p for n, p in model.named_parameters() if not n.startswith("encoder.")]
                fuse = make_fusion(fusion, len(tasks)) if fusion != "sum" else None
                data = {t: batch(t, 16, 32, device, model.heads[t].kind, model.heads[t].spec.num_labels)
                        for t in tasks}
                losses_seen, times = [], []
                for step in range(12):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    losses = {t: task_loss(model.heads[t].kind, fwd(t, data[t]).float(), data[t], 0.5, 2.0)
                              for t in tasks}
                    total = sum(losses.values())
                    if fuse is None:
                        engine.backward(total)
                    else:
                        engine.backward(fused_surrogate(losses, shared, others, fuse, {}))
                    engine.step()
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                    losses_seen.append(total.item())
                dtype = next(p for p in engine.module.parameters() if p.numel() > 0).dtype
                finite = all(map(lambda x: x == x and abs(x) < 1e6, losses_seen))
                down = losses_seen[-1] < losses_seen[0]
                good = finite and down and dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
                ok &= good
                print(f"{precision} zero{zero} {fusion:<6}: loss {losses_seen[0]:.3f} -> {losses_seen[-1]:.3f}, "
                      f"weights {dtype}, median step {sorted(times[2:])[len(times[2:]) // 2] * 1000:.1f} ms "
                      f"{'OK' if good else 'FAILED'}", flush=True)
                del engine, model
                torch.cuda.empty_cache()
    print("ALL OK" if ok else "SOME FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
