"""DeepSpeed: the engine config built from raymtl's typed config, and checkpoint I/O."""
from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from raymtl.models.device import native_bf16

DS_TAG = "state"


def param_groups(model: torch.nn.Module, cfg) -> tuple[list[dict], list[float]]:
    """AdamW groups: encoder weights (decayed), encoder biases/LayerNorm (not decayed), and the
    task heads at their own, higher learning rate: a fresh linear head on small-norm mean-pooled
    features barely moves at an encoder-sized learning rate. A task's own top layers (copies of
    encoder layers) train like the encoder. Returns (groups, peak lr per group)."""
    enc_decay, enc_plain, heads = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if not name.startswith(("encoder.", "task_layers.")):  # task heads, PALs, loss weights
            heads.append(p)
        elif p.ndim < 2:
            enc_plain.append(p)
        else:
            enc_decay.append(p)
    t = cfg.train
    groups = [({"params": enc_decay, "weight_decay": t.weight_decay}, t.lr),
              ({"params": enc_plain, "weight_decay": 0.0}, t.lr),
              ({"params": heads, "weight_decay": t.weight_decay}, t.head_lr)]
    groups = [(g, lr) for g, lr in groups if g["params"]]
    return [g for g, _ in groups], [lr for _, lr in groups]


def resolve_precision(scale) -> tuple[str, str]:
    """The precision a worker trains in -> (precision, why): ``scale.precision``, with 'auto'
    resolved on the worker's own hardware (bf16 where it is native, else fp32). bf16 asked for
    where it is not native stays bf16, and ``why`` says it is emulated: on a CPU with AVX2
    only, torch's emulated bf16 trained 16x slower than fp32 (docs/performance.md)."""
    if scale.precision not in ("auto", "bf16"):
        return scale.precision, "asked for"
    native, why = native_bf16(scale.use_gpu)
    if scale.precision == "bf16":
        return "bf16", ("asked for" if native else
                        f"asked for; WARNING: not native ({why}), emulated and much slower than fp32: "
                        "--precision auto picks fp32 here")
    return ("bf16" if native else "fp32"), f"auto: {why}"


def deepspeed_config(cfg, peak_lrs: list[float] | None = None, precision: str | None = None,
                     constant_lr: bool = False) -> dict:
    """The DeepSpeed JSON config for one run; ZeRO stage and precision come from ``cfg.scale``
    (``precision``: the resolved one, see ``resolve_precision``). The learning rate warms up
    linearly and decays linearly to 0 at ``steps``; ``constant_lr`` (a stage's choice, e.g. the
    relations map's) keeps it at the peak from step 0."""
    t, s = cfg.train, cfg.scale
    precision = precision or resolve_precision(s)[0]
    peak = peak_lrs or t.lr
    schedule = ({"type": "WarmupLR", "params": {"warmup_min_lr": peak, "warmup_max_lr": peak, "warmup_num_steps": 1}}
                if constant_lr else
                {"type": "WarmupDecayLR", "params": {
                    "total_num_steps": t.steps, "warmup_num_steps": max(1, t.warmup_steps()),
                    "warmup_min_lr": [0.0] * len(peak_lrs) if peak_lrs else 0.0,
                    "warmup_max_lr": peak, "warmup_type": "linear"}})
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size(),
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": s.zero_stage,
                              "stage3_gather_16bit_weights_on_model_save": s.zero_stage == 3},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        # torch_adam: DeepSpeed's own CPU Adam would be compiled at start-up (~100 s here).
        # On CPU, torch's fused AdamW kernel (one pass over all tensors; bench/speed.py).
        "optimizer": {"type": "AdamW", "params": {"lr": t.lr, "weight_decay": t.weight_decay,
                                                  "torch_adam": True,
                                                  **({} if s.use_gpu else {"fused": True})}},
        "scheduler": schedule,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


