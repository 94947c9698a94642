"""The final model file (model.pt): weights plus everything needed to use them, loadable without unpickling code.

A model file outlives the experiment that made it: `hamtune evaluate` and `hamtune predict` (maybe on another
machine, months later) must rebuild the network, decode images at the right size and read its outputs in the right
class order from the file alone. So the file holds the state dict and, as plain strings/numbers/lists, the timm model
name, head settings, class names and order, image size, normalisation mean/std, metadata usage, the full TrainConfig
and the data fingerprint. Only tensors and primitives go in, so `torch.load(weights_only=True)` reads it: loading a
model file never runs code from it.

Format version 2 holds an ensemble: `members`, a list of one or more networks, each with its own state dict, timm
model name, head settings and full TrainConfig, whose class probabilities are averaged; `temperature` and
`class_bias`, the calibration fitted after training (hamtune.final.calibration; 1.0 and zeros = none), applied to the
averaged probabilities; and `decision_weights`, what decide() multiplies the calibrated probabilities by to pick a
diagnosis (ones = plain argmax; the retrain writes exp(-class_bias), which keeps the networks' own argmax). Format 2
files written before class_bias and decision_weights existed load with zeros and ones. Version 1 files (one
network, its entries at the top level) still load, as a one-member ensemble at temperature 1.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hamtune.errors import HamtuneError
from hamtune.final.calibration import apply_calibration
from hamtune.io import atomic_write_bytes, json_ready, now_iso
from hamtune.training.config import TrainConfig
from hamtune.training.metrics import decide as decide_classes
from hamtune.training.model import build_model
from hamtune.training.predict import predict_proba
from hamtune.vocab import CLASSES, DIAGNOSES, META_DIM

MODEL_FORMAT = "hamtune-model"
MODEL_FORMAT_VERSION = 2
_REQUIRED_KEYS = {1: ("format", "format_version", "state_dict", "model", "classes", "image_size", "config", "use_meta"),
                  2: ("format", "format_version", "members", "temperature", "classes", "image_size")}
_MEMBER_KEYS = ("state_dict", "model", "config", "use_meta")


@dataclass
class LoadedModel:
    """Rebuilt networks in eval mode and the facts from their file that callers need to feed them and read them."""

    path: Path
    members: list[nn.Module]
    member_configs: list[dict[str, Any]]
    classes: list[str]
    image_size: int
    temperature: float
    fingerprint: str | None
    info: dict[str, Any] = field(default_factory=dict)  # every non-tensor entry of the file, for reports
    class_bias: np.ndarray = field(default_factory=lambda: np.zeros(len(CLASSES)))
    decision_weights: np.ndarray = field(default_factory=lambda: np.ones(len(CLASSES)))

    @property
    def calibrated(self) -> bool:
        return self.temperature != 1.0 or bool(np.any(self.class_bias != 0))

    @property
    def use_meta(self) -> bool:
        """Whether any member takes metadata features (the others are simply not given them)."""
        return any(getattr(m, "meta_dim", 0) > 0 for m in self.members)

    @property
    def model(self) -> nn.Module:
        """The network of a single-model file (an ensemble has several: use predict_proba)."""
        if len(self.members) != 1:
            raise HamtuneError(f"{self.path}: an ensemble of {len(self.members)} networks has no single model")
        return self.members[0]

    @property
    def config(self) -> dict[str, Any]:
        return self.member_configs[0]

    def member_proba(self, images, meta=None, *, device: str | torch.device = "cpu", tta: bool = False) -> list:
        """Each member's (N, C) probabilities, uncalibrated."""
        return [predict_proba(m, images, meta if getattr(m, "meta_dim", 0) > 0 else None, device=device, tta=tta)
                for m in self.members]

    def predict_proba(self, images, meta=None, *, device: str | torch.device = "cpu", tta: bool = False):
        """(N, C) probabilities: the members' average, calibrated with the file's temperature and class biases."""
        mean = np.mean(self.member_proba(images, meta, device=device, tta=tta), axis=0)
        return apply_calibration(mean, self.temperature, self.class_bias) if self.calibrated else mean

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """The diagnosis index this file's decision rule picks for each row of predict_proba's output."""
        return decide_classes(probs, self.decision_weights)


