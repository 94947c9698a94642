"""A trained network's outputs for a stack of uint8 images: logits, probabilities, and test-time augmentation over
the eight symmetries of a square (dermoscopy has no orientation)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hamtune.training.batches import array_to_device, images_to_input
from hamtune.training.device import amp_dtype_for, autocast
from hamtune.vocab import NUM_CLASSES


@torch.inference_mode()
def logits(model: nn.Module, images: np.ndarray, meta: np.ndarray | None, *, batch_size: int,
           device: torch.device, tta: bool = False) -> torch.Tensor:
    """Float32 logits (or, with tta, mean probabilities' log) for all images, in order, on the CPU."""
    model.eval()
    # feed the memory format the weights are in (fit() trains channels_last; a loaded model file is contiguous)
    channels_last = any(p.ndim == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                        for p in model.parameters())
    amp_dtype = amp_dtype_for(device, True)
    uses_meta = getattr(model, "meta_dim", 0) > 0
    if uses_meta and meta is None:
        raise ValueError("this model uses metadata features; pass meta")
    outputs = []
    for start in range(0, len(images), batch_size):
        x = images_to_input(array_to_device(images[start : start + batch_size], device), None, None, channels_last)
        m = array_to_device(meta[start : start + batch_size], device) if uses_meta else None
        views = dihedral_views(x) if tta else [x]
        with autocast(device, amp_dtype):
            out = [model(v, m).float() for v in views]
        if tta:
            # average probabilities over the views; return as log-probs so softmax recovers the mean
            outputs.append(torch.stack([F.softmax(z, dim=1) for z in out]).mean(0).log().cpu())
        else:
            outputs.append(out[0].cpu())
    if not outputs:
        return torch.zeros(0, getattr(model, "num_classes", NUM_CLASSES))
    return torch.cat(outputs)


def dihedral_views(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 symmetries of a square NCHW batch: the 4 flips, and each of them transposed (the 90-degree turns)."""
    flips = [x, x.flip(3), x.flip(2), x.flip(2, 3)]
    return flips + [v.transpose(2, 3) for v in flips]


def predict_proba(model: nn.Module, images: np.ndarray, meta: np.ndarray | None = None, *, batch_size: int = 256,
                  device: str | torch.device = "cpu", tta: bool = False) -> np.ndarray:
    """Class probabilities (N, C) for uint8 NHWC images; rows sum to 1. Moves the model to `device`.

    tta averages the probabilities over the eight flips and 90-degree rotations.
    """
    device = torch.device(device)
    model.to(device)
    out = logits(model, images, meta, batch_size=batch_size, device=device, tta=tta)
    probs = torch.softmax(out.double(), dim=1).numpy()
    return probs / probs.sum(axis=1, keepdims=True)
