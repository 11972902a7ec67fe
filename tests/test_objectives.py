import numpy as np
import pytest
import torch

from raymtl.analysis.metrics import overall, pearson
from raymtl.objectives.multitask import classifier_loss, cosent_loss


def test_cosent_rewards_the_right_order():
    label = torch.tensor([0.0, 2.5, 5.0])
    right = cosent_loss(torch.tensor([-0.5, 0.1, 0.9]), label)
    wrong = cosent_loss(torch.tensor([0.9, 0.1, -0.5]), label)
    assert right < 0.01 < 10 < wrong
    # hand-computed: one ordered pair (1 > 0) with cos gap 0.1 -> log(1 + e^{20 * -0.1})
    two = cosent_loss(torch.tensor([0.0, 0.1]), torch.tensor([1.0, 2.0]))
    assert two.item() == pytest.approx(np.log(1 + np.exp(-2.0)), rel=1e-6)
    # ties contribute no pair: loss is log(1) = 0
    assert cosent_loss(torch.tensor([0.3, -0.3]), torch.tensor([1.0, 1.0])).item() == 0.0


def test_classifier_loss_uniform_logits():
    assert classifier_loss(torch.zeros(4, 5), torch.tensor([0, 1, 2, 3])).item() == pytest.approx(np.log(5))


def test_overall_score_formula():
    assert overall({"sst": 0.5, "quora": 0.8, "sts": 0.6}) == pytest.approx((0.5 + 0.8 + 0.8) / 3)
    assert pearson(np.array([1, 2, 3]), np.array([2, 4, 6.5])) == pytest.approx(4.5 / (2 ** 0.5 * (61 / 6) ** 0.5), abs=1e-9)  # by hand
    assert pearson(np.ones(3), np.arange(3)) == 0.0
