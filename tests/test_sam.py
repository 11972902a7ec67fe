"""Sharpness-aware minimisation (raymtl.methods.sam) by hand and on the real model; a real
Ray Train run with SAM: ``tests/test_bench.py::test_sam_smoke_runs_the_default_then_sam_on_half_the_steps``."""
import math

import pytest
import torch

from raymtl.config import MTLConfig
from raymtl.methods.sam import SAM


def test_the_gradient_is_taken_at_the_ascended_weights_and_the_weights_come_back():
    # L(w) = 0.5 |w|^2, w = (3, 4): g = w, |g| = 5; rho 0.5 -> e = 0.1 w, w + e = (3.3, 4.4)
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    frozen = torch.nn.Parameter(torch.tensor([1.0]), requires_grad=False)
    sam = SAM([w, frozen], rho=0.5)
    assert sam.params == [w]
    assert sam.ascend(0.5 * (w ** 2).sum()) == pytest.approx(5.0)
    assert torch.allclose(w.detach(), torch.tensor([3.3, 4.4]))
    (0.5 * (w ** 2).sum()).backward()                # the step's gradient, at w + e
    sam.restore()
    assert torch.equal(w.detach(), torch.tensor([3.0, 4.0]))
    assert torch.allclose(w.grad, torch.tensor([3.3, 4.4]))     # what the optimizer gets, at w


def test_unused_parameters_stay_put_and_bf16_weights_come_back_bit_for_bit():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(64, dtype=torch.bfloat16))
    unused = torch.nn.Parameter(torch.randn(3, dtype=torch.bfloat16))
    before_a, before_unused = a.detach().clone(), unused.detach().clone()
    sam = SAM([a, unused], rho=0.05)
    norm = sam.ascend((a.float() ** 3).sum())
    g = 3 * before_a.float() ** 2
    assert norm == pytest.approx(float(g.norm()), rel=1e-2)
    assert torch.allclose(a.detach().float(), (before_a.float() + 0.05 * g / g.norm()).bfloat16().float(), atol=1e-2)
    assert not torch.equal(a.detach(), before_a) and torch.equal(unused.detach(), before_unused)
    sam.restore()
    assert torch.equal(a.detach(), before_a)


def test_sam_on_the_smoke_model_equals_the_gradient_at_hand_perturbed_weights():
    """The real model: SAM's step gradient equals the gradient computed on a copy whose
    weights were moved by rho * g / |g| by hand."""
    import copy

    from raymtl.config import smoke
    from raymtl.data.multitask import collate
    from raymtl.models.multitask import MultiTaskModel
    cfg = smoke()
    model = MultiTaskModel.from_config(cfg.model, ["sst"], seed=0).eval()      # eval: no dropout
    twin = copy.deepcopy(model)
    batch = collate({"ids_a": [[101, 2023, 3185, 102], [101, 2307, 102]], "tt_a": [[0] * 4, [0] * 3],
                     "ids_b": [[], []], "label": [0, 4], "line": [1, 2]})

    def loss(m):
        return torch.nn.functional.cross_entropy(m("sst", batch).float(), batch["label"].long())
    params = [p for p in model.parameters() if p.requires_grad]
    sam = SAM(params, rho=0.05)
    sam.ascend(loss(model))
    loss(model).backward()
    sam.restore()
    twin_params = [p for p in twin.parameters() if p.requires_grad]
    g = torch.autograd.grad(loss(twin), twin_params, allow_unused=True)
    norm = math.sqrt(sum(float(x.float().norm()) ** 2 for x in g if x is not None))
    with torch.no_grad():
        for p, x in zip(twin_params, g):
            if x is not None:
                p.add_(x, alpha=0.05 / norm)
    loss(twin).backward()
    for p, q, orig in zip(params, twin_params, MultiTaskModel.from_config(cfg.model, ["sst"], seed=0).parameters()):
        assert torch.equal(p.detach(), orig.detach())                    # model back at w
        if q.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("changes, message", [
    ({"sam_rho": -0.1}, r"sam_rho=-0.1 must be >= 0"),
    ({"sam_rho": 0.05, "fusion": "sum", "zero_stage": 3}, r"sam_rho=0.05 moves every weight.*ZeRO-3"),
])
def test_bad_sam_settings_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        MTLConfig().replace(**changes)
    with pytest.raises(ValueError, match="must be > 0"):
        SAM([torch.nn.Parameter(torch.zeros(1))], rho=0.0)
