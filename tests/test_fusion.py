"""Gradient fusion and loss weighting: hand-computed cases, every registered method, and a
real training step per method."""
import itertools
import math

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

# ------------------------------------------------------------------ hand-computed cases
# Two conflicting 2-D gradients (g1.g2 = -1 < 0, 135 degrees apart) and what each method
# gives for them, worked out by hand from its paper and TorchJD's implementation:
G2 = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
SQRT2 = math.sqrt(2)
HAND = {
    # the plain sum
    "sum": (G2, [0.0, 1.0]),
    # each gradient projected onto the normal plane of the other, then summed:
    # g1' = g1 - (g1.g2 / |g2|^2) g2 = (1, 0) + (-1, 1) / 2 = (0.5, 0.5),
    # g2' = g2 - (g2.g1 / |g1|^2) g1 = (-1, 1) + (1, 0) = (0, 1); sum (0.5, 1.5)
    "pcgrad": (G2, [0.5, 1.5]),
    # a fresh GradVac's targets are 0: where cos(g_i', g_j) < 0 it adds to g_i' the multiple
    # of g_j that makes the cosine 0 (w = -|g_i| cos / |g_j| = -g_i.g_j / |g_j|^2), PCGrad's
    # projection; its second call is test_gradvac_moves_towards_its_ema_target below
    "gradvac": (G2, [0.5, 1.5]),
    # the min-norm point of the segment [g2, g1]: a g1 + (1 - a) g2 with
    # a = (g2 - g1).g2 / |g1 - g2|^2 = 3 / 5, so (0.6 - 0.4, 0.4) = (0.2, 0.4) (and d.g1 = d.g2 = |d|^2)
    "mgda": (G2, [0.2, 0.4]),
    # d = a g1 + (1 - a) g2 with equal projections on the unit gradients, d.(u1 - u2) = 0:
    # a = 1 - g1.(u1 - u2) / (g1 - g2).(u1 - u2) = 1 - (1 + 1/sqrt2) / (2 + 3/sqrt2) = 2 - sqrt2
    # (TorchJD: w = pinv(G G^T) |g| / sum = ((2 + sqrt2), (1 + sqrt2)) / (1 + sqrt2)^2, the same)
    "imtl_g": (G2, [(2 - SQRT2) - (SQRT2 - 1), SQRT2 - 1]),
    # the mean of each gradient projected onto the dual cone {x : G x >= 0} = {x1 >= 0, x2 >= x1}:
    # g1 -> (0.5, 0.5) (onto x2 = x1), g2 -> (0, 1) (onto x1 = 0); mean (0.25, 0.75)
    "upgrad": (G2, [0.25, 0.75]),
    # c = 0.4, g0 = mean = (0, 0.5): w minimises F(w) = g_w.g0 + c |g0| |g_w| over the simplex,
    # g_w = w g1 + (1 - w) g2 = (2w - 1, 1 - w), F(w) = (1 - w) / 2 + 0.2 sqrt(5w^2 - 6w + 2);
    # F'(w) = -1/2 + 0.2 (5w - 3) / sqrt(5w^2 - 6w + 2) <= -1/2 + 0.2 sqrt5 < 0, so w = 1, g_w = g1
    # and d = g0 + c |g0| g_w / |g_w| = (0, 0.5) + 0.2 (1, 0) = (0.2, 0.5)
    "cagrad": (G2, [0.2, 0.5]),
    # Nash-MTL solves G G^T a = 1 / a, i.e. a_i g_i.d = 1 with d = sum a_i g_i. With two tasks
    # (a1 g1 - a2 g2).d = 0 = |a1 g1|^2 - |a2 g2|^2: d bisects g1 and g2, d ~ u1 + u2. And
    # |d|^2 = sum a_i g_i.d = 2 > max_norm 1, so TorchJD scales d to unit length.
    # (Not on G2: there g1.(g1 + g2) = 0, and the solver's linearisation at its start a = (1, 1)
    # divides by G G^T a; it keeps a = (1, 1), the plain sum.) Here u1.u2 = cos t = -1/sqrt5, and the
    # unit bisector is (cos t/2, sin t/2) = (sqrt((1 + cos t) / 2), sqrt((1 - cos t) / 2)).
    "nash_mtl": (torch.tensor([[1.0, 0.0], [-0.5, 1.0]]),
                 [math.sqrt((1 - 1 / math.sqrt(5)) / 2), math.sqrt((1 + 1 / math.sqrt(5)) / 2)]),
}
SOLVER_TOL = {"upgrad": 5e-4,     # TorchJD regularises the dual-cone QP's Gramian (reg_eps 1e-4)
              "nash_mtl": 1e-3}   # its iterations stop at a residual of 1e-3


