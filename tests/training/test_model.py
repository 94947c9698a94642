"""HamtuneNet structure and the three ways to get backbone weights (random, local cache, a file)."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from hamtune.vocab import META_DIM, NUM_CLASSES
from hamtune.errors import HamtuneError
from hamtune.training.model import HamtuneNet, create_model

TINY = "test_resnet"


def _source_weights() -> dict[str, torch.Tensor]:
    """An ImageNet-style checkpoint: the full timm model with its 1000-class classifier."""
    torch.manual_seed(123)
    return timm.create_model(TINY, num_classes=1000).state_dict()


def _assert_backbone_equals(model: HamtuneNet, source: dict[str, torch.Tensor]) -> None:
    backbone = model.backbone.state_dict()
    assert set(backbone) == {k for k in source if not k.startswith("fc.")}
    for key, tensor in backbone.items():
        assert torch.equal(tensor, source[key]), key


def test_forward_gives_logits_and_normalisation_travels_with_the_weights():
    model = create_model(TINY, head_hidden=32).eval()
    logits = model(torch.rand(4, 3, 32, 32))
    assert logits.shape == (4, NUM_CLASSES)
    cfg = timm.models.get_pretrained_cfg(TINY)
    assert torch.allclose(model.mean.flatten(), torch.tensor(cfg.mean))
    assert torch.allclose(model.std.flatten(), torch.tensor(cfg.std))
    assert {"mean", "std"} <= set(model.state_dict())


def test_head_layouts():
    with_hidden = create_model(TINY, head_hidden=16, head_dropout=0.2)
    kinds = [type(m).__name__ for m in with_hidden.head]
    assert kinds == ["Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert with_hidden.head[1].out_features == 16 and with_hidden.head[0].p == 0.2
    single = create_model(TINY, head_hidden=0)
    assert [type(m).__name__ for m in single.head] == ["Dropout", "Linear"]
    assert single.head[1].in_features == single.backbone.num_features


def test_metadata_features_change_the_prediction_and_are_required():
    model = create_model(TINY, head_hidden=16, meta_dim=META_DIM).eval()
    x = torch.rand(2, 3, 32, 32)
    meta_a = torch.zeros(2, META_DIM)
    meta_b = torch.ones(2, META_DIM)
    assert not torch.allclose(model(x, meta_a), model(x, meta_b))
    with pytest.raises(ValueError, match="metadata"):
        model(x)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_pretrained_path_loads_identical_backbone_tensors(tmp_path, suffix):
    source = _source_weights()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(source, str(path))
    else:
        torch.save(source, path)
    model = create_model(TINY, pretrained=str(path))
    _assert_backbone_equals(model, source)


def test_pretrained_path_accepts_a_wrapped_data_parallel_checkpoint(tmp_path):
    source = _source_weights()
    path = tmp_path / "checkpoint.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.items()}, "epoch": 90}, path)
    _assert_backbone_equals(create_model(TINY, pretrained=str(path)), source)


def test_pretrained_path_for_another_architecture_is_reported(tmp_path):
    path = tmp_path / "resnet10t.pth"
    torch.save(timm.create_model("resnet10t", num_classes=1000).state_dict(), path)
    with pytest.raises(HamtuneError, match=r"does not fit model 'test_resnet'.*(missing|unexpected|wrong shape)"):
        create_model(TINY, pretrained=str(path))


def test_missing_or_corrupt_weights_file_is_a_hamtune_error(tmp_path):
    with pytest.raises(HamtuneError, match="does not exist"):
        create_model(TINY, pretrained=str(tmp_path / "nope.pth"))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    with pytest.raises(HamtuneError, match="cannot read weights file"):
        create_model(TINY, pretrained=str(corrupt))


def _point_caches_at(monkeypatch, root):
    for var in ("HF_HOME", "TORCH_HOME", "HUGGINGFACE_HUB_CACHE", "HF_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(root / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(root / "torch"))


def test_pretrained_true_with_empty_cache_fails_with_where_and_how(tmp_path, monkeypatch):
    _point_caches_at(monkeypatch, tmp_path)
    with pytest.raises(HamtuneError) as info:
        create_model("resnet10t", pretrained=True)  # has both an HF hub id and a legacy torch-hub URL
    message = str(info.value)
    assert str(tmp_path / "hf" / "hub" / "models--timm--resnet10t") in message  # where it looked
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet10t") in message
    assert "pretrained: /path/to/weights.pth" in message and ".safetensors" in message  # how to fix
    assert "run `hamtune weights install resnet10t`" in message  # the command that fixes it


def test_pretrained_true_loads_from_a_populated_local_hf_cache(tmp_path, monkeypatch):
    _point_caches_at(monkeypatch, tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = _source_weights()
    repo = tmp_path / "hf" / "hub" / f"models--{timm.models.get_pretrained_cfg(TINY).hf_hub_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    save_file(source, str(snapshot / "model.safetensors"))
    _assert_backbone_equals(create_model(TINY, pretrained=True), source)


def test_unknown_model_name():
    with pytest.raises(HamtuneError, match="no_such_net"):
        create_model("no_such_net")


@pytest.mark.parametrize("name", ["mobilenetv3_small_050", "lcnet_035"])
def test_models_with_a_pre_logits_layer_get_the_right_head_width(name):
    # Their pooled output is head_hidden_size wide, not num_features.
    from hamtune.training.model import create_model

    model = create_model(name, head_hidden=16).eval()
    with torch.no_grad():
        logits = model(torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, 7)
