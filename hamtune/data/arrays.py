"""The in-memory form every consumer trains or evaluates on: decoded images, labels, metadata features, row ids."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SplitArrays:
    """One split (or a union of splits) as plain numpy arrays.

    The arrays may be read-only (memory-mapped cache files, or Ray object-store buffers): consumers index batches
    out of them and never write to them or copy them whole.
    """

    images: np.ndarray  # uint8, (N, H, W, 3), RGB
    labels: np.ndarray  # int64, (N,), indices into hamtune.data.ham10000.CLASSES
    meta: np.ndarray  # float32, (N, META_DIM): age/100, sex one-hot, localization one-hot
    index: np.ndarray  # int64, (N,), row numbers in the prepared table (proves which images a run saw)

    def __post_init__(self) -> None:
        n = len(self.labels)
        if not (len(self.images) == len(self.meta) == len(self.index) == n):
            raise ValueError("SplitArrays: images, labels, meta and index must have the same length")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])
