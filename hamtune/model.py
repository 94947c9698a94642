"""The classifier: a timm backbone that returns pooled features, optional metadata features, and a small custom head.

The model takes images as float NCHW in [0, 1] and normalises them itself with the mean/std of the backbone's
pretrained config, held in buffers, so a saved model carries its own normalisation and callers never need to know it.
"""

from __future__ import annotations

import os
from pathlib import Path

import timm
import torch
from torch import nn

from hamtune.data.ham10000 import META_DIM, NUM_CLASSES
from hamtune.errors import HamtuneError


class HamtuneNet(nn.Module):
    """Backbone (pooled features) [+ metadata embedding] -> head -> logits."""

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        *,
        head_hidden: int = 256,
        head_dropout: float = 0.3,
        meta_dim: int = 0,
        meta_hidden: int = 32,
        mean: tuple[float, ...] = (0.485, 0.456, 0.406),
        std: tuple[float, ...] = (0.229, 0.224, 0.225),
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.meta_dim = meta_dim
        # Persistent buffers: they travel with state_dict, so inference code cannot normalise differently.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

        # What the pooled output really is: models with a pre-logits layer (MobileNetV3, LCNet) output
        # head_hidden_size features, not num_features.
        features = getattr(backbone, "head_hidden_size", None) or backbone.num_features
        if meta_dim > 0:
            # A small embedding lifts the sparse one-hot metadata to a dense vector before it meets image features.
            self.meta_embed = nn.Sequential(nn.Linear(meta_dim, meta_hidden), nn.ReLU(inplace=True))
            features += meta_hidden
        else:
            self.meta_embed = None

        if head_hidden > 0:
            self.head = nn.Sequential(
                nn.Dropout(head_dropout),
                nn.Linear(features, head_hidden),
                nn.ReLU(inplace=True),
                nn.Dropout(head_dropout),
                nn.Linear(head_hidden, num_classes),
            )
        else:
            self.head = nn.Sequential(nn.Dropout(head_dropout), nn.Linear(features, num_classes))

    def forward(self, x: torch.Tensor, meta: torch.Tensor | None = None) -> torch.Tensor:
        x = (x - self.mean) / self.std
        features = self.backbone(x)
        if self.meta_embed is not None:
            if meta is None:
                raise ValueError(f"this model was built with meta_dim={self.meta_dim} and needs metadata features")
            features = torch.cat([features, self.meta_embed(meta.to(features.dtype))], dim=1)
        return self.head(features)


def create_model(
    name: str,
    num_classes: int = 7,
    *,
    head_hidden: int = 256,
    head_dropout: float = 0.3,
    pretrained: bool | str = False,
    meta_dim: int = 0,
) -> HamtuneNet:
    """Build a HamtuneNet around timm backbone `name`.

    pretrained: False = random init; True = timm's ImageNet weights from the LOCAL cache only (never the network,
    so a missing cache fails at once instead of after minutes of hub retries); a path = a .pth/.safetensors file.
    """
    if not timm.is_model(name):
        raise HamtuneError(f"model: unknown timm model {name!r} (see timm.list_models())")
    if pretrained is True:
        backbone = timm.create_model(
            name, pretrained=True, num_classes=0,
            pretrained_cfg_overlay=dict(file=str(_cached_weights(name)), source=""),
        )
    else:
        backbone = timm.create_model(name, pretrained=False, num_classes=0)
        if pretrained:
            load_backbone_weights(backbone, pretrained, name)
    cfg = backbone.pretrained_cfg
    return HamtuneNet(
        backbone,
        num_classes,
        head_hidden=head_hidden,
        head_dropout=head_dropout,
        meta_dim=meta_dim,
        mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(cfg.get("std", (0.229, 0.224, 0.225))),
    )


def build_model(config) -> HamtuneNet:
    """The network a TrainConfig describes (hamtune.config.TrainConfig: model, head, pretrained, use_meta)."""
    return create_model(
        config.model,
        NUM_CLASSES,
        head_hidden=config.head_hidden,
        head_dropout=config.head_dropout,
        pretrained=config.pretrained,
        meta_dim=META_DIM if config.use_meta else 0,
    )


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, resolved from the environment NOW (huggingface_hub freezes it at import)."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def _cached_weights(name: str) -> Path:
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


def load_backbone_weights(backbone: nn.Module, path: str | os.PathLike, name: str) -> None:
    """Load an ImageNet-style checkpoint into a headless timm backbone: drop its classifier, strict on the rest."""
    state = read_weights(path)
    classifiers = backbone.pretrained_cfg.get("classifier") or ()
    if isinstance(classifiers, str):
        classifiers = (classifiers,)
    state = {k: v for k, v in state.items() if not any(k.startswith(c + ".") for c in classifiers)}
    own = backbone.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong_shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if keys:
                parts.append(f"{len(keys)} {label} ({', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''})")
        raise HamtuneError(f"pretrained: {str(path)!r} does not fit model {name!r}: " + "; ".join(parts))
    backbone.load_state_dict(state, strict=True)
