"""Per-task second-moment normalisation (raymtl.methods.tasknorm): hand-computed, against torch's
Adam, through the fusion hand-over, and across a checkpoint."""
import math

import pytest
import torch

from raymtl.config import MTLConfig
from raymtl.methods.fusion import FUSION_METHODS, fused_surrogate
from raymtl.methods.tasknorm import SecondMoment, make_task_norm


def linear_losses(shared, ga, gb):
    """Two losses whose gradients w.r.t. ``shared`` are ``ga`` and ``gb``."""
    return {"a": (shared * ga).sum(), "b": (shared * gb).sum()}


def test_first_step_gives_every_task_a_unit_step_in_every_coordinate_it_reaches():
    shared = torch.nn.Parameter(torch.zeros(2))
    ga, gb = torch.tensor([10.0, 0.0]), torch.tensor([0.1, 0.1])       # a is 100x larger
    fused_surrogate(linear_losses(shared, ga, gb), [shared], [], FUSION_METHODS["sum"],
                    normalise=SecondMoment()).backward()
    # step 1: bias-corrected v = g^2, so each task's gradient becomes its sign: (1, 0) and (1, 1);
    # one common factor keeps the tasks' total squared norm (100.02 before, 3 after)
    scale = math.sqrt(100.02 / 3)
    assert torch.allclose(shared.grad, torch.tensor([2.0, 1.0]) * scale, rtol=1e-5)
    plain = ga + gb                                                       # without: a's step
    assert plain[1] / plain[0] < 0.01 and shared.grad[1] / shared.grad[0] == pytest.approx(0.5)


def test_each_task_is_normalised_as_its_own_adam_without_momentum_would():
    """Task b joins at step 3 (samplers that skip a task): each task's moments and bias
    correction are its own; one common factor for both restores the total norm."""
    torch.manual_seed(0)
    norm, shared = SecondMoment(beta=0.9), [torch.nn.Parameter(torch.zeros(5))]
    refs = {t: torch.nn.Parameter(torch.zeros(5)) for t in "ab"}
    adams = {t: torch.optim.Adam([p], lr=1.0, betas=(0.0, 0.9), eps=1e-12) for t, p in refs.items()}
    for step in range(6):
        names = ["a", "b"] if step >= 3 else ["a"]
        raw = {t: torch.randn(5) * (1 + step) * (10 if t == "b" else 1) for t in names}
        grads = [[raw[t].clone()] for t in names]
        norm(grads, names, shared)
        want = {}
        for t in names:                                                   # g / sqrt(v_hat), per task
            before, refs[t].grad = refs[t].detach().clone(), raw[t].clone()
            adams[t].step()
            want[t] = before - refs[t].detach()
        total = math.sqrt(sum(float(g.square().sum()) for g in raw.values()))
        scale = total / math.sqrt(sum(float(w.square().sum()) for w in want.values()))
        for t, g in zip(names, grads):
            assert torch.allclose(g[0], want[t] * scale, rtol=1e-4), (step, t)


def test_state_round_trip_continues_the_moments_per_task():
    torch.manual_seed(1)
    shared = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))]
    draws = [[[torch.randn(3), None], [torch.randn(3), torch.randn(2)]] for _ in range(4)]
    straight, resumed = SecondMoment(), SecondMoment()
    for g in draws[:2]:
        straight([list(x) for x in g], ["a", "b"], shared)
        resumed([list(x) for x in g], ["a", "b"], shared)
    state = resumed.state_dict()
    resumed = SecondMoment()
    resumed.load_state_dict(state)
    assert resumed.counts == {"a": 2, "b": 2}
    for g in draws[2:]:
        x, y = [list(t) for t in g], [list(t) for t in g]
        straight(x, ["a", "b"], shared)
        resumed(y, ["a", "b"], shared)
        for gx, gy in zip(x, y):
            assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(gx, gy))
    assert x[0][1] is None                                               # a never reaches param 2


def test_unknown_task_norm_lists_the_valid_ones_and_it_needs_fusion_every_step():
    with pytest.raises(ValueError, match=r"task_norm='rms' is not valid; choose one of \['adam', 'none'\]"):
        make_task_norm("rms")
    assert make_task_norm("none") is None
    cfg = MTLConfig().replace(task_norm="adam", fusion_every=1, fusion="sum")
    assert cfg.train.per_task_gradients()                                  # even with fusion='sum'
