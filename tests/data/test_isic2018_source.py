"""The ISIC 2018 Task 3 layout as a data source: read like the Kaggle layout (same classes, labels, messages and
fingerprinted cache), lesion ids from the groupings file, the lesion split refused without it unless asked for by
name, use_meta refused, `isic2018` as the downloaded training set."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from isic_fixtures import extract_layout, isic_files, lesion_ids, sample_table, serve

from hamtune.cli import main
from hamtune.data import load_metadata, prepare
from hamtune.data.cache import fingerprint
from hamtune.data.sources import scan_source
from hamtune.data.tables import TABLE_COLUMNS
from hamtune.errors import HamtuneError
from hamtune.search.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
LESIONS = "ISIC2018_Task3_Training_LesionGroupings.csv"
TRUTH = "ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv"


@pytest.fixture(scope="module")
def files(sample_dir) -> dict[str, bytes]:
    return isic_files(sample_dir)


@pytest.fixture
def train_dir(files, tmp_path) -> Path:
    return extract_layout(files, "isic2018-train", tmp_path / "train")


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and "np." not in message
    return message


def test_isic_folder_reads_into_the_kaggle_table(train_dir, sample_dir):
    table, problems = load_metadata(train_dir)
    kaggle, _ = load_metadata(sample_dir)
    assert list(table.columns) == [*TABLE_COLUMNS, "path"] and problems.empty
    assert table["image_id"].tolist() == kaggle["image_id"].tolist()  # same rows, same order
    assert table["dx"].tolist() == kaggle["dx"].tolist() and table["label"].tolist() == kaggle["label"].tolist()
    assert table["lesion_id"].tolist() == lesion_ids(sample_table(sample_dir)).tolist()
    assert set(table["dx_type"]) <= {"histopathology", "serial imaging showing no change",
                                     "single image expert consensus", "confocal microscopy with consensus dermoscopy"}
    assert table["age"].isna().all() and set(table["sex"]) == {"unknown"} and set(table["localization"]) == {"unknown"}
    assert all(Path(p).is_file() and Path(p).parent.name == "ISIC2018_Task3_Training_Input" for p in table["path"])


def test_files_are_found_by_name_at_any_depth(files, tmp_path, train_dir):
    nested = tmp_path / "deep"
    shutil.copytree(train_dir / "ISIC2018_Task3_Training_Input", nested / "a/b/images")
    shutil.copy(train_dir / TRUTH, nested / "labels.csv")  # another name is not the ground truth
    with pytest.raises(HamtuneError, match="no metadata file HAM10000_metadata.csv .* or the ISIC 2018 Task 3 layout"):
        scan_source(nested)
    (nested / "c/d").mkdir(parents=True)
    shutil.copy(train_dir / TRUTH, nested / "c/d/ISIC2018_Task3_Training_GroundTruth.csv")
    shutil.copy(train_dir / LESIONS, nested / "a" / LESIONS.lower())  # any case
    table, problems = load_metadata(nested)
    assert len(table) == 140 and problems.empty


def test_lesion_header_case_variants_are_accepted_and_a_wrong_header_is_refused(train_dir):
    groupings = (train_dir / LESIONS).read_text()
    (train_dir / LESIONS).write_text(groupings.replace("image,lesion_id,diagnosis_confirm_type",
                                                       "IMAGE, Lesion_ID ,Diagnosis_Confirm_Type", 1))
    assert len(load_metadata(train_dir)[0]) == 140
    (train_dir / LESIONS).write_text(groupings.replace("lesion_id", "lesion", 1))
    with pytest.raises(HamtuneError) as caught:
        load_metadata(train_dir)
    assert re.fullmatch(rf".*{LESIONS}: header image,lesion,diagnosis_confirm_type is not a lesion-groupings header; "
                        r"expected columns image, lesion_id, diagnosis_confirm_type \(any case\)", one_line(caught))


def test_ground_truth_problems_are_one_line_with_the_file_and_line(train_dir):
    truth = train_dir / TRUTH
    good = truth.read_text().splitlines()
    cases = [
        (good[:3] + [good[3].replace("1.0", "0.0")] + good[4:], r"line 4: expected exactly one 1.0 among MEL, NV, "
                                                                r"BCC, AKIEC, BKL, DF, VASC, got 0.0,0.0,"),
        (good + [good[5]], r"image_id ISIC_\d+ appears on lines 6, 142; expected each image listed once"),
        ([good[0].replace(",VASC", "")] + [line.rsplit(",", 1)[0] for line in good[1:]],
         r"missing column\(s\) VASC; expected columns image, MEL, NV, BCC, AKIEC, BKL, DF, VASC"),
        (good[:1], "ground-truth file has a header but no rows"),
    ]
    for lines, expected in cases:
        truth.write_text("\n".join(lines) + "\n")
        with pytest.raises(HamtuneError) as caught:
            load_metadata(train_dir)
        assert str(truth) in one_line(caught) and re.search(expected, str(caught.value)), str(caught.value)

    truth.write_text("\n".join(good) + "\n")
    groupings = (train_dir / LESIONS).read_text().splitlines()
    (train_dir / LESIONS).write_text("\n".join(groupings[:-1]) + "\n")
    with pytest.raises(HamtuneError, match=rf"{LESIONS}: has no row for image ISIC_\d+ of .* expected a lesion_id"):
        load_metadata(train_dir)


def test_images_without_labels_and_labels_without_images_are_listed_as_in_the_kaggle_reader(train_dir):
    images = sorted((train_dir / "ISIC2018_Task3_Training_Input").glob("*.jpg"))
    images[0].unlink()
    shutil.copy(images[1], images[1].with_name("ISIC_9999999.jpg"))
    table, problems = load_metadata(train_dir)
    assert len(table) == 139
    assert problems[["kind", "image_id"]].values.tolist() == [["missing_image", images[0].stem],
                                                              ["unlisted_image", "ISIC_9999999"]]


def test_without_the_lesion_file_the_split_is_refused_unless_split_by_image_is_asked(files, tmp_path, sample_dir,
                                                                                     capsys):
    bare = extract_layout(files, "isic2018-train", tmp_path / "bare", lesions=False)
    with pytest.raises(HamtuneError, match="no ISIC2018_Task3_Training_LesionGroupings.csv, so images cannot be "
                                           "grouped by lesion .* set data.split_by: image"):
        prepare(bare, 16, cache_dir=tmp_path / "cache", progress=False)
    code = main(["data", "prepare", "--source", str(bare), "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--split-by image" in err

    prepared = prepare(bare, 16, cache_dir=tmp_path / "cache", progress=False, split_by="image", workers=1)
    assert (prepared.table["lesion_id"] == prepared.table["image_id"]).all()  # every image its own group
    assert set(prepared.table["split"]) == {"train", "val", "test"}

    with pytest.raises(HamtuneError, match=f"split_by 'image' is only for a folder without lesion ids, but {LESIONS}"):
        prepare(extract_layout(files, "isic2018-train", tmp_path / "full"), 16, cache_dir=tmp_path / "cache",
                split_by="image")
    with pytest.raises(HamtuneError, match="HAM10000_metadata.csv has them, so drop split_by"):
        prepare(sample_dir, 16, cache_dir=tmp_path / "cache", split_by="image")


def test_use_meta_is_refused_for_this_layout(train_dir, tmp_path, capsys):
    with pytest.raises(HamtuneError, match="ISIC 2018 Task 3 layout has no age, sex or site, so model.use_meta"):
        prepare(train_dir, 16, cache_dir=tmp_path / "cache", needs_meta=True)
    spec = yaml.safe_load((ROOT / "search_spaces/default.yaml").read_text())
    spec["model"]["use_meta"] = True
    spec["data"]["cache_dir"] = str(tmp_path / "cache")
    (tmp_path / "meta.yaml").write_text(yaml.safe_dump(spec))
    code = main(["search", "--space", str(tmp_path / "meta.yaml"), "--source", str(train_dir),
                 "--results-dir", str(tmp_path / "results")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "use_meta" in err
    assert not list((tmp_path / "cache").glob("*/images.npy"))  # refused before anything was decoded


def test_cache_fingerprint_covers_the_lesion_file(train_dir):
    before = fingerprint(scan_source(train_dir), 16)
    assert fingerprint(scan_source(train_dir), 16) == before
    groupings = pd.read_csv(train_dir / LESIONS)
    groupings.loc[0, "lesion_id"] = "HAM_9999999"
    groupings.to_csv(train_dir / LESIONS, index=False)
    assert fingerprint(scan_source(train_dir), 16) != before


def test_two_sets_side_by_side_are_ambiguous(files, tmp_path):
    extract_layout(files, "isic2018-train", tmp_path / "all")
    extract_layout(files, "isic2018-test", tmp_path / "all")
    with pytest.raises(HamtuneError, match="holds 2 ISIC 2018 ground-truth files .* pass the folder of one set"):
        scan_source(tmp_path / "all")


def test_source_isic2018_is_the_downloaded_training_set(files, tmp_path, monkeypatch):
    monkeypatch.setenv("HAMTUNE_DATA_DIR", str(tmp_path / "data"))
    with pytest.raises(HamtuneError, match="no complete download of isic2018-train here; run `hamtune data download "
                                           "isic2018-train`"):
        prepare("isic2018", 16, cache_dir=tmp_path / "cache")
    from hamtune.data.download import download

    with serve(files) as server:
        download("isic2018-train", None, server.base_url, expected=140, progress=False, echo=lambda line: None)
    by_name = prepare("isic2018", 16, cache_dir=tmp_path / "cache", progress=False, workers=1)
    by_path = prepare(tmp_path / "data" / "isic2018-train", 16, cache_dir=tmp_path / "cache", progress=False)
    assert by_name.fingerprint == by_path.fingerprint and by_path.decoded == 0  # one cache entry
    assert np.array_equal(by_name.images, by_path.images)
    spec = load_spec(ROOT / "search_spaces/default.yaml", {"data.source": "isic2018"})
    assert spec.data.source == "isic2018"  # kept as the shortcut, not resolved against the working folder


def test_data_info_plots_leave_out_the_metadata_figures_this_layout_cannot_have(train_dir, tmp_path, capsys):
    code = main(["data", "info", "--source", str(train_dir), "--image-size", "16", "--cache-dir",
                 str(tmp_path / "cache"), "--plots", str(tmp_path / "plots"), "--workers", "1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["class_counts.png"]
    assert "vasc" in out and "test_lesions" in out
