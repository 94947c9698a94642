"""The training loop on a tiny learnable data set: learning, exact resume, non-finite stops, config validation."""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
import torch

from hamtune.data.arrays import SplitArrays
from hamtune.vocab import CLASSES, META_DIM, NUM_CLASSES
from hamtune.errors import HamtuneError
from hamtune.training.batches import steps_per_epoch
from hamtune.training.config import TrainConfig
from hamtune.training.loop import FitResult, evaluate, fit
from hamtune.training.model import build_model
from hamtune.training.predict import predict_proba
from hamtune.training.state import load_state, save_state

SIZE = 16
COLOURS = np.array([[220, 40, 40], [40, 200, 40], [40, 40, 220], [220, 200, 40], [200, 40, 200], [40, 200, 200],
                    [240, 240, 240]])


def shapes_split(n: int, seed: int, size: int = SIZE) -> SplitArrays:
    """Class = colour of a disc or square on a dark noisy background; read-only arrays like a memory-mapped cache."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, n)
    yy, xx = np.ogrid[:size, :size]
    images = np.full((n, size, size, 3), 30, np.int64)
    for i, label in enumerate(labels):
        r = rng.integers(size // 5, size // 3 + 1)
        cy, cx = rng.integers(r, size - r, 2)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        square = (np.abs(yy - cy) < r) & (np.abs(xx - cx) < r)
        images[i][disc if label % 2 == 0 else square] = COLOURS[label]
    images = np.clip(images + rng.integers(-20, 21, images.shape), 0, 255).astype(np.uint8)
    meta = np.zeros((n, META_DIM), np.float32)
    meta[:, 0] = rng.uniform(0.2, 0.8, n)
    meta[np.arange(n), 1 + rng.integers(0, 3, n)] = 1.0
    split = SplitArrays(images, labels.astype(np.int64), meta, np.arange(n, dtype=np.int64))
    for array in (split.images, split.labels, split.meta, split.index):
        array.flags.writeable = False
    return split


TRAIN = shapes_split(224, seed=0)
VAL = shapes_split(70, seed=1)
# One thread: on a shared 2-core machine two OpenMP threads slow down 10x as soon as anything else runs.
TINY = dict(model="test_resnet", head_hidden=32, batch_size=32, num_threads=1)


def tiny_config(**overrides) -> TrainConfig:
    return TrainConfig.from_dict({**TINY, **overrides})


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# ---------------------------------------------------------------------------------------------------------- config


def test_config_round_trip_and_numpy_scalars():
    config = TrainConfig.from_dict({"lr": np.float64(0.01), "batch_size": np.int64(16), "epochs": 3.0,
                                    "pretrained": "/w.pth"})
    assert config.lr == 0.01 and type(config.batch_size) is int and config.epochs == 3
    assert TrainConfig.from_dict(config.to_dict()) == config
    assert TrainConfig.from_dict({}) == TrainConfig()


@pytest.mark.parametrize(
    "key, value",
    [
        ("learning_rate", 0.1),  # unknown key
        ("lr", "fast"), ("lr", -1.0), ("lr", float("nan")), ("epochs", True), ("epochs", 0), ("batch_size", 1.5),
        ("augment_strength", 1.5), ("imbalance", "smote"), ("optimizer", "rmsprop"), ("model", "no_such_net"),
        ("label_smoothing", 1.0), ("use_meta", "yes"), ("pretrained", 3), ("device", "gpu"), ("num_threads", 0),
        ("warmup_epochs", 20.0),
    ],
)
def test_config_rejects_bad_input_naming_the_key(key, value):
    with pytest.raises(HamtuneError, match=re.escape(key)):
        TrainConfig.from_dict({key: value})


# ---------------------------------------------------------------------------------------------------------- training


def test_a_few_epochs_learn_the_shapes():
    seen = []
    result = fit(tiny_config(epochs=5, lr=5e-3), TRAIN, VAL, on_epoch=lambda metrics, checkpoint: seen.append(metrics))
    assert isinstance(result, FitResult) and result.status == "completed" and result.epochs_run == 5
    assert seen == result.history
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < 0.7 * losses[0]
    assert result.history[-1]["val_balanced_accuracy"] > 0.5  # chance is 1/7
    expected_keys = {"epoch", "train_loss", "train_images_per_s", "epoch_time_s", "lr", "val_loss", "val_accuracy",
                     "val_balanced_accuracy", "val_macro_f1", "val_macro_auc", *(f"val_recall_{c}" for c in CLASSES)}
    for i, metrics in enumerate(result.history):
        assert set(metrics) == expected_keys
        assert metrics["epoch"] == i + 1
        assert all(isinstance(v, float) for v in metrics.values())
    # warm-up then cosine decay to ~0 at the last step
    assert result.history[-1]["lr"] < 0.1 * 5e-3 < result.history[0]["lr"]


def test_without_validation_only_training_metrics():
    result = fit(tiny_config(epochs=1), TRAIN, None)
    assert set(result.history[0]) == {"epoch", "train_loss", "train_images_per_s", "epoch_time_s", "lr"}


@pytest.mark.parametrize(
    "overrides",
    [
        dict(imbalance="weighted_loss", optimizer="sgd", lr=0.05),
        dict(imbalance="focal", label_smoothing=0.1, head_hidden=0),
        dict(imbalance="oversample", use_meta=True, augment_strength=1.0),
    ],
)
def test_every_strategy_and_optimizer_trains(overrides):
    result = fit(tiny_config(epochs=2, **overrides), TRAIN, VAL)
    assert result.status == "completed"
    assert all(math.isfinite(h["train_loss"]) for h in result.history)


RESUME = dict(epochs=3, use_meta=True, imbalance="oversample", augment_strength=0.7, head_dropout=0.3,
              label_smoothing=0.05)


def test_stop_and_resume_gives_bitwise_identical_weights(tmp_path):
    saved_after = {}

    def save_each_epoch(metrics, checkpoint):
        saved_after[int(metrics["epoch"])] = checkpoint()
        save_state(tmp_path / f"epoch{int(metrics['epoch'])}.pt", saved_after[int(metrics["epoch"])])

    uninterrupted = fit(tiny_config(**RESUME), TRAIN, VAL, on_epoch=save_each_epoch)

    # from a file written after epoch 1, as a restarted process would
    resumed = fit(tiny_config(**RESUME), TRAIN, VAL, state=load_state(tmp_path / "epoch1.pt"))
    assert resumed.status == "completed" and resumed.epochs_run == 3
    assert_same_weights(uninterrupted.model, resumed.model)
    for a, b in zip(uninterrupted.history, resumed.history):
        assert a["train_loss"] == b["train_loss"] and a["val_loss"] == b["val_loss"]

    # from the in-memory checkpoint of epoch 2: it must not have been changed by epoch 3's training
    from_memory = fit(tiny_config(**RESUME), TRAIN, VAL, state=saved_after[2])
    assert_same_weights(uninterrupted.model, from_memory.model)
    assert len(list(tmp_path.iterdir())) == 3  # no temp files left behind


def test_resume_with_a_different_config_is_refused(tmp_path):
    states = []
    fit(tiny_config(epochs=2), TRAIN, None, on_epoch=lambda m, checkpoint: states.append(checkpoint()))
    with pytest.raises(HamtuneError, match="lr"):
        fit(tiny_config(epochs=2, lr=0.5), TRAIN, None, state=states[0])


def test_load_state_errors(tmp_path):
    with pytest.raises(HamtuneError, match="does not exist"):
        load_state(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"this is not a torch file")
    with pytest.raises(HamtuneError, match="corrupt"):
        load_state(corrupt)


def test_exploding_learning_rate_stops_as_non_finite():
    result = fit(tiny_config(epochs=3, optimizer="sgd", lr=1e6, warmup_epochs=0.0), TRAIN, VAL)
    assert result.status == "non_finite"
    assert re.fullmatch(r"non-finite training loss at epoch \d+, step \d+", result.message)
    assert result.epochs_run == len(result.history) < 3


def test_infinite_input_stops_before_any_update():
    meta = np.array(TRAIN.meta)
    meta[:, 0] = np.inf
    poisoned = SplitArrays(TRAIN.images, TRAIN.labels, meta, TRAIN.index)
    config = tiny_config(epochs=2, use_meta=True)
    result = fit(config, poisoned, None)
    assert result.status == "non_finite"
    assert result.message == "non-finite training loss at epoch 1, step 1"
    assert result.epochs_run == 0 and result.history == []
    torch.manual_seed(config.seed)
    initial = dict(build_model(config).named_parameters())
    for name, parameter in result.model.named_parameters():  # no update came from the inf batch
        assert torch.equal(parameter, initial[name]), name


def test_a_last_batch_of_one_is_dropped_not_crashed_on():
    assert steps_per_epoch(33, 32) == 1 and steps_per_epoch(34, 32) == 2
    small = shapes_split(33, seed=3)
    assert fit(tiny_config(epochs=1), small, None).status == "completed"


# ---------------------------------------------------------------------------------------------------------- inference


@pytest.fixture(scope="module")
def trained() -> torch.nn.Module:
    return fit(tiny_config(epochs=3, lr=3e-3), TRAIN, None).model


def test_predict_proba_rows_sum_to_one_and_match_evaluate(trained):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # read-only arrays must not warn
        probs = predict_proba(trained, VAL.images, VAL.meta, batch_size=16)
        tta = predict_proba(trained, VAL.images, VAL.meta, batch_size=16, tta=True)
        scores = evaluate(trained, VAL, batch_size=16, device="cpu")
    for p in (probs, tta):
        assert p.shape == (len(VAL), NUM_CLASSES)
        np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-9)
    assert not np.allclose(probs, tta)
    assert scores["accuracy"] == pytest.approx(np.mean(probs.argmax(1) == VAL.labels))
    expected_loss = -np.mean(np.log(probs[np.arange(len(VAL)), VAL.labels]))
    assert scores["loss"] == pytest.approx(expected_loss, rel=1e-4)


def test_evaluate_on_a_split_missing_classes(trained):
    keep = np.isin(VAL.labels, [0, 5])
    partial = SplitArrays(VAL.images[keep], VAL.labels[keep], VAL.meta[keep], VAL.index[keep])
    scores = evaluate(trained, partial, batch_size=64, device="cpu")
    assert math.isnan(scores["recall_df"]) and math.isfinite(scores["balanced_accuracy"])
    assert math.isfinite(scores["macro_auc"])


def test_tta_averages_all_flips_and_quarter_turns(trained):
    # Averaging over the whole dihedral group makes the prediction invariant to any flip or 90-degree turn.
    images = np.ascontiguousarray(VAL.images)
    turned = np.ascontiguousarray(np.rot90(images, k=1, axes=(1, 2)))
    flipped = np.ascontiguousarray(images[:, :, ::-1])
    base = predict_proba(trained, images, VAL.meta, batch_size=16, tta=True)
    for other in (turned, flipped):
        np.testing.assert_allclose(predict_proba(trained, other, VAL.meta, batch_size=16, tta=True), base, atol=1e-5)
    assert not np.allclose(predict_proba(trained, turned, VAL.meta, batch_size=16),
                           predict_proba(trained, images, VAL.meta, batch_size=16), atol=1e-5)
