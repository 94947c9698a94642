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

A model file is input like any other, and a small one can ask for a lot: `image_size` 100000 in a 20 MB file made
`predict` allocate 24 GB. So nothing is allocated from a file before it is checked, each check failing in one
HamtuneError naming the file and the key: the file's size and its zip archive's declared contents (torch.load
allocates each record's declared size), before torch.load; then the plain entries (types, image_size within
IMAGE_SIZE_RANGE, 1 to MAX_MEMBERS members, the class order, calibration numbers) and the tensors (plain dense
tensors, MAX_MODEL_TENSOR_BYTES for all members together, so members sharing one stored tensor cannot multiply it);
and each member's network is first built on PyTorch's meta device (no memory) and its parameter shapes compared with
the state dict's, so a changed model name or head width cannot make the real build allocate more than the file holds.
"""

from __future__ import annotations

import io
import reprlib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hamtune.data.images import check_image_size
from hamtune.errors import HamtuneError
from hamtune.final.calibration import apply_calibration
from hamtune.io import atomic_write_bytes, json_ready, now_iso
from hamtune.training.config import TrainConfig
from hamtune.training.metrics import decide as decide_classes
from hamtune.training.model import build_model
from hamtune.training.predict import predict_proba
from hamtune.training.weights import describe_mismatch
from hamtune.vocab import CLASSES, DIAGNOSES, META_DIM

MODEL_FORMAT = "hamtune-model"
MODEL_FORMAT_VERSION = 2
_REQUIRED_KEYS = {1: ("format", "format_version", "state_dict", "model", "classes", "image_size", "config", "use_meta"),
                  2: ("format", "format_version", "members", "temperature", "classes", "image_size")}
_MEMBER_KEYS = ("state_dict", "model", "config", "use_meta")
MAX_MODEL_FILE_BYTES = 4 * 2**30  # the file, and what its zip archive declares it holds once unpacked
MAX_MODEL_TENSOR_BYTES = 4 * 2**30  # every member's weights together, as the rebuilt networks will hold them
MAX_MEMBERS = 32  # networks in one ensemble (`best --top K --seeds ...` writes K x seeds)
MAX_ARCHIVE_RECORDS = 100_000  # zip records (one per stored tensor, plus a few)
MAX_PLAIN_VALUES = 1_000_000  # numbers, strings, lists and dicts outside the state dicts
MAX_PLAIN_DEPTH = 32
_TENSOR_DTYPES = {torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8, torch.int8, torch.int16,
                  torch.int32, torch.int64, torch.bool}


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
    product's class order and within the limits above, before anything is allocated from it (module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise HamtuneError(f"{path}: model file not found (expected model.pt written by `hamtune best --retrain`)")
    _check_archive(path)
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt zip, truncated file, pickled objects weights_only refuses
        raise HamtuneError(f"{path}: not a readable hamtune model file ({type(exc).__name__}: {_one_line(exc)})") from None
    if not isinstance(record, dict) or record.get("format") != MODEL_FORMAT:
        raise HamtuneError(f"{path}: not a hamtune model file (no format={MODEL_FORMAT!r} entry; expected model.pt "
                           "written by `hamtune best --retrain`)")
    version = record.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version not in _REQUIRED_KEYS:
        raise HamtuneError(f"{path}: model file format version {_shown(version)}; this hamtune reads versions "
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
    if len(members) > MAX_MEMBERS:
        raise HamtuneError(f"{path}: members: {len(members)} networks; at most {MAX_MEMBERS} are loaded")
    for i, member in enumerate(members):
        lacking = [k for k in _MEMBER_KEYS if k not in member]
        if lacking:
            raise HamtuneError(f"{path}: member {i} lacks {', '.join(lacking)}")
        if not isinstance(member["model"], str) or not 0 < len(member["model"]) <= 200:
            raise HamtuneError(f"{path}: member {i} model {_shown(member['model'])}; expected a timm model name")
        if not isinstance(member["config"], dict):
            raise HamtuneError(f"{path}: member {i} config {_shown(member['config'])}; expected a mapping")
    _check_tensors(path, members)
    _check_plain(path, {k: v for k, v in record.items() if k != "members"}, "")
    for i, member in enumerate(members):
        _check_plain(path, {k: v for k, v in member.items() if k != "state_dict"}, f"members[{i}].")
    check_image_size(record["image_size"], what=f"{path}: image_size")
    temperature = record["temperature"]
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
            or not 0 < temperature < float("inf")):
        raise HamtuneError(f"{path}: temperature {_shown(temperature)}; expected a positive number")
    for key, default, what in (("class_bias", 0.0, "finite numbers"), ("decision_weights", 1.0, "positive numbers")):
        values = record.setdefault(key, [default] * len(CLASSES))
        if (not isinstance(values, (list, tuple)) or len(values) != len(CLASSES)
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)
                           and (key == "class_bias" or v > 0) for v in values)):
            raise HamtuneError(f"{path}: {key} {_shown(values)}; expected {len(CLASSES)} {what}, one per class")
    classes = record["classes"]
    if not isinstance(classes, (list, tuple)) or list(classes) != list(CLASSES):
        if isinstance(classes, (list, tuple)) and len(classes) != len(CLASSES):
            raise HamtuneError(f"{path}: classes: {len(classes)} classes; expected the {len(CLASSES)} of this "
                               f"hamtune, {list(CLASSES)}")
        raise HamtuneError(f"{path}: model class order {_shown(classes)} differs from this hamtune's "
                           f"{list(CLASSES)}; its outputs would be read as the wrong diagnoses")
    return record


def _check_archive(path: Path) -> None:
    """The file's size, and the zip archive torch.save writes: record count and declared unpacked size, which
    torch.load allocates as it reads (a small deflated record may declare gigabytes). Checked before torch.load."""
    size = path.stat().st_size
    if size > MAX_MODEL_FILE_BYTES:
        raise HamtuneError(f"{path}: model file of {size / 2**30:.1f} GiB; at most {MAX_MODEL_FILE_BYTES / 2**30:g} "
                           "GiB are loaded")
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise HamtuneError(f"{path}: not a readable hamtune model file (not the zip archive torch.save writes: "
                           f"{_one_line(exc)})") from None
    if len(records) > MAX_ARCHIVE_RECORDS:
        raise HamtuneError(f"{path}: model file archive of {len(records)} records; at most {MAX_ARCHIVE_RECORDS}")
    declared = sum(r.file_size for r in records)
    if declared > MAX_MODEL_FILE_BYTES:
        raise HamtuneError(f"{path}: model file archive declares {declared / 2**30:.1f} GiB of contents; at most "
                           f"{MAX_MODEL_FILE_BYTES / 2**30:g} GiB are loaded")


def _check_tensors(path: Path, members: list[dict[str, Any]]) -> None:
    """Every state dict: names to plain dense tensors (no sparse, no strides that view more than is stored), all
    members together within MAX_MODEL_TENSOR_BYTES as the networks will hold them."""
    total = 0
    for i, member in enumerate(members):
        state = member["state_dict"]
        if not isinstance(state, dict) or not state:
            raise HamtuneError(f"{path}: member {i} state_dict {_shown(state)}; expected a mapping of names to tensors")
        for name, tensor in state.items():
            where = f"member {i} state_dict[{_shown(name)}]"
            if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
                raise HamtuneError(f"{path}: {where} is a {type(tensor).__name__}; expected a tensor")
            if tensor.layout != torch.strided or tensor.dtype not in _TENSOR_DTYPES or tensor.dim() > 8:
                raise HamtuneError(f"{path}: {where} is a {tensor.layout} {tensor.dtype} tensor of {tensor.dim()} "
                                   "dimensions; expected a dense real tensor of at most 8")
            nbytes = tensor.numel() * tensor.element_size()
            stored = tensor.untyped_storage().nbytes() - tensor.storage_offset() * tensor.element_size()
            if nbytes > stored:
                raise HamtuneError(f"{path}: {where} has shape {tuple(tensor.shape)} ({nbytes} bytes) over "
                                   f"{max(stored, 0)} stored bytes; expected a dense tensor")
            total += nbytes
    if total > MAX_MODEL_TENSOR_BYTES:
        raise HamtuneError(f"{path}: members' weights total {total / 2**30:.1f} GiB; at most "
                           f"{MAX_MODEL_TENSOR_BYTES / 2**30:g} GiB are loaded")


def _check_plain(path: Path, value: Any, prefix: str) -> None:
    """Everything outside the state dicts: plain data (what json_ready writes) of bounded size and depth, so reports
    and messages can show it; a tensor there would be materialised by whoever prints it."""
    pending = [(f"{prefix}{k}", v, 1) for k, v in value.items()]
    seen = 0
    while pending:
        key, item, depth = pending.pop()
        seen += 1
        if seen > MAX_PLAIN_VALUES or depth > MAX_PLAIN_DEPTH:
            raise HamtuneError(f"{path}: {key}: more than {MAX_PLAIN_VALUES} values or {MAX_PLAIN_DEPTH} levels "
                               "outside the weights; expected the small plain entries hamtune writes")
        if isinstance(item, dict):
            if not all(isinstance(k, str) for k in item):
                raise HamtuneError(f"{path}: {key} has a non-string key; expected plain data")
            pending += [(f"{key}.{k}", v, depth + 1) for k, v in item.items()]
        elif isinstance(item, (list, tuple)):
            pending += [(f"{key}[{j}]", v, depth + 1) for j, v in enumerate(item)]
        elif item is not None and not isinstance(item, (str, int, float, bool)):
            raise HamtuneError(f"{path}: {key} is a {type(item).__name__}; expected plain data (numbers, strings, "
                               "lists; tensors belong in a member's state_dict)")


def _skeleton_mismatch(config: TrainConfig, state: dict[str, torch.Tensor]) -> str | None:
    """Build the network on the meta device (shapes only, no memory) and say how `state` does not fit it; None when
    it fits, or when this architecture cannot be built on the meta device (the checks above still bound it)."""
    try:
        with torch.device("meta"):
            skeleton = build_model(config)
    except HamtuneError:
        raise
    except Exception:  # noqa: BLE001 - an architecture whose constructor needs real numbers
        return None
    own = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k} {tuple(state[k].shape)} vs {own[k]}" for k in own if k in state and tuple(state[k].shape) != own[k]]
    if missing or unexpected or wrong:
        return describe_mismatch(missing, unexpected, wrong)
    return None


def load_model(path: Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild every network of a model file (weights_only load), in eval mode on `device`."""
    path = Path(path)
    record = read_model_record(path)
    networks = []
    for i, member in enumerate(record["members"]):
        which = f" of member {i}" if len(record["members"]) > 1 else ""
        # pretrained only decides the initial weights, which the state dict replaces: never look for ImageNet weights.
        try:
            config = TrainConfig.from_dict({**member["config"], "pretrained": False})
            mismatch = _skeleton_mismatch(config, member["state_dict"])
            if mismatch:
                raise ValueError(mismatch)
            model = build_model(config)
            model.load_state_dict(member["state_dict"], strict=True)
        except (HamtuneError, RuntimeError, KeyError, TypeError, ValueError) as exc:
            raise HamtuneError(f"{path}: the weights{which} do not fit the recorded model "
                               f"{_shown(member.get('model'))} ({_one_line(exc)})") from None
        networks.append(model.to(device).eval())
    info = {k: v for k, v in record.items() if k != "members"}
    info["members"] = [{k: v for k, v in m.items() if k != "state_dict"} for m in record["members"]]
    return LoadedModel(path=path, members=networks, member_configs=[dict(m["config"]) for m in record["members"]],
                       classes=list(record["classes"]), image_size=int(record["image_size"]),
                       temperature=float(record["temperature"]), fingerprint=record.get("data_fingerprint"), info=info,
                       class_bias=np.asarray(record["class_bias"], dtype=np.float64),
                       decision_weights=np.asarray(record["decision_weights"], dtype=np.float64))


_SHORT = reprlib.Repr()  # (keyword arguments only from Python 3.12)
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 2, 8, 8, 4, 40, 40


def _shown(value: Any, limit: int = 80) -> str:
    """A short repr: a message quotes a value, never a megabyte of it (reprlib stops early on long lists)."""
    text = _SHORT.repr(value) if not isinstance(value, torch.Tensor) else f"tensor of shape {tuple(value.shape)}"
    return text if len(text) <= limit else text[:limit] + "..."


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
