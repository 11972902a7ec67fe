"""Gradient fusion and loss weighting: hand-computed cases, every registered method, and a
real training step per method."""
import pytest
import torch

from raymtl.config import MTLConfig
from raymtl.methods.fusion import (
    FUSION_METHODS,
    PeriodicFusion,
    fused_surrogate,
    gramian,
    gramian_factor,
    make_fusion,
    task_weights,
)
from raymtl.methods.weighting import WEIGHTINGS, make_weighting


def test_pcgrad_on_two_conflicting_2d_gradients():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    # by hand: g1.g2 = -1 < 0, so g1' = g1 - (g1.g2/|g2|^2) g2 = (0.5, 0.5) and
    # g2' = g2 - (g2.g1/|g1|^2) g1 = (0, 1); the sum is (0.5, 1.5)
    out = FUSION_METHODS["pcgrad"](torch.stack([g1, g2]))
    assert torch.allclose(out, torch.tensor([0.5, 1.5]), atol=1e-6)


def test_mgda_on_orthogonal_unit_gradients_gives_the_midpoint():
    out = FUSION_METHODS["mgda"](torch.eye(2))
    assert torch.allclose(out, torch.tensor([0.5, 0.5]), atol=1e-5)


@pytest.mark.parametrize("name", sorted(FUSION_METHODS))
def test_identical_gradients_fuse_to_that_gradient_up_to_scale(name):
    g = torch.tensor([0.3, -1.0, 2.0, 0.5])
    out = make_fusion(name, 3)(torch.stack([g, g, g]))
    assert torch.nn.functional.cosine_similarity(out, g, dim=0) == pytest.approx(1.0, abs=1e-5)
    assert out.norm() > 0


