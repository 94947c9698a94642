"""The final model file (model.pt): weights plus everything needed to use them, loadable without unpickling code.

A model file outlives the experiment that made it: `hamtune evaluate` and `hamtune predict` (maybe on another
machine, months later) must rebuild the network, decode images at the right size and read its outputs in the right
class order from the file alone. So the file holds the state dict and, as plain strings/numbers/lists, the timm model
name, head settings, class names and order, image size, normalisation mean/std, metadata usage, the full TrainConfig
and the data fingerprint. Only tensors and primitives go in, so `torch.load(weights_only=True)` reads it: loading a
model file never runs code from it.
"""

from __future__ import annotations

import datetime as _dt
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hamtune.data.ham10000 import CLASSES, DIAGNOSES, META_DIM
from hamtune.errors import HamtuneError
from hamtune.io import atomic_write_bytes, json_ready

MODEL_FORMAT = "hamtune-model"
MODEL_FORMAT_VERSION = 1
_REQUIRED_KEYS = ("format", "format_version", "state_dict", "model", "classes", "image_size", "config", "use_meta")


@dataclass
class LoadedModel:
    """A rebuilt network in eval mode and the facts from its file that callers need to feed it and read it."""

    path: Path
    model: nn.Module
    classes: list[str]
    image_size: int
    use_meta: bool
    config: dict[str, Any]
    fingerprint: str | None
    info: dict[str, Any] = field(default_factory=dict)  # every non-tensor entry of the file, for reports


def model_record(model: nn.Module, *, config: dict[str, Any], image_size: int, fingerprint: str | None,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The dict saved as model.pt: CPU tensors and primitives only (what weights_only=True accepts)."""
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    mean = [float(v) for v in state["mean"].flatten()] if "mean" in state else None
    std = [float(v) for v in state["std"].flatten()] if "std" in state else None
    return {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "state_dict": state,
        "model": str(config["model"]),
        "head_hidden": int(config.get("head_hidden", 0)),
        "head_dropout": float(config.get("head_dropout", 0.0)),
        "use_meta": bool(config.get("use_meta", False)),
        "meta_dim": META_DIM if config.get("use_meta") else 0,
        "classes": list(CLASSES),
        "diagnoses": [DIAGNOSES[c] for c in CLASSES],
        "image_size": int(image_size),
        "input": "uint8 RGB, short side resized to image_size and centre-cropped (hamtune.data.cache.decode_image), "
                 "scaled to [0, 1]; the network normalises with mean/std itself",
        "mean": mean,
        "std": std,
        "config": json_ready(config),
        "data_fingerprint": fingerprint,
        "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "versions": {"torch": str(torch.__version__), "timm": _timm_version()},
        **json_ready(extra or {}),
    }


def save_model(path: Path, model: nn.Module, *, config: dict[str, Any], image_size: int, fingerprint: str | None,
               extra: dict[str, Any] | None = None) -> Path:
    """Write model.pt atomically (temp file + rename), so a reader never sees half a model."""
    buf = io.BytesIO()
    torch.save(model_record(model, config=config, image_size=image_size, fingerprint=fingerprint, extra=extra), buf)
    buf.seek(0)
    torch.load(buf, map_location="cpu", weights_only=True)  # refuse to write a file that readers could not load safely
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def read_model_record(path: Path) -> dict[str, Any]:
    """The raw dict of a model file, checked to be a hamtune model with this product's class order."""
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
    missing = [k for k in _REQUIRED_KEYS if k not in record]
    if missing:
        raise HamtuneError(f"{path}: hamtune model file lacks {', '.join(missing)}")
    if record["format_version"] != MODEL_FORMAT_VERSION:
        raise HamtuneError(f"{path}: model file format version {record['format_version']!r}; this hamtune reads "
                           f"version {MODEL_FORMAT_VERSION}")
    if list(record["classes"]) != list(CLASSES):
        raise HamtuneError(f"{path}: model class order {list(record['classes'])} differs from this hamtune's "
                           f"{list(CLASSES)}; its outputs would be read as the wrong diagnoses")
    return record


def load_model(path: Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the network from a model file (weights_only load), in eval mode on `device`."""
    from hamtune.config import TrainConfig
    from hamtune.model import build_model

    path = Path(path)
    record = read_model_record(path)
    # pretrained only decides the initial weights, which the state dict replaces: never look for ImageNet weights.
    try:
        config = TrainConfig.from_dict({**record["config"], "pretrained": False})
        model = build_model(config)
        model.load_state_dict(record["state_dict"], strict=True)
    except (HamtuneError, RuntimeError, KeyError, TypeError, ValueError) as exc:
        raise HamtuneError(f"{path}: the weights do not fit the recorded model {record.get('model')!r} "
                           f"({_one_line(exc)})") from None
    model.to(device).eval()
    info = {k: v for k, v in record.items() if k != "state_dict"}
    return LoadedModel(path=path, model=model, classes=list(record["classes"]), image_size=int(record["image_size"]),
                       use_meta=bool(record["use_meta"]), config=dict(record["config"]),
                       fingerprint=record.get("data_fingerprint"), info=info)


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
