"""The pretrained weights a search needs, read once on the driver before Ray or any trial starts.

Every (model, pretrained) pair a trial may get is read here (hamtune's weights store or the timm/HF caches for
`pretrained: true`, the file for a path), so that a missing or unreadable file is one line and exit 2 before anything
runs. The driver then ships the state dicts to the trials through the Ray object store, as it ships the data: no node
needs a cache, and no trial touches the network or the disk for weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from hamtune.search.space import possible_values
from hamtune.training.config import TrainConfig
from hamtune.training.weights import read_pretrained


def weight_requests(train: Mapping[str, Any], space: Mapping[str, Any]) -> list[tuple[str, bool | str]]:
    """Every (model, pretrained) pair a trial may get whose pretrained is not false: fixed or `choice` values."""
    def values(key: str) -> list[Any]:
        return possible_values(key, space, train, TrainConfig.default(key)) or []

    pairs = []
    for model in values("model"):
        for pretrained in values("pretrained"):
            if pretrained is not False and (model, pretrained) not in pairs:
                pairs.append((model, pretrained))
    return pairs


def weights_key(model: str, pretrained: bool | str) -> str:
    """How the shipped weights are keyed: a trial looks its own (model, pretrained) up."""
    return f"{model}|{pretrained}"


def read_requested_weights(train: Mapping[str, Any], space: Mapping[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    """The state dict of every pair weight_requests names, keyed by weights_key; the first that cannot be read is
    one HamtuneError line."""
    return {weights_key(model, pretrained): read_pretrained(model, pretrained)
            for model, pretrained in weight_requests(train, space)}
