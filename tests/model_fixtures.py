"""A real, briefly trained model file for the tests that need one (evaluate, predict, serve, the official scorer)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hamtune.vocab import CLASSES


def save_tiny_model(path: Path) -> Path:
    """A resnet10t trained one epoch on 64 coloured-noise 16 px images and saved as model.pt, as the retrain saves it.

    Its quality does not matter; that it is a real network in a real model file, loaded the real way, does.
    """
    from hamtune.training.config import TrainConfig
    from hamtune.data.arrays import SplitArrays
    from hamtune.vocab import META_DIM
    from hamtune.final.modelfile import save_model
    from hamtune.training.loop import fit

    rng = np.random.default_rng(0)
    labels = np.arange(64) % len(CLASSES)
    images = (rng.integers(0, 60, (64, 16, 16, 3)) + labels[:, None, None, None] * 25).astype(np.uint8)
    train = SplitArrays(images, labels.astype(np.int64), np.zeros((64, META_DIM), np.float32), np.arange(64))
    config = TrainConfig(model="resnet10t", head_hidden=32, head_dropout=0.1, epochs=1, batch_size=16,
                         warmup_epochs=0.0, device="cpu", num_threads=1)
    return save_model(Path(path), fit(config, train, None).model, config=config.to_dict(), image_size=16,
                      fingerprint="f" * 20)
