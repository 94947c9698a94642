"""The in-memory form every consumer trains or evaluates on: decoded images, labels, metadata features, row ids."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from hamtune.vocab import LOCALIZATIONS, META_DIM, SEXES


@dataclass(frozen=True)
class SplitArrays:
    """One split (or a union of splits) as plain numpy arrays.

    The arrays may be read-only (memory-mapped cache files, or Ray object-store buffers): consumers index batches
    out of them and never write to them or copy them whole.
    """

    images: np.ndarray  # uint8, (N, H, W, 3), RGB
    labels: np.ndarray  # int64, (N,), indices into hamtune.vocab.CLASSES
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


def encode_meta(table: pd.DataFrame) -> np.ndarray:
    """Metadata features for the model: age/100 (missing -> 0.5), sex one-hot, localization one-hot.

    Values outside SEXES / LOCALIZATIONS (including missing) count as "unknown", so any table encodes.
    """
    n = len(table)
    out = np.zeros((n, META_DIM), dtype=np.float32)
    age = pd.to_numeric(table["age"], errors="coerce").to_numpy(dtype=np.float64) / 100.0
    out[:, 0] = np.where(np.isnan(age), 0.5, age)
    offset = 1
    for column, vocabulary in (("sex", SEXES), ("localization", LOCALIZATIONS)):
        values = table[column].astype("string").str.strip().str.lower().fillna("unknown")
        codes = pd.Categorical(values, categories=vocabulary).codes.astype(np.int64)
        codes[codes < 0] = vocabulary.index("unknown")
        out[np.arange(n), offset + codes] = 1.0
        offset += len(vocabulary)
    return out


def unknown_meta(n: int) -> np.ndarray:
    """Metadata features when none are known: age missing, sex and site 'unknown'."""
    return encode_meta(pd.DataFrame({"age": [np.nan] * n, "sex": ["unknown"] * n, "localization": ["unknown"] * n}))