def test_every_registered_method_has_a_hand_computed_case():
    assert set(HAND) == set(FUSION_METHODS)


@pytest.mark.parametrize("name", sorted(HAND))
def test_two_conflicting_2d_gradients_by_hand(name):
    G, want = HAND[name]
    assert G[0] @ G[1] < 0                                           # they conflict
    fuse = make_fusion(name, 2)
    torch.manual_seed(0)
    out = fuse(G)
    assert torch.allclose(out, torch.tensor(want), atol=SOLVER_TOL.get(name, 1e-5)), out


@pytest.mark.parametrize("name", sorted(HAND))
def test_two_tasks_fuse_alike_in_either_order_and_any_random_state(name):
    """With two tasks there is one order to visit the other task in: PCGrad and GradVac draw
    their orders at random but cannot differ, and no method depends on which task comes first."""
    G, _ = HAND[name]
    results = []
    for seed in range(5):
        for rows in ([0, 1], [1, 0]):
            torch.manual_seed(seed)
            results.append(make_fusion(name, 2)(G[rows]))             # fresh: stateful methods start equal
    for out in results[1:]:
        assert torch.allclose(out, results[0], atol=SOLVER_TOL.get(name, 1e-6))


def pcgrad_reference(G: torch.Tensor, orders: list[list[int]]) -> torch.Tensor:
    """Algorithm 1 of Yu et al. 2020: ``g_i`` projected, in ``orders[i]``, onto the normal
    plane of each ``g_j`` it conflicts with; the projected gradients summed."""
    out = []
    for i, order in enumerate(orders):
        g = G[i].clone()
        for j in order:
            if g @ G[j] < 0:
                g = g - (g @ G[j]) / (G[j] @ G[j]) * G[j]
        out.append(g)
    return torch.stack(out).sum(0)


def test_pcgrad_with_three_tasks_is_the_paper_s_algorithm_in_an_order_its_seed_fixes():
    """With three tasks the order matters (eight results here): each call is one of the
    reference's, and the same random state gives the same one."""
    G = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [-0.2, -1.0]])
    per_task = [list(itertools.permutations([j for j in range(3) if j != i])) for i in range(3)]
    possible = [pcgrad_reference(G, list(orders)) for orders in itertools.product(*per_task)]
    assert len({tuple(p.round(decimals=5).tolist()) for p in possible}) == 8
    seen = set()
    for seed in range(20):
        torch.manual_seed(seed)
        out = make_fusion("pcgrad", 3)(G)
        assert any(torch.allclose(out, p, atol=1e-6) for p in possible), out
        torch.manual_seed(seed)
        assert torch.equal(make_fusion("pcgrad", 3)(G), out)
        seen.add(tuple(out.round(decimals=5).tolist()))
    assert len(seen) > 1                    # so a test that leaves the random state open is order-dependent


