"""The synthetic generator: Kaggle layout, determinism, HAM10000-like proportions and learnable-but-hard images."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.linear_model import RidgeClassifier
from sklearn.metrics import balanced_accuracy_score

from hamtune.data import load_metadata
from hamtune.vocab import CLASSES, HAM10000_FREQUENCIES, METADATA_COLUMNS
from hamtune.data import synthetic
from hamtune.data.synthetic import class_counts, generate_synthetic
from hamtune.errors import HamtuneError

from conftest import TINY_SYNTHETIC_IMAGE, TINY_SYNTHETIC_SIZE


def folder_bytes(root) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_different_seed_different(tmp_path):
    first = folder_bytes(generate_synthetic(tmp_path / "a", n_images=60, seed=7, image_size=(32, 24), workers=1))
    again = folder_bytes(generate_synthetic(tmp_path / "b", n_images=60, seed=7, image_size=(32, 24), workers=1))
    other = folder_bytes(generate_synthetic(tmp_path / "c", n_images=60, seed=8, image_size=(32, 24), workers=1))
    assert first == again
    assert len(first) == 61  # 60 JPEGs + metadata
    assert first["HAM10000_metadata.csv"] != other["HAM10000_metadata.csv"]
    shared = set(first) & set(other) - {"HAM10000_metadata.csv"}
    assert sum(first[name] != other[name] for name in shared) > 0.9 * len(shared)


def test_parallel_generation_matches_serial(tmp_path, monkeypatch):
    serial = generate_synthetic(tmp_path / "serial", n_images=80, seed=3, image_size=(16, 12), workers=1)
    monkeypatch.setattr(synthetic, "_PARALLEL_MIN_IMAGES", 0)  # let 80 images go through real worker processes
    parallel = generate_synthetic(tmp_path / "parallel", n_images=80, seed=3, image_size=(16, 12), workers=2)
    assert folder_bytes(serial) == folder_bytes(parallel)


def test_layout_and_metadata(tiny_synthetic):
    metadata = pd.read_csv(tiny_synthetic / "HAM10000_metadata.csv")
    assert tuple(metadata.columns) == METADATA_COLUMNS
    assert len(metadata) == TINY_SYNTHETIC_SIZE and metadata["image_id"].is_unique
    parts = {name: len(list((tiny_synthetic / name).glob("*.jpg")))
             for name in ("HAM10000_images_part_1", "HAM10000_images_part_2")}
    assert sum(parts.values()) == TINY_SYNTHETIC_SIZE and min(parts.values()) > 0.4 * TINY_SYNTHETIC_SIZE
    first = next((tiny_synthetic / "HAM10000_images_part_1").glob("*.jpg"))
    with Image.open(first) as image:
        assert image.format == "JPEG" and image.size == TINY_SYNTHETIC_IMAGE
    table, problems = load_metadata(tiny_synthetic)  # passes the validating reader unchanged
    assert len(table) == TINY_SYNTHETIC_SIZE and problems.empty
    # one diagnosis, age, sex and site per lesion (one patient, one lesion)
    per_lesion = metadata.groupby("lesion_id")[["dx", "sex", "localization", "dx_type"]].nunique()
    assert (per_lesion == 1).all().all()


def test_class_proportions_and_images_per_lesion(tiny_synthetic):
    metadata = pd.read_csv(tiny_synthetic / "HAM10000_metadata.csv")
    counts = metadata["dx"].value_counts()
    assert counts.to_dict() == {c: n for c, n in class_counts(TINY_SYNTHETIC_SIZE).items()}
    for code in CLASSES:
        assert counts[code] / TINY_SYNTHETIC_SIZE == pytest.approx(HAM10000_FREQUENCIES[code], abs=0.002)
    images_per_lesion = len(metadata) / metadata["lesion_id"].nunique()
    assert 1.28 <= images_per_lesion <= 1.40
    assert metadata.groupby("lesion_id").size().max() >= 3  # some lesions have a series of photos


@pytest.mark.parametrize("n", [1, 7, 10, 101, 10015])
def test_class_counts_sum_to_n(n):
    counts = class_counts(n)
    assert sum(counts.values()) == n and list(counts) == list(CLASSES)
    assert max(counts, key=counts.get) == "nv"


def test_demographics_depend_on_diagnosis(tiny_synthetic):
    metadata = pd.read_csv(tiny_synthetic / "HAM10000_metadata.csv")
    age = metadata.groupby("dx")["age"].mean()
    assert age["akiec"] > age["nv"] + 10 and age["bcc"] > age["nv"] + 10
    site = pd.crosstab(metadata["dx"], metadata["localization"], normalize="index")
    assert site.loc["akiec", "face"] > 3 * site.loc["nv", "face"]
    assert site.loc["nv", "back"] + site.loc["nv", "trunk"] > site.loc["akiec", "back"] + site.loc["akiec", "trunk"]
    assert 0 < metadata["age"].isna().sum() < 0.02 * len(metadata)  # a few missing ages, as in HAM10000


def test_images_of_one_lesion_are_alike(tiny_synthetic_prepared):
    data = tiny_synthetic_prepared
    images = data.images.astype(np.float32)
    table = data.table.reset_index(drop=True)
    pairs = table[table.duplicated("lesion_id", keep=False)].groupby("lesion_id").head(2).groupby("lesion_id")
    same = [np.abs(images[i] - images[j]).mean() for i, j in (g.index[:2] for _, g in pairs)]
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, len(table), size=(2, len(same)))
    keep = table["lesion_id"].to_numpy()[a] != table["lesion_id"].to_numpy()[b]
    different = np.abs(images[a[keep]] - images[b[keep]]).mean(axis=(1, 2, 3))
    assert np.median(same) < 0.75 * np.median(different)


def test_learnable_but_not_trivial(tiny_synthetic_prepared):
    """A linear model on 8x8 colour thumbnails beats chance (1/7) clearly, stays far from perfect, and without class
    weighting gives up the minority classes (balanced accuracy drops)."""
    train, held_out = tiny_synthetic_prepared.arrays("train"), tiny_synthetic_prepared.arrays("val", "test")

    def thumbnails(arrays):
        return arrays.images.reshape(len(arrays), 8, 2, 8, 2, 3).mean(axis=(2, 4)).reshape(len(arrays), -1) / 255.0

    x_train, x_held = thumbnails(train), thumbnails(held_out)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    scores = {}
    for weighting in (None, "balanced"):
        model = RidgeClassifier(alpha=100, class_weight=weighting).fit((x_train - mean) / std, train.labels)
        scores[weighting] = balanced_accuracy_score(held_out.labels, model.predict((x_held - mean) / std))
    assert 0.35 < scores["balanced"] < 0.8, scores
    assert scores[None] < scores["balanced"] - 0.1, scores


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(HamtuneError, match="synthetic size 0"):
        generate_synthetic(tmp_path, n_images=0)
    with pytest.raises(HamtuneError, match="synthetic seed -1"):
        generate_synthetic(tmp_path, n_images=5, seed=-1)