def test_unknown_fusion_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown fusion method 'magic'; valid: \['cagrad'"):
        make_fusion("magic", 3)
    with pytest.raises(ValueError, match=r"fusion='magic' is not valid"):
        MTLConfig().replace(fusion="magic")


def test_zero3_with_per_task_surgery_is_refused():
    with pytest.raises(ValueError, match="ZeRO-3 partitions"):
        MTLConfig().replace(fusion="pcgrad", zero_stage=3)
    MTLConfig().replace(fusion="sum", zero_stage=3)  # fine
    with pytest.raises(ValueError, match=r"fusion='imtl_g'.*--fusion sum"):   # the default fusion
        MTLConfig().replace(zero_stage=3)


def test_surrogate_gradient_is_the_fused_gradient():
    torch.manual_seed(0)
    shared, head = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    x1, x2 = torch.randn(3), torch.randn(3)
    losses = {"a": (shared * x1).sum() * (head * x1).sum(), "b": ((shared - x2) ** 2).sum()}
    G = torch.stack([torch.autograd.grad(v, shared, retain_graph=True)[0] for v in losses.values()])
    head_grad = torch.autograd.grad(sum(losses.values()), head, retain_graph=True)[0]
    diag = {}
    fused_surrogate(losses, [shared], [head], FUSION_METHODS["pcgrad"], diag).backward()
    assert torch.allclose(shared.grad, FUSION_METHODS["pcgrad"](G), atol=1e-6)
    assert torch.allclose(head.grad, head_grad, atol=1e-6)
    cos = torch.nn.functional.cosine_similarity(G[0], G[1], dim=0).item()
    assert diag["gradcos_a_b"] == pytest.approx(cos, abs=1e-6)


@pytest.mark.parametrize("name", sorted(FUSION_METHODS))
def test_every_method_is_a_weighting_of_the_task_gradients(name):
    G = torch.tensor([[1.0, 0.0, 2.0], [-1.0, 1.0, 0.5], [0.2, -0.3, 1.0]])
    w = task_weights(make_fusion(name, 3), G)      # fresh instances: stateful methods start equal
    assert w.shape == (3,) and torch.allclose(w @ G, make_fusion(name, 3)(G), atol=1e-5)


@pytest.mark.parametrize("name", sorted(FUSION_METHODS))
def test_every_method_weighs_by_the_gramian_alone(name):
    """The training step never builds the [T, D] matrix: it hands the method a [T, T] factor of
    the Gramian accumulated parameter by parameter; the weights must be the full matrix's."""
    torch.manual_seed(1)
    parts = [[torch.randn(40, 7), None, torch.randn(5)] for _ in range(3)]
    parts[1][1] = torch.randn(2, 2)                                  # one task reaches a parameter alone
    zeros = [torch.zeros(40, 7), torch.zeros(2, 2), torch.zeros(5)]
    G = torch.stack([torch.cat([(x if x is not None else z).reshape(-1) for x, z in zip(g, zeros)]) for g in parts])
    gram = gramian(parts)
    assert gram.dtype == torch.float64 and torch.allclose(gram, (G @ G.T).double(), rtol=1e-5)
    R = gramian_factor(gram)
    assert torch.allclose(R @ R.T, gram, rtol=1e-9, atol=1e-9)
    w_full = task_weights(make_fusion(name, 3), G)
    w_factor = task_weights(make_fusion(name, 3), R)
    assert torch.allclose(w_factor.float(), w_full, atol=1e-4), (w_factor, w_full)
    singular = gramian([parts[0], parts[0], parts[2]])               # linearly dependent rows
    assert torch.allclose(gramian_factor(singular) @ gramian_factor(singular).T, singular, atol=1e-6)


def test_periodic_fusion_reuses_the_last_weights_until_the_next_refresh():
    shared = torch.nn.Parameter(torch.zeros(2))
    imtl = make_fusion("imtl_g", 2)

    def losses(scale_b):   # orthogonal gradients (1, 0) and (0, b): IMTL-G weighs them b : 1
        return {"a": shared @ torch.tensor([1.0, 0.0]), "b": shared @ torch.tensor([0.0, scale_b])}

    periodic, diag = PeriodicFusion(imtl, every=3), {}
    periodic.loss(losses(4.0), [shared], step=0, diagnostics=diag).backward()
    w0 = task_weights(imtl, torch.tensor([[1.0, 0.0], [0.0, 4.0]]))
    assert torch.allclose(shared.grad, w0 @ torch.tensor([[1.0, 0.0], [0.0, 4.0]]))   # = the fused one
    assert diag["fusion_weight_a"] == pytest.approx(w0[0].item()) and diag["gradcos_a_b"] == pytest.approx(0)
    shared.grad = None
    periodic.loss(losses(1.0), [shared], step=2).backward()          # within 3 steps: old weights
    assert torch.allclose(shared.grad, torch.tensor([w0[0], w0[1]]))
    resumed = PeriodicFusion(imtl, every=3)                          # from a checkpoint's client state
    resumed.load_state_dict(periodic.state_dict())
    shared.grad = None
    resumed.loss(losses(1.0), [shared], step=2).backward()           # keeps the held weights
    assert torch.allclose(shared.grad, torch.tensor([w0[0], w0[1]]))
    shared.grad = None
    periodic.loss(losses(1.0), [shared], step=3).backward()          # refreshed: equal weights now
    assert torch.allclose(shared.grad, torch.tensor([0.5, 0.5]))
    alone = {"a": losses(1.0)["a"]}
    assert periodic.loss(alone, [shared], step=4) is alone["a"]      # one task: its own loss, no gradients


def test_task_weights_scale_the_shares_of_a_scale_invariant_fusion():
    shared, head = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    G = torch.tensor([[1.0, 0.0], [0.0, 4.0]])

    def losses(scale_a=1.0):
        return {"a": scale_a * (shared @ G[0]) + head.sum(), "b": shared @ G[1]}

    def grad_of(fn):
        shared.grad = head.grad = None
        fn().backward()
        return shared.grad.clone(), (head.grad.clone() if head.grad is not None else None)

    imtl = make_fusion("imtl_g", 2)
    w = task_weights(imtl, G)
    plain, _ = grad_of(lambda: fused_surrogate(losses(), [shared], [head], imtl))
    scaled, _ = grad_of(lambda: fused_surrogate(losses(scale_a=2.0), [shared], [head], imtl))
    assert torch.allclose(plain, w @ G)
    unit = torch.nn.functional.normalize
    assert torch.allclose(unit(scaled, dim=0), unit(plain, dim=0))     # a loss weight: same direction
    diag = {}
    pref, head_grad = grad_of(lambda: fused_surrogate(losses(), [shared], [head], imtl, diag, prefs={"a": 2.0}))
    assert torch.allclose(pref, torch.tensor([2 * w[0] * 1.0, w[1] * 4.0]))      # a's share doubled
    assert not torch.allclose(unit(pref, dim=0), unit(plain, dim=0), atol=1e-3)  # a new direction
    assert head_grad.item() == pytest.approx(2.0)                               # a's head: 2 x its loss
    assert diag["fusion_weight_a"] == pytest.approx(2 * w[0].item())            # reported as applied
    periodic = PeriodicFusion(imtl, every=5)
    held, _ = grad_of(lambda: periodic.loss(losses(), [shared], step=0, prefs={"a": 2.0}))
    assert torch.allclose(held, pref)
    again, _ = grad_of(lambda: periodic.loss(losses(), [shared], step=1, prefs={"a": 2.0}))
    assert torch.allclose(again, pref)                                          # between refreshes too
    alone, _ = grad_of(lambda: periodic.loss({"b": losses()["b"]}, [shared], step=2, prefs={"b": 3.0}))
    assert torch.allclose(alone, 3 * G[1])


def test_a_refresh_step_hands_over_the_weighted_gradient_of_every_parameter():
    torch.manual_seed(0)
    enc, head_a, head_b, unused = (torch.nn.Linear(4, 4), torch.nn.Linear(4, 1), torch.nn.Linear(4, 1),
                                   torch.nn.Linear(4, 1))
    shared, others = list(enc.parameters()), [*head_a.parameters(), *head_b.parameters(), *unused.parameters()]
    x = torch.randn(8, 4)

    def losses():
        h = torch.tanh(enc(x))
        return {"a": head_a(h).pow(2).mean(), "b": (head_b(h) - 1).abs().mean() * 5}

    def grads(loss):
        for p in shared + others:
            p.grad = None
        loss.backward()
        return [p.grad.clone() if p.grad is not None else None for p in shared + others]

    periodic = PeriodicFusion(make_fusion("imtl_g", 2), every=10)
    surrogate = grads(periodic.loss(losses(), shared, step=0, prefs={"b": 1.5}, others=others))
    w = periodic.weights[("a", "b")][0] * torch.tensor([1.0, 1.5])
    plain = grads(sum(wt * loss for wt, loss in zip(w.tolist(), losses().values())))   # the old refresh step
    for got, want in zip(surrogate, plain):
        assert (got is None) == (want is None)                   # the unused head gets no gradient
        assert got is None or torch.allclose(got, want, atol=1e-6)


def test_own_parameters_get_their_task_s_plain_gradient_on_every_step():
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    for weigh_owners in (False, True):                    # hooks stay on a model's parameters: fresh ones
        torch.manual_seed(0)
        enc, head_a, head_b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)
        shared, owned = list(enc.parameters()), {"a": list(head_a.parameters()), "b": list(head_b.parameters())}

        def losses():
            h = torch.tanh(enc(x))
            return {"a": head_a(h).pow(2).mean(), "b": (head_b(h) - 1).abs().mean() * 5}

        plain = {t: torch.autograd.grad(losses()[t], owned[t]) for t in owned}   # each head alone
        per_task = {t: torch.autograd.grad(losses()[t], shared) for t in owned}
        periodic = PeriodicFusion(make_fusion("imtl_g", 2), every=10, owners=owned, weigh_owners=weigh_owners)
        for step in (0, 1):                                   # a refresh step, then one in between
            for p in shared + owned["a"] + owned["b"]:
                p.grad = None
            periodic.loss(losses(), shared, step=step, prefs={"b": 1.5}, others=owned["a"] + owned["b"]).backward()
            w = periodic.weights[("a", "b")][0]
            assert abs(w[0] - w[1]) > 0.05                                       # unequal weights
            for p, ga, gb in zip(shared, per_task["a"], per_task["b"]):         # shared: fused either way
                assert torch.allclose(p.grad, w[0] * ga + 1.5 * w[1] * gb, atol=1e-5)
            scale = {"a": w[0] if weigh_owners else 1.0, "b": 1.5 * (w[1] if weigh_owners else 1.0)}
            for t, params in owned.items():                   # own: the plain gradient x preference
                for p, want in zip(params, plain[t]):
                    assert torch.allclose(p.grad, scale[t] * want, atol=1e-5), (weigh_owners, step, t)


