"""The training settings of one run (TrainConfig) and their checks, apart from the loop that uses them.

Checking a YAML spec, rebuilding a model file or listing a search space needs the settings, not PyTorch's training
machinery: this module imports neither torch nor the loop (timm only when a model name is checked).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from hamtune.errors import HamtuneError

IMBALANCE_STRATEGIES = ("none", "weighted_loss", "oversample", "focal")
OPTIMIZERS = ("adamw", "sgd")


@dataclass
class TrainConfig:
    """Every knob of one training run; the search space is a subset of these keys."""

    model: str = "resnet10t"
    pretrained: bool | str = False  # True = local timm/HF cache only; str = path to .pth/.safetensors
    head_hidden: int = 256
    head_dropout: float = 0.3
    use_meta: bool = False
    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    augment_strength: float = 0.5
    imbalance: str = "none"  # none | weighted_loss | oversample | focal
    focal_gamma: float = 2.0
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    channels_last: bool = True
    compile: bool = False
    num_threads: int | None = None

    def __post_init__(self) -> None:
        # Check and convert every field, however the config was made (from_dict, direct, dataclasses.replace).
        for f in dataclasses.fields(self):
            setattr(self, f.name, _convert(f.name, getattr(self, f.name), _FIELD_TYPES[f.name]))
        self.validate()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """Validate and convert a plain mapping (YAML, a Ray Tune sample); bad input -> HamtuneError naming the key."""
        if not isinstance(d, Mapping):
            raise HamtuneError(f"train config: expected a mapping of keys to values, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in d if k not in known)
        if unknown:
            raise HamtuneError(
                f"train config: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}"
            )
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Range checks (types were checked and converted by __post_init__)."""
        checks = [
            ("model", _is_timm_model(self.model), "a timm model name (see timm.list_models())"),
            ("head_hidden", self.head_hidden >= 0, ">= 0 (0 = a single linear layer)"),
            ("head_dropout", 0.0 <= self.head_dropout < 1.0, "in [0, 1)"),
            ("epochs", self.epochs >= 1, ">= 1"),
            ("batch_size", self.batch_size >= 2, ">= 2 (BatchNorm needs two samples)"),
            ("optimizer", self.optimizer in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}"),
            ("lr", self.lr > 0.0 and math.isfinite(self.lr), "> 0"),
            ("weight_decay", self.weight_decay >= 0.0, ">= 0"),
            ("momentum", 0.0 <= self.momentum < 1.0, "in [0, 1)"),
            ("warmup_epochs", 0.0 <= self.warmup_epochs <= self.epochs, f"in [0, epochs={self.epochs}]"),
            ("label_smoothing", 0.0 <= self.label_smoothing < 1.0, "in [0, 1)"),
            ("augment_strength", 0.0 <= self.augment_strength <= 1.0, "in [0, 1]"),
            ("imbalance", self.imbalance in IMBALANCE_STRATEGIES, f"one of {', '.join(IMBALANCE_STRATEGIES)}"),
            ("focal_gamma", 0.0 <= self.focal_gamma <= 10.0, "in [0, 10]"),
            ("seed", self.seed >= 0, ">= 0"),
            ("device", _is_device(self.device), "auto, cpu, cuda or cuda:N"),
            ("num_threads", self.num_threads is None or self.num_threads >= 1, ">= 1 or null"),
        ]
        for key, ok, expected in checks:
            if not ok:
                raise HamtuneError(f"train config: {key}={getattr(self, key)!r} is invalid; expected {expected}")
        if isinstance(self.pretrained, str) and not self.pretrained:
            raise HamtuneError("train config: pretrained='' is invalid; expected true, false or a weights file path")


_FIELD_TYPES = {
    "model": str, "pretrained": "bool|str", "head_hidden": int, "head_dropout": float, "use_meta": bool,
    "epochs": int, "batch_size": int, "optimizer": str, "lr": float, "weight_decay": float, "momentum": float,
    "warmup_epochs": float, "label_smoothing": float, "augment_strength": float, "imbalance": str,
    "focal_gamma": float, "seed": int, "device": str, "amp": bool, "channels_last": bool, "compile": bool,
    "num_threads": "int|None",
}


def _convert(key: str, value: Any, kind: Any) -> Any:
    """Accept numpy scalars (Ray Tune samples them) and ints for floats; reject bools posing as numbers."""
    def bad(expected: str) -> HamtuneError:
        shown = value.item() if isinstance(value, np.generic) else value  # 0.5, not np.float64(0.5)
        return HamtuneError(f"train config: {key}={shown!r} ({type(shown).__name__}) is invalid; expected {expected}")

    if kind == "int|None":
        return None if value is None else _convert(key, value, int)
    if kind == "bool|str":
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        if isinstance(value, (str, os.PathLike)):
            return os.fspath(value)
        raise bad("true, false or a weights file path")
    if kind is bool:
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        raise bad("true or false")
    if kind is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
            return int(value)
        if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and float(value).is_integer():
            return int(value)  # 8.0 from a float search space is a fine batch size
        raise bad("an integer")
    if kind is float:
        if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
            if not math.isfinite(float(value)):
                raise bad("a finite number")
            return float(value)
        raise bad("a number")
    if kind is str:
        if isinstance(value, str):
            return value
        raise bad("a string")
    raise AssertionError(kind)


def _is_timm_model(name: str) -> bool:
    import timm

    return timm.is_model(name)


def _is_device(name: str) -> bool:
    if name in ("auto", "cpu", "cuda", "mps"):
        return True
    head, _, tail = name.partition(":")
    return head == "cuda" and tail.isdigit()
