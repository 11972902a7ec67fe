"""What a stage of the recipe is: the typed plug-in the shared loop runs.

A stage owns what differs between stages: its config class (and so its config section,
defaults and smoke settings), its data preparation on the driver, its model, its loss per
stream and its validation. ``raymtl.train.loop.train_loop_per_worker`` owns what they share
(seeds, DeepSpeed, sampling, weighting and fusion of the per-stream losses, progress,
validation/checkpoint/report, resume), and ``raymtl.train.trainer.fit`` is the one driver.

Life of a stage: on the driver, ``prepare(cfg)`` reads and tokenizes its data into Ray
datasets (``train_<stream>`` are split across workers, the others are read whole) and counts
the training rows per stream; in each worker the loop builds the stage from the config dict
(``from_loop_config``), then calls ``build_model``, ``streams``, and per step ``loss`` for
each sampled stream, and ``validate`` every ``eval_every`` steps. ``loss`` and ``validate``
depend only on the config and their arguments, never on an earlier call.
"""
from __future__ import annotations

import abc
from typing import ClassVar, Iterator

import torch
from torch import nn

from raymtl.config import MTLConfig


class Stage(abc.ABC):
    name: ClassVar[str]                  # as in job names and logs: 'mtl', 'pretrain'
    config_class: ClassVar[type[MTLConfig]]
    score: ClassVar[str]                 # metric that ranks checkpoints (higher is better)
    validate_at_start: ClassVar[bool] = False    # also validate before step 0 (<metric>_step0)
    constant_lr: ClassVar[bool] = False          # the learning rate stays at its peak (no warm-up, no decay)

    def __init__(self, cfg: MTLConfig, sizes: dict[str, int]):
        if not isinstance(cfg, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(cfg).__name__}")
        self.cfg, self.sizes = cfg, dict(sizes)      # sizes: training rows per stream (the task sampler's input)

    @classmethod
    def from_loop_config(cls, config: dict) -> "Stage":
        """The stage inside a worker, from ``train_loop_config`` (``cfg`` dict, ``train_sizes``)."""
        return cls(cls.config_class.from_dict(config["cfg"]), config["train_sizes"])

    # ------------------------------------------------------------------ driver side
    @classmethod
    @abc.abstractmethod
    def prepare(cls, cfg: MTLConfig, verbose: bool = True) -> tuple[dict, dict[str, int]]:
        """Read, validate and tokenize the stage's data -> (Ray datasets, training rows per stream)."""

    @classmethod
    def upstream(cls, cfg: MTLConfig) -> MTLConfig | None:
        """The config of a run that must finish before this one, or None (the default). ``fit``
        trains it first (or reads it back when finished) and hands its best metrics to ``after_upstream``."""
        return None

    @classmethod
    def after_upstream(cls, cfg: MTLConfig, metrics: dict) -> MTLConfig:
        """The config to train, given the upstream run's best metrics (``best_checkpoint`` among them)."""
        return cfg

    @classmethod
    def print_summary(cls, summary) -> None:
        """What the driver prints when the run ends (``summary``: ``raymtl.train.trainer.FitSummary``)."""
        print(f"[raymtl] best checkpoint: {summary.best_checkpoint}")
        print(f"[raymtl] run directory: {summary.run_dir}", flush=True)

    # ------------------------------------------------------------------ worker side
    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        """The model, with ``.encoder``, ``.weighting`` (per-stream loss weights) and
        ``.save(dir, tokenizer, extra, state)``."""

    @abc.abstractmethod
    def streams(self, rank: int, seed: int, skip: dict[str, int] | None = None) -> dict[str, Iterator[dict]]:
        """One endless iterator of collated (CPU) batches per training stream, past the first
        ``skip[name]`` batches of each (those a resumed run has trained on)."""

    def diagnostics(self) -> dict[str, float]:
        """The stage's own measurements, averaged since the last call (the loop reports and
        logs them with each validation); none by default."""
        return {}

    @abc.abstractmethod
    def loss(self, forward, name: str, batch: dict, step: int) -> torch.Tensor:
        """Scalar fp32 loss of one batch of stream ``name`` (``forward``: the model or engine)."""

    @abc.abstractmethod
    def validate(self, module: nn.Module, rank: int, world: int) -> dict[str, float]:
        """Validation scores; a collective, called on every rank."""