def test_task_clip_bounds_each_task_s_own_step_by_its_own_norm_alone():
    from raymtl.config import ModelConfig
    from raymtl.models.multitask import MultiTaskModel
    from raymtl.tasks import TASKS
    from raymtl.train.engine import GroupClip
    ids = torch.tensor([[101, 2023, 2003, 102, 0], [101, 2307, 102, 0, 0]])
    one = {"input_ids": ids, "attention_mask": (ids > 0).long(), "token_type_ids": torch.zeros_like(ids)}
    pair = {**one, "input_ids_b": ids.flip(0), "attention_mask_b": (ids.flip(0) > 0).long()}
    model = MultiTaskModel.from_config(ModelConfig(encoder="tiny-random"), TASKS, seed=0).eval()  # no dropout

    def clipped(sts_scale: float, scope: str) -> dict[str, list[torch.Tensor]]:
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(model("sst", one), torch.tensor([1, 3]))
        (loss + sts_scale * (model("sts", pair) - 4).pow(2).mean()).backward()
        if scope == "task":
            GroupClip(model, max_norm=0.01)()
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
        return {g: [p.grad.clone() for p in ps if p.grad is not None]
                for g, ps in GroupClip(model, 0.01).groups.items()}

    small, large = clipped(1.0, "task"), clipped(1000.0, "task")
    for group, grads in large.items():
        if grads:
            assert float(torch.cat([g.flatten() for g in grads]).norm()) <= 0.01 + 1e-6, group
    for a, b in zip(small["sst"], large["sst"]):       # STS's loss x1000: SST's own step unchanged
        assert torch.allclose(a, b, atol=1e-7)
    g_small, g_large = clipped(1.0, "global"), clipped(1000.0, "global")
    norm = lambda gs: float(torch.cat([g.flatten() for g in gs]).norm())
    assert norm(g_large["sst"]) < 0.1 * norm(g_small["sst"])   # a global clip lets STS shrink it


