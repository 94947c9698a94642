"""Imbalance strategies: class weights, focal loss, criterion choice and oversampled epochs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hamtune.errors import HamtuneError
from hamtune.training.imbalance import FocalLoss, class_weights, epoch_indices, make_criterion

# 60/30/10 samples of classes 0/1/2; class 3 absent
LABELS = np.array([0] * 60 + [1] * 30 + [2] * 10)


def test_inverse_class_weights_follow_inverse_frequencies_with_mean_one():
    weights = class_weights(LABELS, 3).numpy()
    np.testing.assert_allclose(weights, np.array([1 / 60, 1 / 30, 1 / 10]) / np.mean([1 / 60, 1 / 30, 1 / 10]),
                               rtol=1e-6)
    assert weights.mean() == pytest.approx(1.0)
    assert weights[2] / weights[0] == pytest.approx(6.0)


def test_absent_class_gets_a_finite_weight():
    weights = class_weights(LABELS, 4).numpy()
    assert np.isfinite(weights).all() and weights.mean() == pytest.approx(1.0)
    assert weights[3] == pytest.approx(weights.max())


def test_effective_number_weights_are_flatter_than_inverse():
    inverse = class_weights(LABELS, 3, scheme="inverse").numpy()
    effective = class_weights(LABELS, 3, scheme="effective", beta=0.99).numpy()
    counts = np.array([60, 30, 10])
    expected = (1 - 0.99) / (1 - 0.99**counts)
    np.testing.assert_allclose(effective, expected / expected.mean(), rtol=1e-6)
    assert effective[2] / effective[0] < inverse[2] / inverse[0]
    assert effective[2] > effective[1] > effective[0]


def _logits_and_targets():
    g = torch.Generator().manual_seed(0)
    return torch.randn(32, 5, generator=g) * 3, torch.randint(0, 5, (32,), generator=g)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
def test_focal_loss_with_gamma_zero_is_cross_entropy(smoothing, weighted):
    logits, target = _logits_and_targets()
    weight = torch.tensor([0.5, 1.0, 2.0, 1.5, 0.25]) if weighted else None
    focal = FocalLoss(gamma=0.0, weight=weight, label_smoothing=smoothing)(logits, target)
    ce = F.cross_entropy(logits, target, weight=weight, label_smoothing=smoothing)
    torch.testing.assert_close(focal, ce)


def test_focal_loss_matches_its_definition_and_downweights_easy_examples():
    logits, target = _logits_and_targets()
    gamma = 2.0
    p = torch.softmax(logits, 1)[torch.arange(32), target]
    expected = ((1 - p) ** gamma * -torch.log(p)).mean()
    torch.testing.assert_close(FocalLoss(gamma=gamma)(logits, target), expected)

    easy = torch.tensor([[8.0, 0.0, 0.0]])
    hard = torch.tensor([[0.0, 0.5, 0.0]])
    zero = torch.tensor([0])
    ratio_easy = FocalLoss(gamma)(easy, zero) / F.cross_entropy(easy, zero)
    ratio_hard = FocalLoss(gamma)(hard, zero) / F.cross_entropy(hard, zero)
    assert ratio_easy < 1e-5 < ratio_hard < 1


def test_make_criterion_per_strategy():
    plain = make_criterion("none", LABELS, 3)
    assert isinstance(plain, nn.CrossEntropyLoss) and plain.weight is None
    assert isinstance(make_criterion("oversample", LABELS, 3), nn.CrossEntropyLoss)
    weighted = make_criterion("weighted_loss", LABELS, 3, label_smoothing=0.1)
    torch.testing.assert_close(weighted.weight, class_weights(LABELS, 3))
    assert weighted.label_smoothing == 0.1
    focal = make_criterion("focal", LABELS, 3, focal_gamma=1.5)
    assert isinstance(focal, FocalLoss) and focal.gamma == 1.5
    with pytest.raises(HamtuneError, match="imbalance"):
        make_criterion("smote", LABELS, 3)


def test_plain_epoch_is_a_permutation():
    order = epoch_indices("none", LABELS, np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(len(LABELS)))
    assert not np.array_equal(order, np.arange(len(LABELS)))


def test_oversampled_epoch_is_near_balanced_and_reproducible():
    labels = np.array([0] * 700 + [1] * 200 + [2] * 100)
    order = epoch_indices("oversample", labels, np.random.default_rng(1))
    assert len(order) == len(labels)
    counts = np.bincount(labels[order], minlength=3)
    # expected 333 each; binomial sd ~15, so +-60 is 4 sd
    assert np.all(np.abs(counts - len(labels) / 3) < 60), counts
    # small classes are repeated, the large one is subsampled
    assert len(np.unique(order[labels[order] == 2])) < 100 < counts[2]
    np.testing.assert_array_equal(order, epoch_indices("oversample", labels, np.random.default_rng(1)))
