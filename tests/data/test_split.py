"""Lesion-grouped, class-stratified split: no lesion leaks, every class in every split, fractions near target."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from hamtune.data import SplitSpec, prepare
from hamtune.vocab import CLASSES
from hamtune.data.split import assign_splits, check_split, lesion_classes
from hamtune.errors import HamtuneError


def assert_split_properties(table: pd.DataFrame, spec: SplitSpec, tolerance: float) -> None:
    assert (table.groupby("lesion_id")["split"].nunique() == 1).all()  # no lesion in two splits
    lesions_per_class = table.groupby("dx")["lesion_id"].nunique()
    present = pd.crosstab(table["dx"], table["split"])
    for code in CLASSES:
        if lesions_per_class.get(code, 0) >= 3:
            assert (present.loc[code, ["train", "val", "test"]] > 0).all(), code
    fractions = table["split"].value_counts(normalize=True)
    assert fractions["val"] == pytest.approx(spec.val, abs=tolerance)
    assert fractions["test"] == pytest.approx(spec.test, abs=tolerance)


def test_real_sample_split(sample_dir, tmp_path):
    spec = SplitSpec()
    data = prepare(sample_dir, 16, cache_dir=tmp_path, progress=False, split=spec)
    assert_split_properties(data.table, spec, tolerance=0.01)
    per_class = pd.crosstab(data.table["dx"], data.table["split"])
    assert (per_class["val"] == 3).all() and (per_class["test"] == 3).all()  # 15% of 20 per class


def test_synthetic_split_several_thousand_images(tiny_synthetic_prepared):
    data = tiny_synthetic_prepared
    assert_split_properties(data.table, data.split, tolerance=0.01)
    per_class = pd.crosstab(data.table["dx"], data.table["split"], normalize="index")
    assert per_class["test"].between(0.10, 0.20).all() and per_class["val"].between(0.10, 0.20).all()
    # multi-image lesions are spread over the splits too (no size bias from the assignment order)
    images_per_lesion = data.table.groupby(["split", "lesion_id"]).size().groupby("split").mean()
    assert images_per_lesion.min() > 1.2


@pytest.mark.parametrize("spec", [SplitSpec(0.1, 0.2, 1), SplitSpec(0.3, 0.3, 2), SplitSpec(0.05, 0.05, 3)])
def test_other_fractions(tiny_synthetic_prepared, spec):
    table = tiny_synthetic_prepared.table.drop(columns="split")
    table["split"] = assign_splits(table, spec)
    assert_split_properties(table, spec, tolerance=0.015)


def test_deterministic_and_seeded(tiny_synthetic_prepared):
    table = tiny_synthetic_prepared.table
    first = assign_splits(table, SplitSpec(seed=11))
    assert np.array_equal(first, assign_splits(table, SplitSpec(seed=11)))
    assert not np.array_equal(first, assign_splits(table, SplitSpec(seed=12)))
    # the same lesion keeps its split when the table rows come in another order
    shuffled = table.sample(frac=1, random_state=0)
    again = pd.Series(assign_splits(shuffled, SplitSpec(seed=11)), index=shuffled.index).sort_index()
    assert np.array_equal(again.to_numpy(), first)


def test_saved_split_is_reused(tiny_synthetic, tiny_synthetic_prepared):
    data = tiny_synthetic_prepared
    saved = pd.read_parquet(data.path / data.split.filename)
    assert list(saved.columns) == ["image_id", "split"]
    assert list(saved["image_id"]) == list(data.table["image_id"])
    assert list(saved["split"]) == list(data.table["split"])
    # a saved split is read back as is (here: an edited, still valid one)
    edited = saved.copy()
    lesion = data.table.loc[data.table["split"] == "train", "lesion_id"].iloc[0]
    edited.loc[(data.table["lesion_id"] == lesion).to_numpy(), "split"] = "val"
    edited.to_parquet(data.path / data.split.filename, index=False)
    try:
        reread = prepare(tiny_synthetic, 16, cache_dir=data.path.parent, progress=False)
        assert reread.decoded == 0
        assert (reread.table.loc[reread.table["lesion_id"] == lesion, "split"] == "val").all()
    finally:
        saved.to_parquet(data.path / data.split.filename, index=False)


def test_check_split_catches_a_leaked_lesion():
    table = pd.DataFrame({"lesion_id": ["L1", "L1", "L2"], "dx": ["nv", "nv", "nv"]})
    with pytest.raises(HamtuneError, match="lesion L1 is in splits test, train"):
        check_split(table, np.array(["train", "test", "val"]))


def test_check_split_catches_a_missing_class():
    table = pd.DataFrame({"lesion_id": ["A", "B", "C", "D"], "dx": ["df", "df", "df", "nv"]})
    with pytest.raises(HamtuneError, match="class df has 3 lesions but none in the test split"):
        check_split(table, np.array(["train", "train", "val", "test"]))


def test_rare_classes_and_mixed_lesions():
    rows = [("A", "df"), ("B", "df"),  # two lesions: one train, one in an evaluation split
            ("C", "vasc"),  # one lesion: train
            ("M", "mel"), ("M", "mel"), ("M", "nv")]  # mixed dx: the lesion counts as mel
    rows += [(f"N{i}", "nv") for i in range(20)]
    table = pd.DataFrame(rows, columns=["lesion_id", "dx"])
    assert lesion_classes(table)["M"] == "mel"
    split = pd.Series(assign_splits(table, SplitSpec()), index=table.index)
    check_split(table, split)
    assert sorted(split[table["dx"] == "df"]) == ["train", "val"]
    assert list(split[table["lesion_id"] == "C"]) == ["train"]
    assert split[table["lesion_id"] == "M"].nunique() == 1


@pytest.mark.parametrize("kwargs, message", [
    ({"val": 0}, "val fraction 0"), ({"test": -0.1}, "test fraction -0.1"), ({"val": 0.5, "test": 0.5}, "sum < 1"),
    ({"val": float("nan")}, "val fraction nan"), ({"seed": -1}, "seed -1"), ({"val": "0.1"}, "val fraction '0.1'"),
])
def test_split_spec_validation(kwargs, message):
    with pytest.raises(HamtuneError, match=message):
        SplitSpec(**kwargs)
