"""Task sampling: which tasks contribute a batch to an optimizer step.

Each sampler has the same signature ``(sizes, step, total_steps, rng) -> list[str]`` (its own
settings, such as the temperature sampler's ``T``, as keywords with defaults) and is registered
in ``SAMPLERS``; ``get_sampler`` hands it the run's settings. ``sizes`` maps task name to its
number of training rows.
"""
from __future__ import annotations

import functools
import random
from typing import Callable

Sampler = Callable[[dict[str, int], int, int, random.Random], list[str]]


def round_robin(sizes, step, total_steps, rng):
    """Every task contributes one batch to every step (tasks interleaved within a step)."""
    return list(sizes)


def _draw(sizes, weights, rng):
    names = list(sizes)
    return [rng.choices(names, weights=[weights[n] for n in names])[0]]


def proportional(sizes, step, total_steps, rng):
    """One task per step, drawn with probability proportional to its size."""
    return _draw(sizes, sizes, rng)


SAMPLING_TEMPERATURE = 2.0       # the temperature sampler's T (TrainConfig.sampling_temperature)


def temperature(sizes, step, total_steps, rng, T: float = SAMPLING_TEMPERATURE):
    """One task per step with p proportional to n^(1/T) (T=1: proportional, T->inf: uniform)."""
    return _draw(sizes, {n: s ** (1.0 / T) for n, s in sizes.items()}, rng)


def annealed(sizes, step, total_steps, rng):
    """Stickland & Murray 2019 (BERT and PALs): p proportional to n^alpha with
    alpha = 1 - 0.8 (e - 1) / (E - 1), annealed from proportional to near-uniform."""
    frac = step / max(total_steps - 1, 1)
    alpha = 1.0 - 0.8 * frac
    return _draw(sizes, {n: s ** alpha for n, s in sizes.items()}, rng)


SAMPLERS: dict[str, Sampler] = {
    "round_robin": round_robin,
    "proportional": proportional,
    "temperature": temperature,
    "annealed": annealed,
}


def get_sampler(name: str, sampling_temperature: float = SAMPLING_TEMPERATURE) -> Sampler:
    """The sampler ``name`` with the settings of the samplers that have them
    (``TrainConfig.sampling_temperature``); unknown names list the valid ones."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampling strategy {name!r}; valid: {sorted(SAMPLERS)}")
    settings = {"temperature": {"T": sampling_temperature}}.get(name, {})
    return functools.partial(SAMPLERS[name], **settings)