# The non-tensor objects DeepSpeed (0.19, ZeRO 0-2) pickles into its optimizer state; nothing
# else is allowed when a checkpoint is loaded (``torch.load(weights_only=True)``).
SAFE_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                "deepspeed.runtime.zero.config.ZeroStageEnum",
                "deepspeed.utils.tensor_fragment.fragment_address")


def weights_only_loading(checkpoint_engine) -> None:
    """Make DeepSpeed's checkpoint engine load with ``weights_only=True`` (its own default is
    full pickle, which would run code from a tampered checkpoint)."""

    def allowed():
        out = []
        for name in SAFE_GLOBALS:
            module, _, attr = name.rpartition(".")
            out.append(getattr(importlib.import_module(module), attr))
        return out

    def load(path: str, map_location=None):
        with torch.serialization.safe_globals(allowed()):
            return torch.load(path, map_location=map_location, weights_only=True)
    checkpoint_engine.load = load


STALE_BUILD_LOCK_S = 600       # a torch extension build takes about a minute here


def stale_build_locks(root: str | Path | None = None, older_than_s: float = STALE_BUILD_LOCK_S) -> list[Path]:
    """Lock files of torch extension builds (DeepSpeed JIT-builds its CPU ops into
    ``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) older than ``older_than_s``:
    a build killed midway leaves its ``lock``, and every later build waits on it forever."""
    import time

    from torch.utils.cpp_extension import get_default_build_root
    base = Path(root or os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    now, stale = time.time(), []
    for f in base.glob("*/*/lock") if base.is_dir() else ():
        try:
            if now - f.stat().st_mtime > older_than_s:
                stale.append(f)
        except OSError:                 # the build finished and removed it meanwhile
            pass
    return sorted(stale)


def import_deepspeed():
    """``import deepspeed``, without the MLflow import its autotuner makes whenever MLflow is
    installed (1.5 s of every worker's start-up here; raymtl never runs DeepSpeed's autotuner).
    MLflow stays importable: raymtl's own ``--mlflow`` logging imports it as usual."""
    if "deepspeed" not in sys.modules and "mlflow" not in sys.modules:
        sys.modules["mlflow"] = None            # this import only: `import mlflow` fails fast
        try:
            import deepspeed
        finally:
            del sys.modules["mlflow"]
    import deepspeed
    return deepspeed


def initialize(model: torch.nn.Module, cfg, constant_lr: bool = False):
    """The DeepSpeed engine of one worker; ``engine.raymtl_precision`` is (precision, why)."""
    deepspeed = import_deepspeed()
    for lock in stale_build_locks():
        print(f"[raymtl] warning: {lock} is older than {STALE_BUILD_LOCK_S // 60} min: a torch extension build "
              "killed midway left it, and DeepSpeed's op build will wait on it forever; if no other run is "
              "building, delete it", file=sys.stderr, flush=True)
    groups, peak_lrs = param_groups(model, cfg)
    precision, why = resolve_precision(cfg.scale)
    # DeepSpeed casts the whole module to bf16/fp16 and keeps fp32 masters only of what it
    # trains: a frozen weight (an encoder under train_only_adapters, under the MLM head's
    # warm-up) would be saved rounded, so its fp32 value is kept here (it never changes).
    frozen = ({n: p.detach().float().cpu().clone() for n, p in model.named_parameters() if not p.requires_grad}
              if precision in ("bf16", "fp16") else {})
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups,
                                           config=deepspeed_config(cfg, peak_lrs, precision, constant_lr))
    engine.raymtl_precision, engine.raymtl_frozen = (precision, why), frozen
    weights_only_loading(engine.checkpoint_engine)
    if engine.zero_optimization_stage() == 0 and engine.dp_world_size == 1:
        # One replica: nothing to average, yet DeepSpeed would still flatten, all-reduce and
        # copy back every gradient each step (~3% of a step here).
        engine.enable_backward_allreduce = False
    return engine


