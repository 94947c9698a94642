"""Strategies against HAM10000's class imbalance (nv is 67% of images, df 1%): loss weights, focal loss, oversampling.

Each strategy is a choice the search can make ("imbalance" in TrainConfig); this module turns it into the loss
function and the per-epoch sample order the training loop uses.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hamtune.errors import HamtuneError
from hamtune.vocab import IMBALANCE_STRATEGIES as STRATEGIES


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)[:num_classes]


def class_weights(labels: np.ndarray, num_classes: int, scheme: str = "inverse", beta: float = 0.999) -> torch.Tensor:
    """Per-class loss weights with mean 1 (so the loss keeps its usual scale and the learning rate its meaning).

    inverse: 1 / count. effective: (1 - beta) / (1 - beta**count), the "effective number of samples" of
    Cui et al. 2019, which flattens the inverse weights for large classes. A class absent from `labels` is counted as
    one sample: it contributes no loss terms anyway, and this keeps every weight finite.
    """
    counts = np.maximum(class_counts(labels, num_classes), 1).astype(np.float64)
    if scheme == "inverse":
        weights = 1.0 / counts
    elif scheme == "effective":
        if not 0.0 < beta < 1.0:
            raise ValueError(f"beta must be in (0, 1), got {beta}")
        weights = (1.0 - beta) / (1.0 - np.power(beta, counts))
    else:
        raise ValueError(f"unknown class weight scheme {scheme!r} (inverse or effective)")
    weights = weights / weights.mean()
    return torch.tensor(weights, dtype=torch.float32)


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): cross-entropy scaled by (1 - p_true)^gamma, so easy examples count less.

    Built on cross-entropy per sample (with the same class weights and label smoothing), and averaged the way
    F.cross_entropy averages (by the summed weight of the targets), so gamma=0 is exactly nn.CrossEntropyLoss.
    """

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.gamma = float(gamma)
        self.label_smoothing = float(label_smoothing)
        self.register_buffer("weight", weight.clone().float() if weight is not None else None)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        ce = F.cross_entropy(
            logits, target, weight=self.weight, label_smoothing=self.label_smoothing, reduction="none"
        )
        if self.gamma != 0.0:
            p_true = F.log_softmax(logits, dim=1).gather(1, target.unsqueeze(1)).squeeze(1).exp()
            ce = (1.0 - p_true).clamp(min=0.0).pow(self.gamma) * ce
        if self.weight is not None:
            return ce.sum() / self.weight[target].sum()
        return ce.mean()


def make_criterion(
    strategy: str, labels: np.ndarray, num_classes: int, *, focal_gamma: float = 2.0, label_smoothing: float = 0.0
) -> nn.Module:
    """The training loss for an imbalance strategy ("oversample" fixes the data instead, so it keeps plain CE)."""
    if strategy in ("none", "oversample"):
        return nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    if strategy == "weighted_loss":
        return nn.CrossEntropyLoss(weight=class_weights(labels, num_classes), label_smoothing=label_smoothing)
    if strategy == "focal":
        return FocalLoss(gamma=focal_gamma, label_smoothing=label_smoothing)
    raise HamtuneError(f"imbalance: unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")


def epoch_indices(strategy: str, labels: np.ndarray, generator: np.random.Generator) -> np.ndarray:
    """The sample order for one epoch: a permutation, or for "oversample" an equally long class-balanced draw.

    Oversampling draws with replacement with probability proportional to 1 / (size of the sample's class), so every
    class present is drawn equally often in expectation while the epoch keeps its usual length.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    if strategy != "oversample":
        return generator.permutation(n)
    counts = np.bincount(labels)
    probabilities = 1.0 / counts[labels]
    probabilities /= probabilities.sum()
    return generator.choice(n, size=n, replace=True, p=probabilities)
