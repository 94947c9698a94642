"""Calibration: make a model's probabilities mean what they say, and decide a diagnosis from them; how to measure it.

Calibrated probabilities are p_cal = softmax(log(p) / T + b): a temperature T and one bias per class, fitted
together by negative log-likelihood ("bias-corrected temperature scaling", Alexandari et al., ICML 2020). For a
single network log(p) is its logits up to a constant, so b = 0 is Guo et al.'s temperature scaling; for an ensemble
it scales the log of the averaged probabilities. The biases matter here because hamtune's imbalance strategies
(weighted loss, oversampling, focal loss) train a network to over-predict the rare diagnoses on purpose: its
probabilities then answer for a population where the rare diagnoses are far more common than they are, which no
temperature can undo (on real HAM10000 a temperature alone moved the test ECE from 0.052 to 0.048; T and b
together to 0.028, BENCHMARKS.md).

Calibrated probabilities answer for the population of the data they were fitted on (HAM10000's mix: 67% nv), so
their top class is mostly "nv". The diagnosis a model predicts stays the one its networks pick (the argmax of the
uncalibrated average): that is the decision the search selected configurations by (val balanced accuracy), and the
imbalance strategy trained it to weigh rare diagnoses. decide() with argmax_preserving_weights(b) = exp(-b) gives
exactly that decision from the calibrated probabilities, for any T > 0. So a model file keeps both: probabilities
that mean what they say, and the decisions the search measured; calibration never changes a prediction. (On the
real HAM10000, the "balanced" alternative, the largest p_cal / class frequency, lost to it on the held-back slice for
every member and the ensemble: its 7 frequencies and biases, fitted on 15 dermatofibromas, add noise.)

T and b must be fitted on data that the weights never trained on (else they learn their overconfidence on memorised
images) and that the test never sees (else the test estimate is no longer clean). The retrain (hamtune.final.retrain)
therefore holds back CALIBRATION_FRACTION of the train+val lesions, stratified by diagnosis, trains on the rest and
fits on the held-back slice: calibration_holdout below. The search's val split cannot serve: the retrain trains on it.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from hamtune.data.split import lesion_classes
from hamtune.training.metrics import ECE_BINS, TINY, expected_calibration_error, nll
from hamtune.vocab import CLASSES

CALIBRATION_FRACTION = 0.15
T_BOUNDS = (0.05, 20.0)


def apply_calibration(probs: np.ndarray, temperature: float, class_bias: np.ndarray | None = None) -> np.ndarray:
    """softmax(log(probs) / T + b) row-wise, in float64; T = 1 and b = 0 return the probabilities (renormalised)."""
    probs = np.asarray(probs, dtype=np.float64)
    logits = np.log(np.clip(probs, TINY, None)) / float(temperature)
    if class_bias is not None:
        logits = logits + np.asarray(class_bias, dtype=np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    out = np.exp(logits)
    return out / out.sum(axis=1, keepdims=True)


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(probs) / T): temperature scaling alone (the top class never changes)."""
    return apply_calibration(probs, temperature)


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The T in T_BOUNDS minimising the NLL of apply_temperature(probs, T) on (probs, labels)."""
    from scipy.optimize import minimize_scalar

    if len(labels) == 0:
        raise ValueError("fit_temperature: no rows to fit on")
    lo, hi = (math.log(b) for b in T_BOUNDS)
    found = minimize_scalar(lambda log_t: nll(apply_temperature(probs, math.exp(log_t)), labels), bounds=(lo, hi),
                            method="bounded", options={"xatol": 1e-4})
    return float(math.exp(found.x))


def fit_calibration(probs: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """T in T_BOUNDS and biases b (b[0] = 0: only differences matter) minimising the NLL of apply_calibration."""
    from scipy.optimize import minimize

    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        raise ValueError("fit_calibration: no rows to fit on")
    log_p = np.log(np.clip(np.asarray(probs, dtype=np.float64), TINY, None))
    n, k = log_p.shape
    onehot = np.eye(k)[labels]

    def loss_and_grad(w: np.ndarray) -> tuple[float, np.ndarray]:
        inv_t = math.exp(-w[0])
        z = log_p * inv_t + np.concatenate([[0.0], w[1:]])
        z -= z.max(axis=1, keepdims=True)
        q = np.exp(z)
        q /= q.sum(axis=1, keepdims=True)
        loss = -float(np.mean(np.sum(onehot * np.log(np.clip(q, TINY, None)), axis=1)))
        residual = (q - onehot) / n  # d loss / d z
        grad_log_t = -float(np.sum(residual * log_p)) * inv_t
        return loss, np.concatenate([[grad_log_t], residual.sum(axis=0)[1:]])

    lo, hi = (math.log(b) for b in T_BOUNDS)
    start = np.zeros(k)
    start[0] = math.log(fit_temperature(probs, labels))
    found = minimize(loss_and_grad, start, jac=True, method="L-BFGS-B", bounds=[(lo, hi)] + [(-30.0, 30.0)] * (k - 1))
    return float(math.exp(found.x[0])), np.concatenate([[0.0], found.x[1:]])


def argmax_preserving_weights(class_bias: np.ndarray) -> np.ndarray:
    """exp(-b), scaled to mean 1: decide(apply_calibration(p, T, b), these) is the plain argmax of p for any T > 0
    (p_cal * exp(-b) is proportional to p^(1/T) row by row), so the calibration changes no prediction."""
    weights = np.exp(-np.asarray(class_bias, dtype=np.float64))
    return weights / weights.mean()


def ece_noise_floor(probs: np.ndarray, bins: int = ECE_BINS, *, draws: int = 200, seed: int = 0) -> dict:
    """The ECE a perfectly calibrated model shows on these rows: labels drawn from `probs` themselves (calibrated by
    construction), `draws` times. A finite test set cannot resolve an ECE below about this."""
    probs = np.asarray(probs, dtype=np.float64)
    rng = np.random.default_rng(seed)
    cumulative, last = probs.cumsum(axis=1), probs.shape[1] - 1
    values = [expected_calibration_error(probs, np.minimum((rng.random((len(probs), 1)) > cumulative).sum(axis=1),
                                                           last), bins) for _ in range(draws)]
    return {"median": float(np.median(values)), "p5_p95": [float(v) for v in np.percentile(values, [5, 95])],
            "draws": draws}


def calibration_summary(probs: np.ndarray, labels: np.ndarray, temperature: float,
                        class_bias: np.ndarray | None = None) -> dict:
    """NLL and ECE before and after applying the calibration (temperature, biases) to `probs`, and the ECE a
    perfectly calibrated model would show on the same rows (ece_noise_floor of the calibrated probabilities)."""
    after = apply_calibration(probs, temperature, class_bias)
    return {"n": int(len(labels)), "nll_before": nll(probs, labels), "nll_after": nll(after, labels),
            "ece_before": expected_calibration_error(probs, labels),
            "ece_after": expected_calibration_error(after, labels), "ece_floor": ece_noise_floor(after)}


def calibration_holdout(table: pd.DataFrame, index: np.ndarray, fraction: float = CALIBRATION_FRACTION, *,
                        seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split the rows `index` of `table` into (train, calibration) by lesion, per diagnosis.

    Per class (the lesion's diagnosis), the lesions are shuffled and the first ones go to calibration until their
    images come nearest to `fraction` of the class's images; a class with one lesion keeps it for training. Whole
    lesions move, so no lesion has images on both sides.
    """
    index = np.asarray(index, dtype=np.int64)
    rows = table.iloc[index]
    per_lesion = rows.groupby("lesion_id", sort=True).size()
    classes = lesion_classes(rows)
    held: set = set()
    for class_index, code in enumerate(CLASSES):
        lesions = classes.index[classes == code].to_numpy()
        if len(lesions) < 2:
            continue
        lesions = lesions[np.random.default_rng([seed, class_index, 15]).permutation(len(lesions))]
        sizes = per_lesion[lesions].to_numpy()
        quota, filled = fraction * sizes.sum(), 0
        for lesion, size in zip(lesions[:-1], sizes[:-1]):  # the last lesion always stays for training
            if filled > 0 and abs(filled + size - quota) >= abs(filled - quota):
                break
            held.add(lesion)
            filled += size
    is_held = rows["lesion_id"].isin(held).to_numpy()
    return index[~is_held], index[is_held]
