"""Ensemble model files (format 2) and temperature scaling, without Ray: round trips, averages, NLL, ECE, hold-out."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from hamtune.final.calibration import apply_calibration, apply_temperature, argmax_preserving_weights, calibration_holdout, calibration_summary, fit_calibration, fit_temperature
from hamtune.training.metrics import expected_calibration_error, nll, reliability
from hamtune.cli import main
from hamtune.training.config import TrainConfig
from hamtune.vocab import CLASSES
from hamtune.training.model import build_model
from hamtune.final.modelfile import ensemble_record, load_model, member_record, save_record

PROBS = [f"prob_{c}" for c in CLASSES]


def network(seed: int, **overrides):
    torch.manual_seed(seed)
    config = TrainConfig(model="resnet10t", head_hidden=16, head_dropout=0.0, seed=seed, **overrides)
    return build_model(config).eval(), config.to_dict()


@pytest.fixture(scope="module")
def members():
    """Three differently initialised resnet10t networks (random weights give distinct, non-trivial outputs)."""
    return [network(seed) for seed in (1, 2, 3)]


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)


def write_ensemble(path, members, temperature=1.0, **calibration):
    record = ensemble_record([member_record(m, config=c, extra={"seed": c["seed"]}) for m, c in members],
                             image_size=16, fingerprint="e" * 20, temperature=temperature, **calibration)
    return save_record(path, record)


def test_ensemble_file_round_trips_weights_only_and_predicts_the_members_average(members, images, tmp_path):
    from hamtune.training.predict import predict_proba

    path = write_ensemble(tmp_path / "model.pt", members)
    saved = torch.load(path, map_location="cpu", weights_only=True)  # plain data: no code runs on load
    assert saved["format_version"] == 2 and len(saved["members"]) == 3 and saved["temperature"] == 1.0
    assert saved["model"] == "ensemble of 3: resnet10t, resnet10t, resnet10t"
    assert [m["config"]["seed"] for m in saved["members"]] == [1, 2, 3]

    loaded = load_model(path)
    assert len(loaded.members) == 3 and loaded.image_size == 16 and loaded.temperature == 1.0
    for (original, _), rebuilt in zip(members, loaded.members):
        for name, tensor in original.state_dict().items():
            assert torch.equal(tensor, rebuilt.state_dict()[name]), name
    each = [predict_proba(m, images) for m, _ in members]
    assert not np.allclose(each[0], each[1], atol=1e-3)  # the members really differ, so the average means something
    np.testing.assert_allclose(loaded.predict_proba(images), np.mean(each, axis=0), rtol=0, atol=1e-12)
    with pytest.raises(Exception, match="ensemble of 3 networks has no single model"):
        loaded.model

    scaled = load_model(write_ensemble(tmp_path / "scaled.pt", members, temperature=2.5))
    np.testing.assert_allclose(scaled.predict_proba(images), apply_temperature(np.mean(each, axis=0), 2.5), atol=1e-12)
    assert (scaled.predict_proba(images).argmax(1) == loaded.predict_proba(images).argmax(1)).all()

    # class biases and decision weights round-trip and are applied: calibrated mean, then the weighted argmax
    bias, weights = np.linspace(-1, 1, 7), np.array([3.0, 2.0, 1.0, 4.0, 1.0, 0.1, 4.0])
    full = load_model(write_ensemble(tmp_path / "full.pt", members, temperature=2.5, class_bias=bias,
                                     decision_weights=weights))
    expected = apply_calibration(np.mean(each, axis=0), 2.5, bias)
    np.testing.assert_allclose(full.predict_proba(images), expected, atol=1e-12)
    assert (full.decide(expected) == (expected * weights).argmax(1)).all()
    assert (loaded.decide(expected) == expected.argmax(1)).all()  # defaults: no bias, plain argmax
    assert loaded.class_bias.tolist() == [0.0] * 7 and loaded.decision_weights.tolist() == [1.0] * 7


def test_a_format_2_file_without_bias_or_weights_loads_and_a_bad_one_is_refused(members, images, tmp_path):
    path = write_ensemble(tmp_path / "old.pt", members[:1], temperature=1.5)
    record = torch.load(path, weights_only=True)
    del record["class_bias"], record["decision_weights"]  # as written before they existed
    old = load_model(save_record(tmp_path / "older.pt", record))
    assert old.temperature == 1.5 and old.class_bias.tolist() == [0.0] * 7 and old.decision_weights.tolist() == [1.0] * 7
    record["decision_weights"] = [1.0] * 6 + [0.0]
    with pytest.raises(Exception, match=r"decision_weights .*expected 7 positive numbers"):
        load_model(save_record(tmp_path / "bad.pt", record))


def test_predict_evaluate_and_serve_read_an_ensemble(members, tmp_path, sample_dir, capsys):
    from hamtune.data.images import decode_image
    from hamtune.serve.predictor import Predictor

    path = write_ensemble(tmp_path / "model.pt", members, temperature=1.7)
    files = sorted(sample_dir.rglob("*.jpg"))[:4]
    assert main(["predict", "--model", str(path), *map(str, files), "--out", str(tmp_path / "p.json")]) == 0
    table = pd.DataFrame(json.loads((tmp_path / "p.json").read_text()))
    loaded = load_model(path)
    expected = loaded.predict_proba(np.stack([decode_image(f, 16) for f in files]))
    np.testing.assert_allclose(table[PROBS].to_numpy(), expected, atol=1e-9)

    assert main(["evaluate", "--model", str(path), "--images", str(sample_dir), "--labels",
                 str(sample_dir / "HAM10000_metadata.csv"), "--out", str(tmp_path / "eval")]) == 0
    capsys.readouterr()
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["members"] == 3 and metrics["temperature"] == pytest.approx(1.7)
    assert "3 networks" in (tmp_path / "eval" / "report.md").read_text()

    predictor = Predictor.from_file(path)
    image = predictor.decode(files[0].read_bytes())
    np.testing.assert_allclose(predictor.predict_proba(image[None]), expected[:1], atol=1e-9)
    heat = predictor.gradcam(image, int(expected[0].argmax()))
    assert heat.shape == (16, 16) and 0 <= heat.min() and heat.max() <= 1
    assert predictor.describe()["members"] == 3 and predictor.describe()["temperature"] == pytest.approx(1.7)


def test_version_1_files_still_load(members, images, tmp_path):
    from hamtune.training.predict import predict_proba

    model, config = members[0]
    member = member_record(model, config=config)
    v1 = {"format": "hamtune-model", "format_version": 1, "classes": list(CLASSES), "image_size": 16,
          "data_fingerprint": "1" * 20, **{k: member[k] for k in ("state_dict", "model", "head_hidden", "head_dropout",
                                                                  "use_meta", "meta_dim", "mean", "std", "config")}}
    torch.save(v1, tmp_path / "v1.pt")
    loaded = load_model(tmp_path / "v1.pt")
    assert len(loaded.members) == 1 and loaded.temperature == 1.0 and loaded.info["model"] == "resnet10t"
    np.testing.assert_allclose(loaded.predict_proba(images), predict_proba(model, images), atol=1e-12)

    torch.save({**v1, "format_version": 3}, tmp_path / "v3.pt")
    assert main(["predict", "--model", str(tmp_path / "v3.pt"), str(tmp_path)]) == 2


# ---------------------------------------------------------------------------------------------------------------
# Temperature scaling


def overconfident(n: int, true_temperature: float, seed: int = 0):
    """Labels drawn from softmax(z / T_true) while the 'model' reports softmax(z): the best T is T_true."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2.0, (n, len(CLASSES)))
    truth = apply_temperature(np.exp(z), true_temperature)
    labels = np.array([rng.choice(len(CLASSES), p=p) for p in truth])
    reported = apply_temperature(np.exp(z), 1.0)
    return reported, labels


