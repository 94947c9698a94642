"""BatchAugment: identity at 0, real change at 1, monotone in between, per-sample, deterministic, label-safe."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from hamtune.training.augment import BatchAugment


def _lesions(n: int = 32, size: int = 32) -> torch.Tensor:
    """Smooth uint8 images (a coloured blob on skin tone), so pixel differences measure the transform, not noise."""
    g = torch.Generator().manual_seed(7)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    centre = torch.rand(n, 2, generator=g) * 0.8 - 0.4
    radius = torch.rand(n, 1, 1, generator=g) * 0.3 + 0.3
    blob = (((yy - centre[:, 0, None, None]) ** 2 + ((xx - centre[:, 1, None, None]) / 0.7) ** 2) < radius**2).float()
    skin = torch.tensor([0.85, 0.6, 0.5]).view(1, 3, 1, 1)
    lesion = torch.rand(n, 3, 1, 1, generator=g) * 0.5
    gradient = 0.15 * yy.view(1, 1, size, size)
    img = skin * (1 - blob[:, None]) + lesion * blob[:, None] + gradient
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def _augment(strength: float, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    return BatchAugment(strength)(x, torch.Generator().manual_seed(seed))


def test_strength_zero_is_exactly_the_identity():
    x = _lesions()
    assert torch.equal(_augment(0.0, x), x.float() / 255)
    as_float = x.float() / 255
    assert torch.equal(_augment(0.0, as_float), as_float)


def test_strength_one_changes_every_image_and_stays_a_valid_image():
    x = _lesions()
    out = _augment(1.0, x)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    per_image_change = (out - x.float() / 255).abs().mean(dim=(1, 2, 3))
    assert (per_image_change > 0.01).all()


def test_change_grows_with_strength():
    x = _lesions(64)
    base = x.float() / 255
    changes = [(_augment(s, x) - base).abs().mean().item() for s in (0.0, 0.1, 0.3, 0.6, 1.0)]
    assert changes[0] == 0.0
    assert changes == sorted(changes) and changes[1] < changes[-1] / 2, changes


def test_parameters_are_drawn_per_sample():
    same = _lesions(1).expand(16, -1, -1, -1).contiguous()
    out = _augment(0.7, same)
    distinct = {tuple(o.flatten()[:64].tolist()) for o in out}
    assert len(distinct) == 16


def test_same_seed_same_batch_different_seed_different_batch():
    x = _lesions()
    assert torch.equal(_augment(0.5, x, seed=3), _augment(0.5, x, seed=3))
    assert not torch.equal(_augment(0.5, x, seed=3), _augment(0.5, x, seed=4))


def test_grey_stays_grey():
    """Colour jitter may change the grey level, never invent a colour cast; geometry never moves a flat image."""
    grey = torch.full((8, 3, 16, 16), 128, dtype=torch.uint8)
    out = _augment(1.0, grey)
    assert torch.allclose(out, out[:, :1, :1, :1].expand_as(out), atol=1e-5)


def test_flip_only_view_matches_torch_flip():
    """At any strength a sample whose draws pick only a horizontal flip is the mirror image: check the sampling
    grid's geometry against torch.flip by forcing the draws (u=-1 flips, u=0 means no rotation/crop/jitter)."""
    x = _lesions(2).float() / 255
    augment = BatchAugment(1.0)
    draws = torch.tensor([[-1.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0], [1.0, -1.0, 0.0, -1.0, 0.0, 0.0, 0.0]])
    out = augment._affine(x, draws)
    torch.testing.assert_close(out[0], x[0].flip(-1))
    torch.testing.assert_close(out[1], x[1].flip(-2))


def test_single_colour_ops_match_torchvision_where_defined_the_same():
    x = _lesions(1).float() / 255
    augment = BatchAugment(1.0)
    brightness = augment._colour(x, torch.tensor([[-1.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(brightness, TF.adjust_brightness(x, 0.7))
    saturation = augment._colour(x, torch.tensor([[0.0, 0.0, -1.0, 0.0]]))
    torch.testing.assert_close(saturation, TF.adjust_saturation(x, 0.7), atol=1e-5, rtol=0)
    contrast = augment._colour(x, torch.tensor([[0.0, -1.0, 0.0, 0.0]]))
    torch.testing.assert_close(contrast, TF.adjust_contrast(x, 0.7), atol=2e-3, rtol=0)  # tv rounds the mean


def test_whole_augmentation_is_the_geometric_then_the_colour_part():
    """__call__ sends all per-sample parameters to the device packed in one tensor (one copy instead of four); the
    packing must hand each part its own columns: the result equals the two parts applied one after the other."""
    x = _lesions(5).float() / 255
    augment = BatchAugment(0.8)
    out = augment(x, torch.Generator().manual_seed(3))
    u = torch.rand(5, 11, generator=torch.Generator().manual_seed(3)) * 2.0 - 1.0
    expected = augment._colour(augment._affine(x, u[:, :7]), u[:, 7:]).clamp(0.0, 1.0)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_strength_outside_unit_interval_is_rejected():
    with pytest.raises(ValueError):
        BatchAugment(1.5)
