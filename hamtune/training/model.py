"""The classifier: a timm backbone that returns pooled features, optional metadata features, and a small custom head.

The model takes images as float NCHW in [0, 1] and normalises them itself with the mean/std of the backbone's
pretrained config, held in buffers, so a saved model carries its own normalisation and callers never need to know it.
"""

from __future__ import annotations

import timm
import torch
from torch import nn

from hamtune.errors import HamtuneError
from hamtune.training.weights import check_model_name, describe_mismatch, read_pretrained
from hamtune.vocab import META_DIM, NUM_CLASSES


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
    weights: dict[str, torch.Tensor] | None = None,
) -> HamtuneNet:
    """Build a HamtuneNet around timm backbone `name`.

    pretrained: False = random init; True = ImageNet weights from hamtune's weights store or the local timm / HF
    caches (never the network: missing weights fail at once, naming the `hamtune weights install` that fixes it);
    a path = a .pth/.safetensors file. weights: the state dict itself, already read (what a search ships to its
    trials through the object store); it replaces reading `pretrained` here.
    """
    check_model_name(name)
    backbone = timm.create_model(name, pretrained=False, num_classes=0)
    if weights is not None:
        load_backbone_weights(backbone, weights, name, "the weights the search shipped")
    elif pretrained is not False:
        where = f"{pretrained!r}" if isinstance(pretrained, str) else f"{name}'s installed ImageNet weights"
        load_backbone_weights(backbone, read_pretrained(name, pretrained), name, where)
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


def build_model(config, weights: dict[str, torch.Tensor] | None = None) -> HamtuneNet:
    """The network a TrainConfig describes (hamtune.training.config.TrainConfig: model, head, pretrained, use_meta);
    `weights`, when given, are the pretrained backbone's state dict, already read."""
    return create_model(
        config.model,
        NUM_CLASSES,
        head_hidden=config.head_hidden,
        head_dropout=config.head_dropout,
        pretrained=config.pretrained,
        meta_dim=META_DIM if config.use_meta else 0,
        weights=weights,
    )


def load_backbone_weights(backbone: nn.Module, state: dict[str, torch.Tensor], name: str, where: str) -> None:
    """Load an ImageNet-style state dict into a headless timm backbone: its classifier dropped, every other tensor
    required shape for shape (BatchNorm's num_batches_tracked counters may be missing, as PyTorch allows)."""
    classifiers = backbone.pretrained_cfg.get("classifier") or ()
    if isinstance(classifiers, str):
        classifiers = (classifiers,)
    state = {k: v for k, v in state.items() if not any(k.startswith(c + ".") for c in classifiers)}
    own = backbone.state_dict()
    missing = sorted(k for k in set(own) - set(state) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
                   if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong_shape:
        raise HamtuneError(f"pretrained: {where} does not fit model {name!r}: "
                           + describe_mismatch(missing, unexpected, wrong_shape))
    backbone.load_state_dict(state, strict=False)  # strict in effect: only the counters may be missing
