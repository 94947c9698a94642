"""The training settings of one run (TrainConfig) and their checks, apart from the loop that uses them.

A pydantic model: types and ranges are declared once per field, with the words a user sees when a value is wrong.
Checking a YAML spec, rebuilding a model file or listing a search space needs the settings, not PyTorch's training
machinery: this module imports neither torch nor the loop (timm only when a model name is checked).
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Mapping
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from hamtune.errors import HamtuneError
from hamtune.vocab import IMBALANCE_STRATEGIES, OPTIMIZERS


def _plain(value: Any) -> Any:
    """numpy scalars (Ray Tune samples them) as Python values; everything else unchanged."""
    return value.item() if isinstance(value, np.generic) else value


def _whole(value: Any) -> Any:
    """8.0 from a float search space is a fine batch size; 1.5 stays a float and is refused as an integer."""
    value = _plain(value)
    if isinstance(value, float) and not isinstance(value, bool) and value.is_integer():
        return int(value)
    return value


def _path_or_flag(value: Any) -> Any:
    value = _plain(value)
    return os.fspath(value) if isinstance(value, os.PathLike) else value


# strict: no "8" for 8, no True for 1, no 1 for True; ints are fine where floats are expected.
Int = Annotated[int, BeforeValidator(_whole), Field(strict=True)]
Float = Annotated[float, BeforeValidator(_plain), Field(strict=True, allow_inf_nan=False)]
Bool = Annotated[bool, BeforeValidator(_plain), Field(strict=True)]
Str = Annotated[str, Field(strict=True)]


def expect(text: str, **constraints: Any) -> Any:
    """A field constraint with the words of its one-line error ("expected >= 1")."""
    return Field(json_schema_extra={"expected": text}, **constraints)


class TrainConfig(BaseModel):
    """Every knob of one training run; the search space is a subset of these keys."""

    model_config = ConfigDict(extra="forbid", frozen=False, validate_assignment=True, protected_namespaces=())

    model: Str = expect("a timm model name (see timm.list_models())", default="resnet10t")
    # True = ImageNet weights from hamtune's weights store or the timm/HF caches; str = a .pth/.safetensors file
    pretrained: Annotated[Annotated[bool, Field(strict=True)] | Annotated[str, Field(strict=True)],
                          BeforeValidator(_path_or_flag)] = expect(
        "true, false or a weights file path", default=False)
    head_hidden: Int = expect(">= 0 (0 = a single linear layer)", default=256, ge=0)
    head_dropout: Float = expect("in [0, 1)", default=0.3, ge=0.0, lt=1.0)
    use_meta: Bool = expect("true or false", default=False)
    epochs: Int = expect(">= 1", default=10, ge=1)
    batch_size: Int = expect(">= 2 (BatchNorm needs two samples)", default=64, ge=2)
    optimizer: Str = expect(f"one of {', '.join(OPTIMIZERS)}", default="adamw")
    lr: Float = expect("> 0", default=1e-3, gt=0.0)
    # fine-tuning: the pretrained backbone learns at lr * backbone_lr_scale, the new head at lr
    backbone_lr_scale: Float = expect("in (0, 1]", default=1.0, gt=0.0, le=1.0)
    weight_decay: Float = expect(">= 0", default=1e-4, ge=0.0)
    momentum: Float = expect("in [0, 1)", default=0.9, ge=0.0, lt=1.0)
    warmup_epochs: Float = expect("in [0, epochs]", default=1.0, ge=0.0)
    label_smoothing: Float = expect("in [0, 1)", default=0.0, ge=0.0, lt=1.0)
    augment_strength: Float = expect("in [0, 1]", default=0.5, ge=0.0, le=1.0)
    imbalance: Str = expect(f"one of {', '.join(IMBALANCE_STRATEGIES)}", default="none")
    focal_gamma: Float = expect("in [0, 10]", default=2.0, ge=0.0, le=10.0)
    seed: Int = expect(">= 0", default=0, ge=0)
    device: Str = expect("auto, cpu, cuda or cuda:N", default="auto")
    amp: Bool = expect("true or false", default=True)  # mixed precision on CUDA (bf16 where supported, else fp16)
    cpu_amp: Bool = expect("true or false", default=False)  # bf16 autocast on CPU: faster for some models, measure
    channels_last: Bool = expect("true or false", default=True)  # NHWC memory format, on CPU and CUDA
    compile: Bool = expect("true or false", default=False)
    num_threads: Int | None = expect(">= 1 or null", default=None, ge=1)

    @model_validator(mode="after")
    def _check_choices(self) -> TrainConfig:
        checks = [
            ("model", _is_timm_model(self.model)),
            ("optimizer", self.optimizer in OPTIMIZERS),
            ("warmup_epochs", self.warmup_epochs <= self.epochs),
            ("imbalance", self.imbalance in IMBALANCE_STRATEGIES),
            ("device", _is_device(self.device)),
            ("pretrained", self.pretrained != ""),
        ]
        for key, ok in checks:
            if not ok:
                raise ValueError(key)
        return self

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise config_error(exc, values) from None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """Validate and convert a plain mapping (YAML, a Ray Tune sample); bad input -> HamtuneError naming the key."""
        if not isinstance(d, Mapping):
            raise HamtuneError(f"train config: expected a mapping of keys to values, got {type(d).__name__}")
        return cls(**{str(k): v for k, v in d.items()})

    @classmethod
    def default(cls, key: str) -> Any:
        """The default value of one setting, without building (and validating) a whole config."""
        return cls.model_fields[key].default

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some settings changed, checked like any other config."""
        return TrainConfig.from_dict({**self.to_dict(), **changes})