def test_fusion_every_must_be_positive():
    with pytest.raises(ValueError, match=r"fusion_every=0 must be > 0"):
        MTLConfig().replace(fusion="imtl_g", fusion_every=0)


@pytest.mark.parametrize("name", sorted(WEIGHTINGS))
def test_weightings_start_uniform_and_learnable_ones_have_parameters(name):
    w = make_weighting(name, ["sst", "sts"], {"sst": 2.0} if name == "fixed" else {})
    losses = {"sst": torch.tensor(1.5), "sts": torch.tensor(0.5)}
    out = w(losses, 0)
    expected = {"fixed": 2 * 1.5 + 0.5, "uncertainty": 0.5 * 2.0, "dwa": 2.0, "softmax": 2.0}[name]
    assert float(sum(out.values()).detach()) == pytest.approx(expected)
    assert bool(list(w.parameters())) == (name in ("uncertainty", "softmax"))


def test_dwa_upweights_the_task_whose_loss_falls_slowest():
    w = make_weighting("dwa", ["a", "b"], {})
    w.window = 1
    for step, (a, b) in enumerate([(1.0, 1.0), (1.0, 1.0), (1.0, 0.5)], start=1):
        w({"a": torch.tensor(a), "b": torch.tensor(b)}, step)
    weights = w.weights()
    assert weights["a"] > 1 > weights["b"] and sum(weights.values()) == pytest.approx(2.0)
