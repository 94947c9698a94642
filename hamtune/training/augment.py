"""Batched data augmentation driven by one strength knob, on whatever device the batch lives on.

Why not torchvision transforms per image: with small images the per-image Python/PIL overhead costs more than the
model step. Here a whole batch gets per-sample random parameters and is transformed with one affine resampling
(flip + rotation + random resized crop in a single grid_sample) and one per-sample 3x3 colour matrix (brightness,
contrast, saturation, hue), so the cost is two vectorised kernels per batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# ITU-R 601 luma weights, as used by torchvision's rgb_to_grayscale.
_LUMA = (0.2989, 0.587, 0.114)
# RGB -> YIQ; hue is a rotation of the (I, Q) chroma plane, which keeps a hue shift a linear 3x3 map.
_RGB_TO_YIQ = torch.tensor([
    [0.299, 0.587, 0.114],
    [0.595716, -0.274453, -0.321263],
    [0.211456, -0.522591, 0.311135],
])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


class BatchAugment:
    """Random flips, rotation, resized crop and colour jitter whose ranges all scale linearly with `strength`.

    strength 0 returns the input as float in [0, 1] unchanged (exactly); strength 1 is the strongest setting that is
    still sensible for dermoscopy: any rotation angle (a lesion has no "up"), crops down to 35% of the area with
    aspect 3:4..4:3, +-30% brightness/contrast/saturation and +-0.05 hue turns. Colour ops are clamped once at the
    end rather than after each op, which is what lets them fold into one matrix. The random draws are the same for
    every strength, so with a fixed generator seed the change from the input grows monotonically with strength.
    """

    # Ranges at strength 1.
    max_rotation_deg = 180.0
    min_crop_area = 0.35
    max_log_aspect = math.log(4 / 3)
    max_brightness = 0.3
    max_contrast = 0.3
    max_saturation = 0.3
    max_hue = 0.05  # fraction of a full turn of the colour wheel

    def __init__(self, strength: float = 0.5) -> None:
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"augment strength must be in [0, 1], got {strength}")
        self.strength = float(strength)

    def __repr__(self) -> str:
        return f"BatchAugment(strength={self.strength})"

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x: uint8 (0..255) or float (0..1) NCHW batch -> augmented float32 NCHW batch in [0, 1], same device."""
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        if self.strength == 0.0 or x.shape[0] == 0:
            return x
        n, _, h, w = x.shape
        # Draw on the CPU generator (device-independent, checkpointable) and build the small per-sample matrices
        # there too; on a GPU they then travel in ONE pinned, non-blocking copy. (A plain .to(cuda) of a CPU tensor
        # makes the host wait for every kernel already queued, which starves the GPU once per copy.)
        u = torch.rand(n, 11, generator=generator) * 2.0 - 1.0  # uniform in [-1, 1)
        theta = self._theta(u[:, :7], h, w)
        matrix, grey_weight = self._colour_map(u[:, 7:])
        params = to_device(torch.cat([theta.reshape(n, 6), matrix.reshape(n, 9), grey_weight.view(n, 1)], 1), x.device)
        x = _resample(x, params[:, :6].view(n, 2, 3))
        x = _recolour(x, params[:, 6:15].view(n, 3, 3), params[:, 15])
        return x.clamp_(0.0, 1.0)

    def _affine(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The geometric part alone (u: (n, 7) CPU draws in [-1, 1)), unclamped."""
        return _resample(x, to_device(self._theta(u, x.shape[2], x.shape[3]), x.device))

    def _colour(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The colour part alone (u: (n, 4) CPU draws in [-1, 1)), unclamped."""
        matrix, grey_weight = self._colour_map(u)
        return _recolour(x, to_device(matrix, x.device), to_device(grey_weight, x.device))

    def _theta(self, u: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Flips, rotation and random resized crop as one (n, 2, 3) affine_grid matrix per image (u: CPU draws in
        [-1, 1))."""
        s = self.strength
        n = u.shape[0]
        flip_probability = min(0.5, s)  # flips lose nothing, so they reach their full rate early
        flip_x = torch.where((u[:, 0] + 1) / 2 < flip_probability, -1.0, 1.0)
        flip_y = torch.where((u[:, 1] + 1) / 2 < flip_probability, -1.0, 1.0)
        angle = u[:, 2] * math.radians(self.max_rotation_deg) * s
        area = 1.0 - (1.0 - self.min_crop_area) * s * (u[:, 3] + 1) / 2
        log_aspect = u[:, 4] * self.max_log_aspect * s
        crop_w = torch.sqrt(area * torch.exp(log_aspect)).clamp(max=1.0)
        crop_h = torch.sqrt(area * torch.exp(-log_aspect)).clamp(max=1.0)
        # crop centre anywhere the crop still fits inside the image
        centre_x = u[:, 5] * (1.0 - crop_w)
        centre_y = u[:, 6] * (1.0 - crop_h)

        # theta maps output coordinates (normalised to [-1, 1]) to input coordinates. Rotating in normalised
        # coordinates would shear non-square images, so rotate in pixel units: R' = S^-1 R S with S = diag(w, h).
        cos, sin = torch.cos(angle), torch.sin(angle)
        aspect = w / h
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = cos * crop_w * flip_x
        theta[:, 0, 1] = -sin / aspect * crop_h * flip_y
        theta[:, 1, 0] = sin * aspect * crop_w * flip_x
        theta[:, 1, 1] = cos * crop_h * flip_y
        theta[:, 0, 2] = centre_x
        theta[:, 1, 2] = centre_y
        return theta

    def _colour_map(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Brightness, contrast, saturation and hue folded into one per-sample affine colour map: out = A @ rgb +
        g * mean_grey; returns A (n, 3, 3) and g (n,), on the CPU."""
        s = self.strength
        n = u.shape[0]
        brightness = 1.0 + u[:, 0] * self.max_brightness * s
        contrast = 1.0 + u[:, 1] * self.max_contrast * s
        saturation = 1.0 + u[:, 2] * self.max_saturation * s
        hue = u[:, 3] * self.max_hue * s * 2.0 * math.pi

        eye = torch.eye(3)
        luma = torch.tensor(_LUMA)
        # saturation: blend with the grey image: s * I + (1 - s) * 1 luma^T
        m_sat = saturation.view(n, 1, 1) * eye + (1.0 - saturation).view(n, 1, 1) * luma.view(1, 1, 3).expand(n, 3, 3)
        # hue: rotate chroma in YIQ space. This keeps luma (torchvision's HSV hue keeps the max channel instead);
        # a positive shift turns red towards yellow, as in HSV, which is a negative angle in the (I, Q) plane.
        rotation = torch.zeros(n, 3, 3)
        rotation[:, 0, 0] = 1.0
        rotation[:, 1, 1] = torch.cos(hue)
        rotation[:, 1, 2] = torch.sin(hue)
        rotation[:, 2, 1] = -torch.sin(hue)
        rotation[:, 2, 2] = torch.cos(hue)
        m_hue = _YIQ_TO_RGB @ rotation @ _RGB_TO_YIQ
        # contrast blends with the mean grey level of the brightened image; grey stays grey under m_sat and m_hue,
        # so the offset commutes to the end: out = c*b*M x + (1 - c)*b*mean_grey.
        matrix = (contrast * brightness).view(n, 1, 1) * (m_hue @ m_sat)
        return matrix, (1.0 - contrast) * brightness


def _resample(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Each image through its affine_grid matrix (theta already on x's device)."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Reflection fills the corners a rotation uncovers with skin rather than black, which a model could key on.
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _recolour(x: torch.Tensor, matrix: torch.Tensor, grey_weight: torch.Tensor) -> torch.Tensor:
    """out = matrix @ rgb + grey_weight * the image's mean luma, per image (parameters already on x's device)."""
    mean_grey = torch.einsum("c,nchw->n", _luma_on(x.device), x) / (x.shape[2] * x.shape[3])
    out = torch.einsum("nij,njhw->nihw", matrix, x)
    return out.add_((grey_weight * mean_grey).view(-1, 1, 1, 1))


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device`; to a GPU through pinned memory without blocking the host (a plain .to(cuda) waits
    for every queued kernel). The one host-to-device copy of hamtune's training path: hamtune.training.batches uses it too."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


_LUMA_ON: dict[torch.device, torch.Tensor] = {}


def _luma_on(device: torch.device) -> torch.Tensor:
    """The luma weights on `device`, copied there once."""
    if device not in _LUMA_ON:
        _LUMA_ON[device] = torch.tensor(_LUMA, device=device)
    return _LUMA_ON[device]