def test_gradvac_moves_towards_its_ema_target():
    """GradVac keeps an EMA target per pair, phi <- (1 - beta) phi + beta cos (beta 0.5). On G2
    (cos = -1/sqrt2) the first call projects as PCGrad (targets 0) and sets the targets to
    -1/(2 sqrt2); the second call adds to each g_i the multiple of g_j that makes their cosine
    exactly that: g1 + a g2 = (1 - a, a) with (2a - 1) / sqrt(2a^2 - 2a + 1) = -1/2, i.e.
    14a^2 - 14a + 3 = 0, a = 1/2 - sqrt7/14; g2 + b g1 = (b - 1, 1) with (1 - b)^2 = 1/7,
    b = 1 - 1/sqrt7. The sum, (1 + b) g1 + (1 + a) g2, is (a, 1 + a)."""
    gradvac = make_fusion("gradvac", 2)
    assert torch.allclose(gradvac(G2), torch.tensor([0.5, 1.5]), atol=1e-6)
    a, b = 0.5 - math.sqrt(7) / 14, 1 - 1 / math.sqrt(7)
    w = task_weights(gradvac, G2)                                   # the second call
    assert torch.allclose(w, torch.tensor([1 + b, 1 + a]), atol=1e-5)
    target = -1 / (2 * SQRT2)
    cos = torch.nn.functional.cosine_similarity
    assert cos(G2[0] + (w[1] - 1) * G2[1], G2[1], dim=0) == pytest.approx(target, abs=1e-5)
    assert cos(G2[1] + (w[0] - 1) * G2[0], G2[0], dim=0) == pytest.approx(target, abs=1e-5)
    assert torch.allclose(w @ G2, torch.tensor([a, 1 + a]), atol=1e-5)
    assert torch.allclose(make_fusion("gradvac", 2)(G2), torch.tensor([0.5, 1.5]), atol=1e-6)  # fresh state


def test_cagrad_matches_its_definition_where_the_optimum_is_inside_the_simplex():
    """CAGrad (Liu et al. 2021): w* = argmin over the simplex of g_w.g0 + c |g0| |g_w| (g0 the mean
    gradient), d = g0 + c |g0| g_w* / |g_w*|. Here w* is interior (about 0.64); the reference
    finds it by ternary search (F is convex in w)."""
    G, c = torch.tensor([[1.0, 0.0], [-0.5, 1.0]], dtype=torch.float64), 0.4
    g0 = G.mean(0)

    def g_w(w):
        return w * G[0] + (1 - w) * G[1]

    lo, hi = 0.0, 1.0
    for _ in range(200):
        m1, m2 = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        F1, F2 = (float(g_w(m) @ g0 + c * g0.norm() * g_w(m).norm()) for m in (m1, m2))
        lo, hi = (lo, m2) if F1 < F2 else (m1, hi)
    assert 0.1 < lo < 0.9
    want = g0 + c * g0.norm() * g_w(lo) / g_w(lo).norm()
    out = make_fusion("cagrad", 2)(G.float())
    assert torch.allclose(out.double(), want, atol=3e-4), (out, want)   # TorchJD: a conic solver


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
    fused_surrogate(losses, [shared], [head], make_fusion("pcgrad", 2), diag).backward()
    assert torch.allclose(shared.grad, make_fusion("pcgrad", 2)(G), atol=1e-6)
    assert torch.allclose(head.grad, head_grad, atol=1e-6)
    cos = torch.nn.functional.cosine_similarity(G[0], G[1], dim=0).item()
    assert diag["gradcos_a_b"] == pytest.approx(cos, abs=1e-6)


@pytest.mark.parametrize("name", sorted(FUSION_METHODS))
def test_every_method_is_a_weighting_of_the_task_gradients(name):
    G = torch.tensor([[1.0, 0.0, 2.0], [-1.0, 1.0, 0.5], [0.2, -0.3, 1.0]])
    weigh, fuse = make_fusion(name, 3), make_fusion(name, 3)   # fresh instances: stateful methods start equal
    torch.manual_seed(0)                                       # and the same task orders (PCGrad, GradVac)
    w = task_weights(weigh, G)
    torch.manual_seed(0)
    assert w.shape == (3,) and torch.allclose(w @ G, fuse(G), atol=1e-5)


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
    full, factor = make_fusion(name, 3), make_fusion(name, 3)
    torch.manual_seed(0)                                             # the same task orders
    w_full = task_weights(full, G)
    torch.manual_seed(0)
    w_factor = task_weights(factor, R)
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