def test_temperature_scaling_lowers_nll_and_ece_on_its_fitting_data_and_recovers_a_known_temperature():
    probs, labels = overconfident(20000, 2.5)
    temperature = fit_temperature(probs, labels)
    assert temperature == pytest.approx(2.5, rel=0.06)
    summary = calibration_summary(probs, labels, temperature)
    assert summary["nll_after"] < summary["nll_before"] - 0.05
    assert summary["ece_after"] < summary["ece_before"] / 2
    # the recovered temperature is as good as 20,000 rows can show: its ECE lies in a perfect model's noise floor,
    # while the overconfident probabilities lie far above it
    floor = summary["ece_floor"]
    assert floor["p5_p95"][0] <= floor["median"] <= floor["p5_p95"][1] and floor["draws"] == 200
    assert summary["ece_after"] <= floor["p5_p95"][1] and summary["ece_before"] > 5 * floor["p5_p95"][1]
    assert nll(apply_temperature(probs, temperature), labels) <= min(
        nll(apply_temperature(probs, t), labels) for t in (temperature * 0.9, temperature * 1.1))

    underconfident, labels_u = overconfident(5000, 0.5, seed=1)
    assert fit_temperature(underconfident, labels_u) < 1  # sharpening, too
    assert (apply_temperature(probs, 3.0).argmax(1) == probs.argmax(1)).all()  # the top class never changes