def config_error(exc: ValidationError, values: Mapping[str, Any]) -> HamtuneError:
    """pydantic's first complaint as hamtune's one line: the key, the value, what was expected."""
    error = exc.errors(include_url=False)[0]
    if error["type"] == "extra_forbidden":
        known = sorted(TrainConfig.model_fields)
        unknown = sorted(str(k) for k in values if k not in TrainConfig.model_fields)
        hint = difflib.get_close_matches(unknown[0], known, n=1) if unknown else []
        return HamtuneError(f"train config: unknown key(s) {', '.join(unknown)}"
                            + (f" (did you mean {hint[0]}?)" if hint else "") + f"; known keys: {', '.join(known)}")
    if error["type"] == "value_error":  # _check_choices names the key
        key = str(error["ctx"]["error"])
    else:
        key = str(error["loc"][0]) if error["loc"] else "?"
    field = TrainConfig.model_fields.get(key)
    expected = (field.json_schema_extra or {}).get("expected", "") if field else ""
    if key == "warmup_epochs":
        expected = f"in [0, epochs={values.get('epochs', TrainConfig.default('epochs'))}]"
    if key == "model":
        expected = model_name_hint(values.get(key))
    value = _plain(values.get(key))
    kind = ""
    if error["type"] in _TYPE_WORDS:  # the wrong kind of value: say which kind was given and which is needed
        kind = f" ({type(value).__name__})"
        if key != "pretrained":  # a union: its own words already name both kinds
            expected = _TYPE_WORDS[error["type"]] + (f" {expected}" if expected[:1] in "<>=i" else "")
    elif isinstance(value, float) and not math.isfinite(value):
        expected = "a finite number"
    return HamtuneError(f"train config: {key}={value!r}{kind} is invalid; expected {expected}")


_TYPE_WORDS = {"int_type": "an integer", "int_from_float": "an integer", "float_type": "a number",
               "bool_type": "true or false", "string_type": "a string"}


def model_name_hint(name: Any) -> str:
    """What to say about a model name timm does not know: the nearest names it does know."""
    import timm

    near = difflib.get_close_matches(str(name), timm.list_models(), n=3, cutoff=0.6)
    return "a timm model name (see timm.list_models())" + (f"; did you mean {', '.join(near)}?" if near else "")


def _is_timm_model(name: str) -> bool:
    import timm

    return timm.is_model(name)


def _is_device(name: str) -> bool:
    if name in ("auto", "cpu", "cuda", "mps"):
        return True
    head, _, tail = name.partition(":")
    return head == "cuda" and tail.isdigit()

