"""hamtune's balanced accuracy equals the ISIC challenge's own scorer (isic-challenge-scoring 5.6.0, run in its own
venv with pandas 2) on the same predictions: on a submission written by hamtune's writer, and end to end on
`hamtune evaluate --isic2018-test` of a downloaded (test-server) official test set. The test set here holds the
image the official scorer gives zero weight (ISIC_0035068), so the rule is exercised, not just present."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from isic_fixtures import ISIC_COLUMNS, ground_truth_csv, isic_files, sample_table, serve
from model_fixtures import save_tiny_model

from hamtune.final.modelfile import save_record
from scorer_env import official_score

from hamtune.cli import main
from hamtune.vocab import CLASSES
from hamtune.data.isic2018 import OFFICIAL_ZERO_WEIGHT, official_weights, read_ground_truth, write_submission
from hamtune.training.metrics import classification_metrics

ZERO = OFFICIAL_ZERO_WEIGHT[0]
ISIC_FORM = "ISIC 2018 Task 3 ground truth"


@pytest.fixture(scope="module")
def renamed(sample_dir) -> dict[str, str]:
    """The sample's first df image takes the zero-weight image's id in the test set."""
    table = sample_table(sample_dir)
    return {table.loc[table["dx"] == "df", "image_id"].iloc[0]: ZERO}


def test_submission_scores_the_same_in_the_official_scorer(sample_dir, renamed, tmp_path):
    table = sample_table(sample_dir)
    ids = [renamed.get(i, i) for i in table["image_id"]]
    truth_csv = tmp_path / "ISIC2018_Task3_Test_GroundTruth.csv"
    truth_csv.write_bytes(ground_truth_csv(ids, table["dx"]))
    truth = read_ground_truth(truth_csv)
    ids = truth["image_id"].tolist()
    y_true = truth["dx"].map(CLASSES.index).to_numpy()

    rng = np.random.default_rng(7)
    probs = rng.dirichlet(np.ones(len(CLASSES)), size=len(ids))
    right = rng.random(len(ids)) < 0.5  # about half the images predicted right, the others at random
    probs[right, y_true[right]] += 1.0
    zero = ids.index(ZERO)
    probs[zero] = np.eye(len(CLASSES))[CLASSES.index("nv")] * 0.9 + 0.1 / len(CLASSES)  # a df predicted nv
    probs /= probs.sum(axis=1, keepdims=True)
    submission = write_submission(tmp_path / "submission.csv", truth["image_id"], probs)
    written = pd.read_csv(submission)
    assert list(written.columns) == ["image", *ISIC_COLUMNS] and len(written) == len(ids)

    kept = official_weights(truth["image_id"], ISIC_FORM) > 0
    assert kept.sum() == len(ids) - 1 and not kept[zero]
    ours = classification_metrics(y_true[kept], probs[kept])["balanced_accuracy"]
    theirs = official_score(truth_csv, submission)
    assert theirs["overall"] == pytest.approx(ours, abs=1e-12)
    with_the_image = classification_metrics(y_true, probs)["balanced_accuracy"]
    assert abs(with_the_image - theirs["overall"]) > 1e-3  # the rule changes the score here, so the test can fail


@pytest.mark.slow
def test_evaluate_on_the_downloaded_official_test_set_matches_the_official_scorer(sample_dir, renamed, tmp_path,
                                                                                    monkeypatch, capsys):
    from hamtune.data.download import download

    monkeypatch.setenv("HAMTUNE_DATA_DIR", str(tmp_path / "data"))
    code = main(["evaluate", "--model", str(tmp_path / "model.pt"), "--isic2018-test"])
    assert code == 2 and "run `hamtune data download isic2018-test`" in capsys.readouterr().err

    with serve(isic_files(sample_dir, renames=renamed)) as server:
        download("isic2018-test", None, server.base_url, expected=140, progress=False, echo=lambda line: None)

    # A briefly trained model (its quality does not matter, only that both scorers see the same predictions).
    model = save_tiny_model(tmp_path / "model" / "model.pt")
    # ...calibrated, with decision weights, as the retrain writes them: the official scorer takes the argmax of
    # submission.csv, which must therefore be hamtune's decision, not the most probable class.
    record = torch.load(model, weights_only=True)
    record.update(temperature=1.3, class_bias=[0.0, 0.1, 0.0, -0.1, 0.0, 0.2, 0.0],
                  decision_weights=[1.2, 0.8, 1.0, 1.5, 0.9, 0.6, 1.3])
    save_record(model, record)

    code = main(["evaluate", "--model", str(model), "--isic2018-test"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"{ZERO}: zero weight, as in the official ISIC scorer" in out
    out_dir = model.parent / "eval-isic2018-test"
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["n_test"] == 139 and metrics["zero_weight_images"] == [ZERO]
    assert f"{ZERO}: zero weight" in (out_dir / "report.md").read_text()
    submission = pd.read_csv(out_dir / "submission.csv")
    assert len(submission) == 140 and ZERO in set(submission["image"])

    truth_csv = next((tmp_path / "data" / "isic2018-test").rglob("ISIC2018_Task3_Test_GroundTruth.csv"))
    theirs = official_score(truth_csv, out_dir / "submission.csv")
    assert theirs["overall"] == pytest.approx(metrics["balanced_accuracy"], abs=1e-12)
    predicted = submission[list(ISIC_COLUMNS)].to_numpy().argmax(axis=1)
    assert len(set(predicted)) > 1  # not a constant predictor, for which any two scorers agree
    scored = submission[submission["image"] != ZERO]  # predictions.csv holds the scored images only
    probs = pd.read_csv(out_dir / "predictions.csv").set_index("image_id").loc[scored["image"]]
    most_probable = probs[[f"prob_{c.lower()}" for c in ISIC_COLUMNS]].to_numpy().argmax(axis=1)
    assert (scored[list(ISIC_COLUMNS)].to_numpy().argmax(axis=1) != most_probable).any()  # the decision weights changed some diagnoses, and the scorer saw it
