"""A model file ready to answer for single images: decode as training did, class probabilities, Grad-CAM heatmaps.

`hamtune serve` holds one Predictor for its lifetime. It owns the decoding (hamtune.data.images.decode_image at the
file's image_size, so an uploaded JPEG becomes exactly the pixels `hamtune predict` would feed the network), the
probabilities (hamtune.training.predict.predict_proba, as `predict` and `evaluate` compute them) and the Grad-CAM heatmap.

Grad-CAM comes from captum's LayerGradCam on one feature stage of the timm backbone (from its `feature_info`): the
deepest stage whose map is still at least CAM_MIN_SIDE pixels on a side at the model's image size. At 224 px that
is the last stage (7x7), as in the Grad-CAM paper; at the small sizes hamtune searches (64 px) the last stage of a
stride-32 network is 2x2, which says little about where in the lesion the evidence lies, so an earlier stage is used.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import ImageFile, UnidentifiedImageError
from torch import nn

from hamtune.data.arrays import unknown_meta
from hamtune.data.images import MAX_IMAGE_PIXELS, ImageRefused, decode_image, open_image
from hamtune.errors import HamtuneError
from hamtune.final.modelfile import LoadedModel, load_model
from hamtune.vocab import DIAGNOSES

CAM_MIN_SIDE = 4  # smallest Grad-CAM map (pixels on a side) worth showing; see the module docstring
_REFUSED_STATUS = {"too_large": 413, "format": 415, "too_small": 422}  # hamtune.data.images.ImageRefused.kind


class ImageRejected(HamtuneError):
    """An image that cannot be used, with the HTTP status that fits why (415 not an image, 413 too big, 422 broken)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class CamLayer:
    """The backbone stage Grad-CAM reads: its module path inside the network and its map size at image_size."""

    name: str
    side: int


