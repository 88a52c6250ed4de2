import numpy as np
import pytest

from tamperbench import metrics


def test_perfectly_separated_scores():
    m = metrics.detection_metrics(np.array([0.1, 0.2, 0.3]), np.array([0.7, 0.8, 0.9]))
    assert m == pytest.approx({"auroc": 1.0, "fpr95": 0.0, "fpr80": 0.0, "aupr_in": 1.0, "aupr_out": 1.0, "tpr_at_fpr5": 1.0})


def test_hand_computed_auroc_and_rates():
    clean = np.array([0.1, 0.4, 0.35, 0.8])
    tampered = np.array([0.3, 0.9, 0.5, 0.6])
    # pairs (t > c): 0.3 beats 0.1; 0.9 beats all 4; 0.5 beats 3; 0.6 beats 3 → 11 of 16
    m = metrics.detection_metrics(clean, tampered)
    assert m["auroc"] == pytest.approx(11 / 16)
    # to catch 95 % of 4 tampered inputs the threshold must reach 0.3: clean 0.35, 0.4, 0.8 pass → 3/4
    assert m["fpr95"] == pytest.approx(0.75)
    # at FPR 0 (no clean input flagged, threshold above 0.8) only 0.9 is caught
    assert m["tpr_at_fpr5"] == pytest.approx(0.25)


def test_fpr_at_80_and_95_percent_caught():
    clean = np.array([0.1, 0.4, 0.35, 0.8, 0.55])
    tampered = np.array([0.3, 0.9, 0.5, 0.6, 0.7])
    m = metrics.detection_metrics(clean, tampered)
    # catching 4 of 5 (80 %) needs the threshold at 0.5: clean 0.55 and 0.8 pass → 2/5
    assert m["fpr80"] == pytest.approx(0.4)
    # catching all 5 (≥ 95 %) needs 0.3: clean 0.35, 0.4, 0.55, 0.8 pass → 4/5
    assert m["fpr95"] == pytest.approx(0.8)


def test_identical_distributions_give_half_and_shift_gives_one():
    rng = np.random.default_rng(0)
    same = metrics.detection_metrics(rng.normal(size=4000), rng.normal(size=4000))
    assert same["auroc"] == pytest.approx(0.5, abs=0.03)
    shifted = metrics.detection_metrics(rng.normal(size=500), rng.normal(10, 1, size=500))
    assert shifted["auroc"] == pytest.approx(1.0)


def test_bootstrap_interval_contains_the_estimate_and_narrows_with_n():
    rng = np.random.default_rng(1)
    c, t = rng.normal(size=200), rng.normal(1, 1, size=200)
    lo, hi = metrics.bootstrap_ci(c, t, n_boot=200)
    est = metrics.detection_metrics(c, t)["auroc"]
    assert lo < est < hi
    c2, t2 = rng.normal(size=2000), rng.normal(1, 1, size=2000)
    lo2, hi2 = metrics.bootstrap_ci(c2, t2, n_boot=100)
    assert hi2 - lo2 < hi - lo
    assert metrics.bootstrap_ci(c, t, n_boot=50, seed=3) == metrics.bootstrap_ci(c, t, n_boot=50, seed=3)


def test_bad_inputs():
    with pytest.raises(ValueError, match="need clean and tampered"):
        metrics.detection_metrics(np.array([]), np.array([1.0]))
    with pytest.raises(ValueError, match="finite"):
        metrics.detection_metrics(np.array([np.nan]), np.array([1.0]))
    with pytest.raises(ValueError, match="valid metrics: auroc"):
        metrics.bootstrap_ci(np.ones(3), np.ones(3), "accuracy")


def test_wilson_interval_is_honest_at_the_edges():
    low, high = metrics.wilson_interval(0, 10)
    assert low == 0 and 0.27 < high < 0.28  # the textbook value 0.2775
    low, high = metrics.wilson_interval(10, 10)
    assert high == pytest.approx(1.0) and 0.72 < low < 0.73
    low, high = metrics.wilson_interval(1, 12)  # the old one-pixel row: 1 of 12
    assert 0.01 < low < 0.02 and 0.35 < high < 0.36
    assert all(np.isnan(metrics.wilson_interval(0, 0)))