def master_weights(engine) -> dict[int, torch.Tensor | None] | None:
    """Collective. In a bf16/fp16 run the module holds low-precision copies and the fp32
    master weights live in DeepSpeed's optimizer (partitioned under ZeRO): ``{id(param): fp32
    CPU tensor}`` (a frozen parameter's: its value before the cast, kept by ``initialize``);
    ``None`` in fp32 runs."""
    if not (engine.bfloat16_enabled() or engine.fp16_enabled()):
        return None
    from deepspeed.utils import safe_get_full_fp32_param
    # ZeRO 0 keeps them in FP16_UnfusedOptimizer's fp32_groups, parallel to its fp16_groups;
    # ZeRO 1-3 link them to the parameters (safe_get_full_fp32_param gathers the partitions).
    opt = engine.optimizer
    unfused = {id(p): hp for lo, hi in zip(getattr(opt, "fp16_groups", []), getattr(opt, "fp32_groups", []))
               for p, hp in zip(lo, hi)}
    frozen, out = getattr(engine, "raymtl_frozen", {}), {}
    for name, p in engine.module.named_parameters():    # the same order on every rank
        hp = (unfused.get(id(p)) if id(p) in unfused else safe_get_full_fp32_param(p) if p.requires_grad
              else frozen.get(name))
        out[id(p)] = None if hp is None else hp.detach().float().cpu()
    return out


def fp32_state(model: torch.nn.Module, masters: dict[int, torch.Tensor | None] | None
               ) -> dict[str, torch.Tensor] | None:
    """The model's state dict with every parameter replaced by its fp32 master and every
    other floating tensor in fp32 (tied parameters share one master); ``None`` without masters."""
    if masters is None:
        return None
    params = dict(model.named_parameters(remove_duplicate=False))
    state = {}
    for k, v in model.state_dict().items():
        master = masters.get(id(params[k])) if k in params else None
        state[k] = master if master is not None else (v.detach().float() if v.is_floating_point() else v)
    return state


def save_checkpoint(engine, directory: Path, step: int, rank: int, tokenizer, cfg_dict: dict,
                    metrics: dict, client: dict | None = None, override: dict | None = None) -> None:
    """Collective: every rank writes its DeepSpeed shard; rank 0 also writes the HF model, in
    fp32 whatever the training precision (a bf16 run's fp32 master weights, not its bf16 copies).
    ``client`` (plain lists, numbers, strings, tensors) is stored next to the step for the loop;
    ``override`` ({name: fp32 tensor}) replaces those parameters in the HF model only (ZeRO 0-2)."""
    engine.save_checkpoint(str(directory / "deepspeed"), tag=DS_TAG, client_state={**(client or {}), "step": step})
    model = engine.module
    extra = {"step": step, "max_length": cfg_dict["data"]["max_length"]}
    masters = master_weights(engine)
    if engine.zero_optimization_stage() == 3:
        deepspeed = import_deepspeed()
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            if rank == 0:
                model.save(directory, tokenizer, extra=extra, state=fp32_state(model, masters))
    elif rank == 0:
        state = fp32_state(model, masters)
        if override:
            state = state or {k: v.detach().float() if v.is_floating_point() else v for k, v in model.state_dict().items()}
            state.update(override)
        model.save(directory, tokenizer, extra=extra, state=state)
    if rank == 0:
        (directory / "config.json").write_text(json.dumps(cfg_dict, indent=2))
        (directory / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if dist.is_initialized():
        dist.barrier()


def load_checkpoint(engine, directory: Path, total_steps: int) -> dict:
    """Restore engine weights, optimizer and scheduler; returns the client state saved with
    them: ``step`` (the step to continue from) and the loop's own entries.

    The restored schedule is stretched to ``total_steps``, so re-running with more
    steps continues the decay over the new horizon instead of sitting at lr 0.
    """
    _, client = engine.load_checkpoint(str(directory / "deepspeed"), tag=DS_TAG)
    if client is None:
        raise RuntimeError(f"could not load DeepSpeed state from {directory / 'deepspeed'}")
    if hasattr(engine.lr_scheduler, "total_num_steps"):
        engine.lr_scheduler.total_num_steps = total_steps
    return {**client, "step": int(client["step"])}