def test_bias_corrected_calibration_undoes_a_shifted_class_mix_that_a_temperature_cannot():
    """A 'model' trained to over-predict rare classes (a weighted loss) reports softmax(z - log prior_shift) while the
    labels follow softmax(z / T): fit_calibration recovers T and the bias, a temperature alone cannot."""
    rng = np.random.default_rng(2)
    n, k = 20000, len(CLASSES)
    z = rng.normal(0, 2.0, (n, k)) + np.log([0.03, 0.05, 0.11, 0.01, 0.11, 0.67, 0.02])  # HAM10000-like mix
    truth = apply_calibration(np.exp(z), 1.5)
    labels = np.array([rng.choice(k, p=p) for p in truth])
    true_bias = np.log([0.03, 0.05, 0.11, 0.01, 0.11, 0.67, 0.02]) / 1.5
    reported = apply_calibration(np.exp(z), 1.0, -true_bias * 1.5)  # the class mix taken out, as a weighted loss does
    temperature, bias = fit_calibration(reported, labels)
    assert temperature == pytest.approx(1.5, rel=0.06) and bias[0] == 0
    np.testing.assert_allclose(bias - bias.mean(), true_bias - true_bias.mean(), atol=0.15)
    both = calibration_summary(reported, labels, temperature, bias)
    alone = calibration_summary(reported, labels, fit_temperature(reported, labels))
    assert both["nll_after"] < alone["nll_after"] - 0.2 and both["ece_after"] < alone["ece_after"]

    # The biases move the top class (nv, the commonest, wins more often), but decision weights exp(-b) give back
    # exactly the uncalibrated argmax: calibration changes no prediction.
    calibrated, weights = apply_calibration(reported, temperature, bias), argmax_preserving_weights(bias)
    assert (calibrated.argmax(1) != reported.argmax(1)).mean() > 0.1
    assert weights.mean() == pytest.approx(1.0) and weights[5] == weights.min()
    assert ((calibrated * weights).argmax(1) == reported.argmax(1)).all()


def test_ece_by_hand():
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.6, 0.4], [0.3, 0.7]])
    labels = np.array([0, 1, 0, 1])
    # 15 bins: 0.95 -> bin 14 (2 rows, accuracy 0.5, confidence 0.95); 0.6 -> bin 8 (acc 1); 0.7 -> bin 10 (acc 1)
    expected = (2 * abs(0.5 - 0.95) + abs(1 - 0.6) + abs(1 - 0.7)) / 4
    assert expected_calibration_error(probs, labels) == pytest.approx(expected)
    table = reliability(probs, labels)
    assert len(table) == 15 and table["count"].sum() == 4 and table.loc[14, "count"] == 2


def test_calibration_holdout_is_lesion_grouped_stratified_and_deterministic():
    rng = np.random.default_rng(3)
    rows = []
    for k, code in enumerate(CLASSES):
        for lesion in range(40 if code == "nv" else 8):
            rows += [{"lesion_id": f"L{k}_{lesion}", "dx": code}] * int(rng.integers(1, 4))
    table = pd.DataFrame(rows)
    test_rows = np.arange(0, len(table), 7)  # pretend every 7th row is test: the hold-out only sees `index`
    index = np.setdiff1d(np.arange(len(table)), test_rows)
    fit, held = calibration_holdout(table, index, 0.15, seed=0)
    assert np.array_equal(np.sort(np.concatenate([fit, held])), index)  # a partition of the rows given
    assert set(table["lesion_id"].iloc[fit]).isdisjoint(table["lesion_id"].iloc[held])
    assert set(held).isdisjoint(test_rows)
    assert 0.10 < len(held) / len(index) < 0.20
    for code in CLASSES:
        in_class = table["dx"].iloc[held] == code
        assert in_class.any(), code  # every diagnosis is represented in the calibration slice
    again = calibration_holdout(table, index, 0.15, seed=0)
    assert np.array_equal(again[1], held)
    assert not np.array_equal(calibration_holdout(table, index, 0.15, seed=1)[1], held)
