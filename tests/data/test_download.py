"""`hamtune data download` against a real HTTP server on 127.0.0.1 serving ISIC-layout archives of the real sample:
a full download, a dropped connection resumed, a network failure (exit 2, .part kept, resumed next run), a corrupted
archive and a wrong count refused with nothing extracted, a second run that downloads nothing, and the downloaded
folder going through prepare, the lesion split and `hamtune search --smoke-test --source`."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from isic_fixtures import corrupt_member, isic_files, lesion_ids, sample_table, serve

from hamtune.cli import main
from hamtune.data.download import DATASETS, MANIFEST, download
from hamtune.errors import HamtuneError

SAMPLE_IMAGES = 140
TRAIN_FILES = [f.name for f in DATASETS["isic2018-train"].files]
TRAIN_INPUT, VAL_INPUT = "ISIC2018_Task3_Training_Input.zip", "ISIC2018_Task3_Validation_Input.zip"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def files(sample_dir) -> dict[str, bytes]:
    return isic_files(sample_dir)


def fetch(server, dest: Path, name: str = "isic2018-train", **kwargs):
    """download() with the sample's counts (the only thing tests change), quietly; (outcome, printed lines)."""
    lines: list[str] = []
    outcome = download(name, dest, server.base_url, expected=SAMPLE_IMAGES, progress=False, echo=lines.append,
                       **kwargs)
    return outcome, lines


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str) -> str:
    """The error message, checked to be one line (progress bars, redrawn with \\r, may come before it)."""
    lines = [line for line in re.split(r"[\r\n]", err) if line.startswith("hamtune")]
    assert len(lines) == 1 and lines[0].startswith("hamtune: error: "), err
    return lines[0]


def leftovers(dest: Path) -> list[str]:
    """Temporary folders and partial files under dest."""
    return sorted(p.name for p in dest.rglob("*")
                  if p.name.startswith(".tmp-") or p.name.endswith((".part", ".part.json")))


def test_full_download_then_second_run_downloads_nothing_and_later_runs_check_the_sha(files, tmp_path, capsys):
    with serve(files) as server:
        outcome, lines = fetch(server, tmp_path)
        assert outcome.downloaded_files == TRAIN_FILES
        assert outcome.downloaded_bytes == sum(len(files[n]) for n in TRAIN_FILES)
        assert [r for r in server.requests] == [(n, None) for n in TRAIN_FILES]
        folder = tmp_path / "isic2018-train"
        assert outcome.folder == folder and outcome.extracted
        assert len(list(folder.rglob("ISIC_*.jpg"))) == SAMPLE_IMAGES
        assert (folder / "ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv").is_file()
        assert (folder / "ISIC2018_Task3_Training_LesionGroupings.csv").read_bytes() == \
            files["ISIC2018_Task3_Training_LesionGroupings.csv"]
        assert (folder / "ISIC2018_Task3_Training_Input/ATTRIBUTION.txt").is_file()
        manifest = json.loads((tmp_path / MANIFEST).read_text())["files"]
        assert {n: manifest[n]["sha256"] for n in TRAIN_FILES} == \
            {n: hashlib.sha256(files[n]).hexdigest() for n in TRAIN_FILES}
        assert leftovers(tmp_path) == []
        assert "3 file(s) downloaded" in lines[-1]

        # Second run, through the CLI (whose counts are the official ones: a complete set is not re-counted).
        before = len(server.requests)
        code, out, err = run(capsys, "data", "download", "isic2018-train", "--dest", tmp_path,
                             "--base-url", server.base_url)
        assert code == 0, err
        assert len(server.requests) == before  # not a single request
        assert "nothing to download" in out and "3 kept archive(s) match the SHA-256" in out
        assert "CC BY-NC 4.0" in out and "CC BY-NC-SA 4.0" in out and "doi:10.1038/sdata.2018.161" in out

        # A later run notices a kept archive that changed since its first download.
        archive = tmp_path / "downloads" / TRAIN_INPUT
        archive.write_bytes(archive.read_bytes() + b"\0")
        code, out, err = run(capsys, "data", "download", "isic2018-train", "--dest", tmp_path,
                             "--base-url", server.base_url)
        assert code == 2 and len(server.requests) == before
        error = one_error_line(err)
        assert f"{TRAIN_INPUT}: SHA-256" in error and "recorded at its first download" in error


