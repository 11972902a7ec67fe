"""SMART's smoothness regulariser (raymtl.methods.smart) by hand and on the real model; a real
Ray Train run with it: ``tests/test_bench.py::test_sampling_smoke_gives_every_sampler_the_same_batches_and_smoothness_reads_its_default_back``."""
import pytest
import torch
import torch.nn.functional as F

from raymtl.config import MTLConfig, smoke
from raymtl.data.multitask import collate
from raymtl.methods.smart import SMART, divergence
from raymtl.models.multitask import MultiTaskModel
from raymtl.stages.pretrain import PretrainJobConfig


def test_divergence_is_the_symmetric_kl_for_classifiers_and_the_squared_error_otherwise():
    a, b = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.0, 1.0, 0.0]])
    p, q = a.softmax(-1), b.softmax(-1)
    kl = lambda x, y: float((x * (x / y).log()).sum())                      # noqa: E731
    assert float(divergence(a, b, "classifier")) == pytest.approx(kl(p, q) + kl(q, p), rel=1e-5)
    assert float(divergence(a, b, "classifier")) == pytest.approx(float(divergence(b, a, "classifier")), rel=1e-6)
    assert float(divergence(a, a, "classifier")) == pytest.approx(0.0, abs=1e-7)
    assert float(divergence(torch.tensor([0.5, 1.0]), torch.tensor([0.0, 0.0]), "cosine")) == pytest.approx(0.625)


def test_one_ascent_step_from_the_noise_by_hand():
    """A linear model on the mean of its embeddings: delta = noise + step * g / max|g| per token,
    and the regulariser is weight x D at that delta, by hand."""
    torch.manual_seed(0)
    emb, head = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    run = lambda: head(emb(ids).mean(1))                                    # noqa: E731
    smart = SMART(emb, weight=2.0, noise=1e-3, step=0.1)
    clean = run()
    torch.manual_seed(1)
    reg = smart.regulariser(run, clean, "classifier")
    torch.manual_seed(1)
    delta = (torch.randn(2, 3, 4) * 1e-3).requires_grad_()
    g, = torch.autograd.grad(divergence(head((emb(ids) + delta).mean(1)), clean.detach(), "classifier"), delta)
    adv = (delta + 0.1 * g / g.abs().amax(-1, keepdim=True)).detach()
    want = 2.0 * divergence(head((emb(ids) + adv).mean(1)), clean, "classifier")
    assert reg.item() == pytest.approx(want.item(), rel=1e-5)
    assert reg.item() > 2.0 * float(divergence(head((emb(ids) + delta).mean(1)), clean, "classifier"))   # it ascended
    assert torch.equal(run(), clean)                                        # the hook is off again
    reg.backward()                                                          # differentiable in the weights
    assert head.weight.grad is not None and emb.weight.grad is not None


@pytest.mark.parametrize("task, kind", [("sst", "classifier"), ("quora", "classifier"), ("sts", "cosine")])
def test_on_the_smoke_model_every_sentence_gets_its_own_perturbation(task, kind):
    cfg = smoke()
    model = MultiTaskModel.from_config(cfg.model, [task], seed=0).eval()      # eval: no dropout
    seen = []
    model.encoder.get_input_embeddings().register_forward_hook(lambda m, i, o: seen.append(o.shape))
    smart = SMART(model.encoder.get_input_embeddings(), weight=1.0)
    batch = collate({"ids_a": [[101, 2023, 3185, 102], [101, 2307, 102]], "tt_a": [[0] * 4, [0] * 3],
                     "ids_b": [[101, 7592, 102], [101, 2023, 2003, 1037, 102]], "label": [0, 1], "line": [1, 2]})
    if task == "sts":
        batch["label"] = batch["label"].float()
    run = lambda: model(task, batch).float()                                # noqa: E731
    clean = run()
    seen.clear()
    reg = smart.regulariser(run, clean, kind)
    sentences = 2 if model.modes.get(task) == "bi" else 1
    assert len(seen) == 2 * sentences                                       # noisy and adversarial forwards
    assert reg.item() > 0 and torch.isfinite(reg)
    assert torch.equal(run(), clean)
    reg.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())


@pytest.mark.parametrize("make, message", [
    (lambda: MTLConfig().replace(smart_weight=-1.0), r"smart_weight=-1.0 must be >= 0"),
    (lambda: MTLConfig().replace(smart_weight=1.0, fusion="sum", zero_stage=3), r"smart_weight=1.0 .*ZeRO-3"),
    (lambda: PretrainJobConfig().replace(smart_weight=1.0), r"smart_weight=1.0: .*multi-task stage"),
])
def test_bad_smart_settings_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()
    with pytest.raises(ValueError, match="must be > 0"):
        SMART(torch.nn.Embedding(2, 2), weight=0.0)


def test_the_stage_adds_the_regulariser_to_each_task_loss():
    """MTLStage.loss with smart_weight: the task loss plus SMART's term (eval mode: no dropout)."""
    from raymtl.stages.multitask import MTLStage
    cfg = smoke().replace(tasks=("sst",), smart_weight=3.0, fusion="sum")
    stage = MTLStage(cfg, {"sst": 8})
    model = stage.build_model().eval()
    assert stage.smart is not None and stage.smart.weight == 3.0
    batch = collate({"ids_a": [[101, 2023, 3185, 102], [101, 2307, 102]], "tt_a": [[0] * 4, [0] * 3],
                     "ids_b": [[], []], "label": [0, 4], "line": [1, 2]})
    plain = F.cross_entropy(model("sst", batch).float(), batch["label"].long())
    torch.manual_seed(5)
    total = stage.loss(model, "sst", batch, step=0)
    assert float(total) > float(plain)
    assert stage.diagnostics()["smart_term"] == pytest.approx(float(total) - float(plain), rel=1e-4)
    assert stage.diagnostics() == {}                       # reported once: nothing since
    off = MTLStage(smoke().replace(tasks=("sst",), fusion="sum"), {"sst": 8})
    off.build_model()
    assert off.smart is None and float(off.loss(model, "sst", batch, step=0)) == pytest.approx(float(plain))