def cam_layer(model: nn.Module, image_size: int) -> CamLayer:
    """The deepest feature stage of model.backbone whose map is >= CAM_MIN_SIDE on a side (else the first stage)."""
    info = getattr(model.backbone, "feature_info", None)
    stages = [(f["module"], int(f["reduction"])) for f in info] if isinstance(info, list) else []
    if not stages:
        raise HamtuneError(f"{type(model.backbone).__name__}: timm backbone without feature_info; "
                           "no layer for Grad-CAM")
    fitting = [(name, reduction) for name, reduction in stages if image_size // reduction >= CAM_MIN_SIDE]
    name, reduction = fitting[-1] if fitting else stages[0]
    return CamLayer(name=f"backbone.{name}", side=max(1, image_size // reduction))


class Predictor:
    """A loaded model file: image_size, decode(bytes), predict_proba(uint8 images), gradcam(uint8 image, class).

    Ensemble- and calibration-aware through LoadedModel.predict_proba and decide (members averaged, then
    calibrated; the diagnosis by the file's decision rule: exactly as `predict` and `evaluate` compute them). An ensemble's Grad-CAM is the mean of its members' maps (each
    scaled to [0, 1] first, so no member dominates by the size of its gradients), scaled to [0, 1] again.
    """

    def __init__(self, loaded: LoadedModel, device: str | torch.device = "cpu"):
        self.loaded = loaded
        self.device = torch.device(device)
        self.members = [m.to(self.device).eval() for m in loaded.members]
        self.image_size = int(loaded.image_size)
        self.use_meta = loaded.use_meta
        self.info = dict(loaded.info)
        self.classes = list(loaded.classes)
        self.cams = [cam_layer(m, self.image_size) for m in self.members]
        self._lock = threading.Lock()  # Grad-CAM hooks a layer for one call: no other forward pass may run then

    @classmethod
    def from_file(cls, path: Path, device: str | torch.device = "cpu") -> Predictor:
        """Load model.pt (weights_only, see hamtune.final.modelfile) into a Predictor."""
        return cls(load_model(path, device=device), device=device)

    @property
    def cam_layers(self) -> str:
        """The layer(s) Grad-CAM reads, with their map sizes, e.g. 'backbone.layer3 (4x4)'."""
        return ", ".join(dict.fromkeys(f"{c.name} ({c.side}x{c.side})" for c in self.cams))

    # -- images ---------------------------------------------------------------------------------------------------

    def decode(self, data: bytes, size: int | None = None, *, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
        """Encoded JPEG/PNG bytes -> uint8 (size, size, 3) exactly as the cache decodes files (default: image_size).

        Raises ImageRejected for what is not a JPEG/PNG (415), over max_pixels (413, from the header, before a pixel
        is decoded), under MIN_IMAGE_SIDE on a side (422), or truncated/corrupt (422).
        """
        if not data:
            raise ImageRejected("empty upload; expected a JPEG or PNG image", 415)
        try:
            with open_image(io.BytesIO(data), max_pixels) as probe:  # the header only
                fmt = probe.format
        except ImageRefused as exc:
            raise ImageRejected(str(exc), _REFUSED_STATUS[exc.kind]) from None
        except (UnidentifiedImageError, OSError, ValueError):
            raise ImageRejected("not an image; expected a JPEG or PNG file", 415) from None
        if ImageFile.LOAD_TRUNCATED_IMAGES:  # another library made Pillow pad truncated files with grey: undo it
            ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            return decode_image(io.BytesIO(data), size or self.image_size, max_pixels=max_pixels)
        except Exception as exc:  # noqa: BLE001 - whatever Pillow raises, the file is unusable
            reason = (str(exc).strip().splitlines() or [""])[0]
            raise ImageRejected(f"unreadable {fmt} image ({type(exc).__name__}: {reason})", 422) from None

    # -- outputs --------------------------------------------------------------------------------------------------

    def predict_proba(self, images_u8: np.ndarray) -> np.ndarray:
        """(N, 7) class probabilities in CLASSES order for uint8 NHWC images at image_size; rows sum to 1."""
        images_u8 = self._check(images_u8)
        with self._lock:
            return self.loaded.predict_proba(images_u8, self._meta(len(images_u8)), device=self.device)

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """The predicted diagnosis index of each row of predict_proba's output (the model file's decision rule)."""
        return self.loaded.decide(probs)

    def gradcam(self, image_u8: np.ndarray, class_index: int) -> np.ndarray:
        """Grad-CAM of class `class_index` for one uint8 HWC image: float32 (image_size, image_size) in [0, 1].

        ReLU of the gradient-weighted feature map (captum LayerGradCam), bilinearly upsampled to the image and
        divided by its maximum; all zeros when no location speaks for the class.
        """
        from captum.attr import LayerAttribution, LayerGradCam

        if not 0 <= int(class_index) < len(self.classes):
            raise HamtuneError(f"class index {class_index}: expected 0..{len(self.classes) - 1}")
        image = self._check(np.asarray(image_u8)[None])
        x = torch.from_numpy(np.array(image)).to(self.device).permute(0, 3, 1, 2).float().div(255.0)
        meta = self._meta(1)
        size = (self.image_size, self.image_size)
        maps = []
        for model, cam in zip(self.members, self.cams):
            extra = (torch.from_numpy(meta).to(self.device),) if getattr(model, "meta_dim", 0) > 0 else None
            with self._lock:
                attribution = LayerGradCam(model, model.get_submodule(cam.name)).attribute(
                    x, target=int(class_index), additional_forward_args=extra, relu_attributions=True)
            heat = LayerAttribution.interpolate(attribution.detach().float(), size, interpolate_mode="bilinear")
            maps.append(_unit_peak(heat[0, 0].clamp_min(0).cpu().numpy()))
        return _unit_peak(np.mean(maps, axis=0))

    def describe(self) -> dict:
        """What a client may want to know about the model behind the answers (plain JSON types)."""
        return {
            "model": self.info.get("model"), "image_size": self.image_size, "uses_metadata": self.use_meta,
            "classes": [{"code": c, "name": DIAGNOSES[c]} for c in self.classes],
            "trained_on": self.info.get("data_fingerprint"), "experiment": self.info.get("experiment"),
            "members": len(self.members), "temperature": self.loaded.temperature,
            "class_bias": self.loaded.class_bias.tolist(), "calibrated": self.loaded.calibrated,
            "decision_differs": bool(np.any(self.loaded.decision_weights != 1.0)), "gradcam_layer": self.cam_layers,
        }

    # -- helpers --------------------------------------------------------------------------------------------------

    def _check(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        expected = (self.image_size, self.image_size, 3)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != expected:
            raise HamtuneError(f"images of shape {tuple(images.shape)} and dtype {images.dtype}; expected uint8 "
                               f"(N, {', '.join(map(str, expected))})")
        return images

    def _meta(self, n: int) -> np.ndarray | None:
        """Metadata the model was trained with, when it was: unknown for an uploaded image."""
        return unknown_meta(n) if self.use_meta else None


def _unit_peak(heat: np.ndarray) -> np.ndarray:
    """A map divided by its maximum (all zeros stays all zeros), as float32."""
    peak = float(heat.max())
    return (heat / peak if peak > 0 else np.zeros_like(heat)).astype(np.float32)