def test_dropped_connection_resumes_with_a_range_request(files, tmp_path):
    with serve(files) as server:
        server.drop_once[TRAIN_INPUT] = 1_000_000
        outcome, _ = fetch(server, tmp_path)
        ranges = [r for name, r in server.requests if name == TRAIN_INPUT]
    assert len(ranges) == 2 and ranges[0] is None
    resumed_at = int(ranges[1].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= 1_000_000  # what arrived before the drop was kept (less the chunk being read)
    assert outcome.downloaded_bytes == sum(len(files[n]) for n in TRAIN_FILES)
    kept = tmp_path / "downloads" / TRAIN_INPUT
    assert hashlib.sha256(kept.read_bytes()).hexdigest() == hashlib.sha256(files[TRAIN_INPUT]).hexdigest()
    assert len(list((tmp_path / "isic2018-train").rglob("*.jpg"))) == SAMPLE_IMAGES


def test_network_failure_exits_2_keeps_the_part_and_the_next_run_resumes(files, tmp_path, capsys):
    with serve(files) as server:
        server.drop_once[VAL_INPUT] = 500_000
        code, out, err = run(capsys, "data", "download", "isic2018-val", "--dest", tmp_path,
                             "--base-url", server.base_url, "--retries", "0")
        assert code == 2
        error = one_error_line(err)
        part = tmp_path / "downloads" / f"{VAL_INPUT}.part"
        kept = part.stat().st_size
        assert 0 < kept <= 500_000
        assert "download failed after 1 attempt(s)" in error and f"{kept:,} bytes kept" in error and "resume" in error
        assert not (tmp_path / "isic2018-val").exists()

        outcome, _ = fetch(server, tmp_path, "isic2018-val")
        assert server.requests[-2:] == [(VAL_INPUT, f"bytes={kept}-"),
                                        ("ISIC2018_Task3_Validation_GroundTruth.zip", None)]
    assert outcome.downloaded_bytes == \
        len(files[VAL_INPUT]) - kept + len(files["ISIC2018_Task3_Validation_GroundTruth.zip"])
    assert not part.exists() and leftovers(tmp_path) == []
    assert len(list((tmp_path / "isic2018-val").rglob("*.jpg"))) == SAMPLE_IMAGES


def test_corrupted_archive_is_refused_and_nothing_is_extracted(files, tmp_path):
    with serve({**files, TRAIN_INPUT: corrupt_member(files[TRAIN_INPUT])}) as server:
        with pytest.raises(HamtuneError, match=r"fails its CRC check \(a corrupted download\)") as caught:
            fetch(server, tmp_path)
        assert "\n" not in str(caught.value)
        assert not (tmp_path / "isic2018-train").exists() and leftovers(tmp_path) == []
        assert not (tmp_path / "downloads" / TRAIN_INPUT).exists()
        assert not (tmp_path / MANIFEST).exists()  # nothing recorded for a refused file

        server.files[TRAIN_INPUT] = files[TRAIN_INPUT]  # the mirror is repaired: the next run fetches it afresh
        outcome, _ = fetch(server, tmp_path)
    assert outcome.downloaded_files == TRAIN_FILES
    assert len(list((tmp_path / "isic2018-train").rglob("*.jpg"))) == SAMPLE_IMAGES


def test_wrong_image_count_is_refused(sample_dir, tmp_path):
    short = isic_files(sample_dir, drop_images=1)
    refused = f"/2018/{TRAIN_INPUT}: 139 images; expected 140; the file was deleted"
    with serve(short) as server, pytest.raises(HamtuneError, match=refused):
        fetch(server, tmp_path)
    assert not (tmp_path / "isic2018-train").exists() and leftovers(tmp_path) == []


def test_a_file_that_changed_on_the_server_since_the_first_download_is_refused(files, tmp_path):
    with serve(files) as server:
        fetch(server, tmp_path, "isic2018-val")
        shutil.rmtree(tmp_path / "isic2018-val")  # the user deletes the set (the manifest stays)
        shutil.rmtree(tmp_path / "downloads")
        server.files[VAL_INPUT] = _rezip_with_other_order(files[VAL_INPUT])
        with pytest.raises(HamtuneError, match="differs from .* recorded at its first download .*the server's file"):
            fetch(server, tmp_path, "isic2018-val")
    assert not (tmp_path / "isic2018-val").exists()


def _rezip_with_other_order(archive: bytes) -> bytes:
    """The same members in reverse order: a valid archive with the same content counts but other bytes."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(archive)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in reversed(src.infolist()):
            dst.writestr(info.filename, src.read(info))
    return out.getvalue()


@pytest.mark.slow
def test_downloaded_folder_prepares_splits_by_lesion_and_searches(files, sample_dir, tmp_path, capsys):
    from hamtune.data import prepare
    from hamtune.data.split import check_split

    with serve(files) as server:
        outcome, _ = fetch(server, tmp_path)
    prepared = prepare(outcome.folder, 16, cache_dir=tmp_path / "cache", progress=False, workers=1)
    table = prepared.table.set_index("image_id")
    expected = sample_table(sample_dir).assign(lesion_id=lambda t: lesion_ids(t)).set_index("image_id")
    assert len(table) == SAMPLE_IMAGES and prepared.problems.empty
    assert (table["dx"] == expected.loc[table.index, "dx"]).all()  # the one-hot columns decode to the Kaggle dx
    assert (table["lesion_id"] == expected.loc[table.index, "lesion_id"]).all()  # lesion ids from the groupings file
    assert table["lesion_id"].nunique() == SAMPLE_IMAGES - 7  # 7 classes x one lesion with two images
    check_split(prepared.table, prepared.table["split"])  # every lesion in exactly one split
    per_lesion = prepared.table.groupby("lesion_id")["split"].nunique()
    assert (per_lesion == 1).all()
    kaggle = prepare(sample_dir, 16, cache_dir=tmp_path / "cache", progress=False, workers=1)
    same = kaggle.table.set_index("image_id").loc[table.index]
    assert (same["label"] == table["label"]).all()  # same class order, same labels

    code, out, err = run(capsys, "search", "--space", ROOT / "search_spaces/default.yaml", "--smoke-test",
                         "--source", outcome.folder, "--results-dir", tmp_path / "results", "--max-concurrent", "1")
    assert code == 0, err
    record = json.loads((tmp_path / "results/smoke-test/experiment.json").read_text())
    assert record["spec"]["data"]["source"] == str(outcome.folder)
    assert record["data"]["sizes"]["train"]["images"] + record["data"]["sizes"]["val"]["images"] + \
        record["data"]["sizes"]["test"]["images"] == SAMPLE_IMAGES
    trials = pd.read_parquet(tmp_path / "results/smoke-test/trials.parquet")
    assert len(trials) == 2 and trials["best_val_balanced_accuracy"].notna().all()
