"""Lesion-grouped, class-stratified train/val/test split.

HAM10000 has ~1.34 images per lesion; images of one lesion are near-duplicates, so a lesion seen in training and
evaluated in test inflates every metric. The split therefore assigns whole lesions, class by class, greedily filling
each split's image quota from a seeded shuffle, keeping at least one lesion per split in every class that has three
or more (so per-class metrics exist in every split). Our own assignment is used instead of StratifiedGroupKFold
because that one cannot guarantee the per-class presence for rare classes and splits in folds, not fractions.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from hamtune.errors import HamtuneError
from hamtune.io import atomic_write_bytes
from hamtune.vocab import CLASSES

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitSpec:
    """Fractions of images for val and test (train gets the rest) and the seed of the lesion shuffle."""

    val: float = 0.15
    test: float = 0.15
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("val", "test"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise HamtuneError(f"split {name} fraction {value!r} is invalid; expected a number > 0")
        if self.val + self.test >= 1:
            raise HamtuneError(
                f"split fractions val={self.val} + test={self.test} = {self.val + self.test:g}; expected a sum < 1 "
                "so that training keeps some images"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise HamtuneError(f"split seed {self.seed!r} is invalid; expected an integer >= 0")

    @property
    def filename(self) -> str:
        """Name of the file that stores this split inside a cache entry."""
        return f"split-v{self.val:g}-t{self.test:g}-s{self.seed}.parquet"


def lesion_classes(table: pd.DataFrame) -> pd.Series:
    """Class of each lesion: its images' dx, the most frequent one if they disagree (ties: first in CLASSES)."""
    counts = (
        pd.DataFrame({"lesion_id": table["lesion_id"].to_numpy(), "k": table["dx"].map(CLASSES.index).to_numpy()})
        .value_counts().rename("n").reset_index()
        .sort_values(["lesion_id", "n", "k"], ascending=[True, False, True], kind="stable")
        .drop_duplicates("lesion_id")
    )
    return pd.Series(np.array(CLASSES)[counts["k"].to_numpy()], index=counts["lesion_id"].to_numpy())


def assign_splits(table: pd.DataFrame, spec: SplitSpec) -> np.ndarray:
    """Split label ("train"/"val"/"test") per row of `table` (needs lesion_id and dx); deterministic for a spec.

    Per class: shuffle the lesions, give test the first ones until its image quota is nearest, then val likewise,
    train the rest. Shuffle-and-cut keeps lesion sizes unbiased across splits (a size-sorted greedy fill would send
    every multi-image lesion to train). Each split keeps at least one lesion when the class has three or more.
    """
    fractions = {"val": spec.val, "test": spec.test}
    images_per_lesion = table.groupby("lesion_id", sort=True).size()
    classes = lesion_classes(table)
    lesion_split: dict[str, str] = {}
    for class_index, code in enumerate(CLASSES):
        lesions = classes.index[classes == code].to_numpy()
        n = len(lesions)
        if n == 0:
            continue
        rng = np.random.default_rng([spec.seed, class_index])
        lesions = lesions[rng.permutation(n)]
        sizes = images_per_lesion[lesions].to_numpy()
        if n < 3:  # too few to stratify: train first, a second lesion to the larger evaluation split
            names = ["train", "val" if spec.val >= spec.test else "test"][:n]
            lesion_split.update(zip(lesions, names))
            continue
        position = 0
        for name, keep_after in (("test", 2), ("val", 1)):  # leave >= 1 lesion for every later split
            quota, filled = fractions[name] * sizes.sum(), 0
            while position < n - keep_after:
                size = sizes[position]
                if filled > 0 and abs(filled + size - quota) >= abs(filled - quota):
                    break
                lesion_split[lesions[position]] = name
                filled += size
                position += 1
        lesion_split.update((lesion, "train") for lesion in lesions[position:])
    return table["lesion_id"].map(lesion_split).to_numpy(dtype=object).astype(str)


def check_split(table: pd.DataFrame, split: np.ndarray | pd.Series) -> None:
    """Raise if a lesion is in two splits or a class with >= 3 lesions is absent from a split."""
    frame = pd.DataFrame({"lesion_id": table["lesion_id"].to_numpy(), "split": np.asarray(split)})
    unknown = ~frame["split"].isin(SPLITS)
    if unknown.any():
        value = frame["split"][unknown].iloc[0]
        raise HamtuneError(f"split value {value!r} is invalid; expected one of {', '.join(SPLITS)}")
    per_lesion = frame.groupby("lesion_id")["split"].nunique()
    leaked = per_lesion[per_lesion > 1]
    if len(leaked):
        lesion = leaked.index[0]
        where = sorted(frame.loc[frame["lesion_id"] == lesion, "split"].unique())
        raise HamtuneError(
            f"lesion {lesion} is in splits {', '.join(where)}; expected every lesion in exactly one split")
    classes = lesion_classes(table)
    lesion_split = frame.groupby("lesion_id")["split"].first()
    for code in CLASSES:
        lesions = classes.index[classes == code]
        if len(lesions) >= 3:
            present = set(lesion_split[lesions])
            for name in SPLITS:
                if name not in present:
                    raise HamtuneError(f"class {code} has {len(lesions)} lesions but none in the {name} split")


def load_or_make_split(entry: Path, table: pd.DataFrame, spec: SplitSpec) -> np.ndarray:
    """The split of a cache entry's table: read from the entry when saved there, else computed, checked and saved."""
    path = Path(entry) / spec.filename
    if path.is_file():
        saved = pd.read_parquet(path)
        if list(saved.get("image_id", [])) == list(table["image_id"]):
            split = saved["split"].to_numpy(dtype=object).astype(str)
            check_split(table, split)
            return split
    split = assign_splits(table, spec)
    check_split(table, split)
    buf = io.BytesIO()
    pd.DataFrame({"image_id": table["image_id"].to_numpy(), "split": split}).to_parquet(buf, index=False)
    atomic_write_bytes(path, buf.getvalue())
    return split
