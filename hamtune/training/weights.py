"""Where a network's pretrained ImageNet weights come from, and reading a weights file safely.

Weights are never downloaded during a search: `pretrained: true` uses the local timm / Hugging Face caches (and
fails at once, saying where it looked, when they are empty), `pretrained: /path/file` reads that file. Files are read
with weights_only loading, so a weights file can never run code.
"""

from __future__ import annotations

import os
from pathlib import Path

import timm
import torch

from hamtune.errors import HamtuneError


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, resolved from the environment NOW (huggingface_hub freezes it at import)."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def find_cached_weights(name: str) -> Path:
    """Find timm's pretrained weights for `name` in the local HF cache or torch hub cache, or fail with a how-to."""
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise HamtuneError(f"pretrained: timm has no pretrained weights for model {name!r}; use pretrained: false")
    looked: list[str] = []
    if cfg.hf_hub_id:
        repo_id, _, revision = cfg.hf_hub_id.partition("@")
        cache = hf_cache_dir()
        filenames = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for filename in filenames:
            found = try_to_load_from_cache(repo_id, filename, cache_dir=cache, revision=revision or None)
            if isinstance(found, str):
                return Path(found)
        looked.append(f"{cache}/models--{repo_id.replace('/', '--')} ({' or '.join(filenames)})")
    if cfg.url:
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
        if candidate.is_file():
            return candidate
        looked.append(str(candidate))
    raise HamtuneError(
        f"pretrained: true needs {name}'s ImageNet weights in a local cache and hamtune never downloads them; "
        f"looked in {'; '.join(looked)}. Either set `pretrained: /path/to/weights.pth` (or .safetensors), or "
        f"pre-populate the cache on a machine with internet (python -c \"import timm; "
        f"timm.create_model('{name}', pretrained=True)\") and point HF_HOME at it"
    )


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors or torch file, through timm's loader (weights_only: no pickled code runs;
    {"state_dict": ...} / {"model": ...} wrappers and "module." prefixes are unwrapped)."""
    from timm.models import load_state_dict

    path = Path(path).expanduser()
    if not path.is_file():
        raise HamtuneError(f"pretrained: weights file {str(path)!r} does not exist")
    try:
        state = load_state_dict(str(path), use_ema=False, weights_only=True)
    except Exception as exc:  # torch/safetensors raise many types for a bad file; the user needs one message
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise HamtuneError(f"pretrained: cannot read weights file {str(path)!r}: {type(exc).__name__}: {first}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise HamtuneError(f"pretrained: {str(path)!r} does not hold a state dict of tensors")
    return dict(state)