def member_record(model: nn.Module, *, config: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One network of a model file: CPU tensors and primitives only (what weights_only=True accepts)."""
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    mean = [float(v) for v in state["mean"].flatten()] if "mean" in state else None
    std = [float(v) for v in state["std"].flatten()] if "std" in state else None
    return {
        "state_dict": state,
        "model": str(config["model"]),
        "head_hidden": int(config.get("head_hidden", 0)),
        "head_dropout": float(config.get("head_dropout", 0.0)),
        "use_meta": bool(config.get("use_meta", False)),
        "meta_dim": META_DIM if config.get("use_meta") else 0,
        "mean": mean,
        "std": std,
        "config": json_ready(config),
        **json_ready(extra or {}),
    }


def ensemble_record(members: list[dict[str, Any]], *, image_size: int, fingerprint: str | None,
                    temperature: float = 1.0, class_bias: Any = None, decision_weights: Any = None,
                    calibration: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The dict saved as model.pt (format version 2) from member_record()s."""
    if not members:
        raise ValueError("a model file needs at least one member")
    names = [m["model"] for m in members]
    return {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "members": members,
        "temperature": float(temperature),
        "class_bias": [float(b) for b in (np.zeros(len(CLASSES)) if class_bias is None else class_bias)],
        "decision_weights": [float(w) for w in
                             (np.ones(len(CLASSES)) if decision_weights is None else decision_weights)],
        "calibration": json_ready(calibration),
        "model": names[0] if len(names) == 1 else f"ensemble of {len(names)}: {', '.join(names)}",
        "use_meta": any(m["use_meta"] for m in members),
        "classes": list(CLASSES),
        "diagnoses": [DIAGNOSES[c] for c in CLASSES],
        "image_size": int(image_size),
        "input": "uint8 RGB, short side resized to image_size and centre-cropped (hamtune.data.images.decode_image), "
                 "scaled to [0, 1]; each network normalises with its mean/std itself; probabilities are averaged "
                 "over members, then p -> softmax(log(p) / temperature + class_bias); predicted diagnosis: argmax of "
                 "p * decision_weights",
        "data_fingerprint": fingerprint,
        "created": now_iso(),
        "versions": {"torch": str(torch.__version__), "timm": _timm_version()},
        **json_ready(extra or {}),
    }


def model_record(model: nn.Module, *, config: dict[str, Any], image_size: int, fingerprint: str | None,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A one-network model file's dict."""
    return ensemble_record([member_record(model, config=config)], image_size=image_size, fingerprint=fingerprint,
                           extra=extra)


def save_record(path: Path, record: dict[str, Any]) -> Path:
    """Write a model file's dict atomically (temp file + rename), so a reader never sees half a model."""
    buf = io.BytesIO()
    torch.save(record, buf)
    buf.seek(0)
    torch.load(buf, map_location="cpu", weights_only=True)  # refuse to write a file that readers could not load safely
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def save_model(path: Path, model: nn.Module, *, config: dict[str, Any], image_size: int, fingerprint: str | None,
               extra: dict[str, Any] | None = None) -> Path:
    """Write a one-network model.pt atomically."""
    return save_record(path, model_record(model, config=config, image_size=image_size, fingerprint=fingerprint,
                                          extra=extra))


def read_model_record(path: Path) -> dict[str, Any]:
    """The raw dict of a model file (version 1 lifted to version 2's shape), checked to be a hamtune model with this
    product's class order."""
    path = Path(path)
    if not path.is_file():
        raise HamtuneError(f"{path}: model file not found (expected model.pt written by `hamtune best --retrain`)")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt zip, truncated file, pickled objects weights_only refuses: all unusable
        raise HamtuneError(f"{path}: not a readable hamtune model file ({type(exc).__name__}: {_one_line(exc)})") from None
    if not isinstance(record, dict) or record.get("format") != MODEL_FORMAT:
        raise HamtuneError(f"{path}: not a hamtune model file (no format={MODEL_FORMAT!r} entry; expected model.pt "
                           "written by `hamtune best --retrain`)")
    version = record.get("format_version")
    if version not in _REQUIRED_KEYS:
        raise HamtuneError(f"{path}: model file format version {version!r}; this hamtune reads versions "
                           f"{', '.join(map(str, _REQUIRED_KEYS))}")
    missing = [k for k in _REQUIRED_KEYS[version] if k not in record]
    if missing:
        raise HamtuneError(f"{path}: hamtune model file lacks {', '.join(missing)}")
    if version == 1:
        member = {k: record[k] for k in ("state_dict", "model", "head_hidden", "head_dropout", "use_meta", "meta_dim",
                                         "mean", "std", "config") if k in record}
        record = {k: v for k, v in record.items() if k not in member or k in ("model", "use_meta")}
        record.update(members=[member], temperature=1.0, calibration=None)
    members = record["members"]
    if not isinstance(members, list) or not members or not all(isinstance(m, dict) for m in members):
        raise HamtuneError(f"{path}: 'members' must be a non-empty list of networks")
    for i, member in enumerate(members):
        lacking = [k for k in _MEMBER_KEYS if k not in member]
        if lacking:
            raise HamtuneError(f"{path}: member {i} lacks {', '.join(lacking)}")
    temperature = record["temperature"]
    if not isinstance(temperature, (int, float)) or not 0 < temperature < float("inf"):
        raise HamtuneError(f"{path}: temperature {temperature!r}; expected a positive number")
    for key, default, what in (("class_bias", 0.0, "finite numbers"), ("decision_weights", 1.0, "positive numbers")):
        values = record.setdefault(key, [default] * len(CLASSES))
        if (not isinstance(values, (list, tuple)) or len(values) != len(CLASSES)
                or not all(isinstance(v, (int, float)) and np.isfinite(v) and (key == "class_bias" or v > 0)
                           for v in values)):
            raise HamtuneError(f"{path}: {key} {values!r}; expected {len(CLASSES)} {what}, one per class")
    if list(record["classes"]) != list(CLASSES):
        raise HamtuneError(f"{path}: model class order {list(record['classes'])} differs from this hamtune's "
                           f"{list(CLASSES)}; its outputs would be read as the wrong diagnoses")
    return record


def load_model(path: Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild every network of a model file (weights_only load), in eval mode on `device`."""
    path = Path(path)
    record = read_model_record(path)
    networks = []
    for i, member in enumerate(record["members"]):
        # pretrained only decides the initial weights, which the state dict replaces: never look for ImageNet weights.
        try:
            config = TrainConfig.from_dict({**member["config"], "pretrained": False})
            model = build_model(config)
            model.load_state_dict(member["state_dict"], strict=True)
        except (HamtuneError, RuntimeError, KeyError, TypeError, ValueError) as exc:
            which = f" of member {i}" if len(record["members"]) > 1 else ""
            raise HamtuneError(f"{path}: the weights{which} do not fit the recorded model "
                               f"{member.get('model')!r} ({_one_line(exc)})") from None
        networks.append(model.to(device).eval())
    info = {k: v for k, v in record.items() if k != "members"}
    info["members"] = [{k: v for k, v in m.items() if k != "state_dict"} for m in record["members"]]
    return LoadedModel(path=path, members=networks, member_configs=[dict(m["config"]) for m in record["members"]],
                       classes=list(record["classes"]), image_size=int(record["image_size"]),
                       temperature=float(record["temperature"]), fingerprint=record.get("data_fingerprint"), info=info,
                       class_bias=np.asarray(record["class_bias"], dtype=np.float64),
                       decision_weights=np.asarray(record["decision_weights"], dtype=np.float64))


def _one_line(exc: BaseException) -> str:
    """The telling line of a long library message (torch's weights_only errors span a page)."""
    import re

    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(exc).splitlines()]
    lines = [line for line in lines if line] or [type(exc).__name__]
    telling = next((line for line in lines if "WeightsUnpickler error" in line), lines[0])
    return telling[:200]


def _timm_version() -> str:
    import timm

    return timm.__version__
