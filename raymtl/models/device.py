"""Where a model runs, and in which precision.

Every place that runs a model (training, validation, teacher inference, ``raymtl
predict``/``evaluate``, the relations map, bench scripts) hands it batches through
``to_device``, which puts them on the device of the model's parameters; the models'
``forward`` calls ``check_device``, so a batch that skipped it fails at once with a message
instead of deep inside a CUDA kernel. Outputs are cast to fp32 (``.float()``) before losses
and metrics, so bf16 runs compute those in full precision.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

DEVICES = ("auto", "cpu", "cuda")


class DeviceMismatch(RuntimeError):
    """A batch reached a model on another device than its parameters."""


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's parameters (its buffers' if it has none; else the CPU)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def to_device(batch: dict, model_or_device: nn.Module | torch.device | str) -> dict:
    """The batch with every tensor on the model's device (other values as they are)."""
    device = (model_device(model_or_device) if isinstance(model_or_device, nn.Module)
              else torch.device(model_or_device))
    return {k: v.to(device, non_blocking=device.type == "cuda") if torch.is_tensor(v) else v
            for k, v in batch.items()}


def check_device(batch: dict, model: nn.Module) -> None:
    """Raise ``DeviceMismatch`` naming the first tensor of ``batch`` not on the model's device."""
    device = model_device(model)
    for k, v in batch.items():
        if torch.is_tensor(v) and v.device != device:
            raise DeviceMismatch(f"batch tensor {k!r} is on {v.device} but {type(model).__name__} is on "
                                 f"{device}: pass batches through raymtl.models.device.to_device")


def resolve_device(name: str = "auto") -> torch.device:
    """'auto': the first GPU if there is one, else the CPU; 'cuda' (or 'cuda:N') without a
    GPU is an error, never a silent fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not (name == "cpu" or name == "cuda" or name.startswith("cuda:")):
        raise ValueError(f"device {name!r}: valid are {', '.join(DEVICES)} or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no GPU (torch {torch.__version__}, "
                         f"CUDA build: {torch.version.cuda is not None})")
    return torch.device(name)


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16(use_gpu: bool) -> tuple[bool, str]:
    """Whether the hardware computes bf16 natively -> (yes/no, why): a GPU of compute
    capability 8.0 or higher, or a CPU with AVX512-BF16 or AMX-BF16 (without them torch
    emulates bf16 on the CPU, slower than fp32)."""
    if use_gpu:
        if not torch.cuda.is_available():
            return False, "no GPU visible to torch"
        major, minor = torch.cuda.get_device_capability()
        return major >= 8, f"GPU compute capability {major}.{minor}"
    flags = cpu_flags() & {"avx512_bf16", "amx_bf16"}
    return bool(flags), ("CPU flags " + ", ".join(sorted(flags))) if flags else "CPU without AVX512-BF16/AMX-BF16"
