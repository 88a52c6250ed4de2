"""Batch-level tests: calibrated false alarms, power, BH flags, MMD, group scanning, populations."""

import numpy as np
import pytest
import torch
from scipy import stats as sps

from tamperbench import batch


# ---------------------------------------------------------------- per-sample quantities
def test_conformal_pvalues_count_calibration_scores_at_least_as_large():
    cal = np.array([1.0, 2.0, 3.0, 4.0])
    assert batch.conformal_pvalues(cal, np.array([0.0, 2.0, 2.5, 9.0])).tolist() == [1.0, 4 / 5, 3 / 5, 1 / 5]


def test_score_statistics_equal_scipys():
    rng = np.random.default_rng(0)
    cal = np.round(rng.normal(size=300), 1)  # ties on purpose
    scores = np.round(rng.normal(0.3, 1, size=40), 1)
    st = batch.sample_stats(cal, scores)
    out = batch.score_statistics(st, np.arange(40)[None, :], tests=("ks", "mann_whitney"))
    assert out["ks"][0] == pytest.approx(sps.ks_2samp(scores, cal, alternative="less").statistic)
    assert out["mann_whitney"][0] == pytest.approx(sps.mannwhitneyu(scores, cal).statistic / (40 * 300))


def test_leave_one_out_pvalues_of_calibration_points_are_uniform():
    cal = np.random.default_rng(1).normal(size=999)
    u = batch._held_out_stats(cal, np.arange(999)[:, None]).u.ravel()  # each point against the other 998
    assert sorted(u) == pytest.approx(np.arange(1, 1000) / 999)


# ---------------------------------------------------------------- calibrated false alarms and power
def _simulate(shift: float, p: float, n: int = 200, batches: int = 300, seed: int = 0):
    """Power of every score test: clean N(0,1), tampered N(shift, 1)."""
    rng = np.random.default_rng(seed)
    cal, clean, adv = rng.normal(size=3000), rng.normal(size=3000), rng.normal(shift, 1, size=500)
    nulls = batch.score_nulls(cal, n, 500, seed + 1)
    b = batch.draw_batches(len(clean), len(adv), n, p, batches, seed + 2)
    st = batch.sample_stats(batch.reference_for(cal, n, seed), np.r_[clean, adv])
    idx = np.c_[b.clean, len(clean) + b.adversarial]
    observed = batch.score_statistics(st, idx)
    return {t: batch.power(nulls[t].pvalues(v)) for t, v in observed.items()}


def test_false_alarm_rate_is_alpha_on_average_over_calibration_sets_for_every_test():
    import pandas as pd

    rows = pd.DataFrame(batch.conditional_false_alarms(2000, 50, calibration_sets=60, batches=100, null_batches=400, seed=1))
    mean = rows.groupby("test").false_alarm_rate.mean()
    assert set(mean.index) == set(batch.SCORE_TESTS)
    # 60 sets × 100 batches; the sets' spread dominates the Monte-Carlo error of the mean
    sd = rows.groupby("test").false_alarm_rate.std() / np.sqrt(60)
    assert (np.abs(mean - 0.05) < 4 * sd + 0.005).all(), mean.to_dict()


def test_one_calibration_set_spreads_the_rate_more_for_larger_batches():
    import pandas as pd

    small = pd.DataFrame(batch.conditional_false_alarms(2000, 20, 30, 100, 300, seed=2))
    large = pd.DataFrame(batch.conditional_false_alarms(2000, 400, 30, 100, 300, seed=2))
    assert large.false_alarm_rate.std() > small.false_alarm_rate.std()


def test_power_rises_with_the_tampered_fraction():
    curve = [_simulate(shift=4.0, p=p, seed=3) for p in (0.0, 0.02, 0.1, 0.5)]
    for test in batch.SCORE_TESTS:
        powers = [c[test] for c in curve]
        assert powers[-1] > 0.95 and powers[0] < 0.12, (test, powers)
        assert all(b >= a - 0.05 for a, b in zip(powers, powers[1:])), (test, powers)
    # the tail count does not dilute: at 2 % it beats KS by far
    assert curve[1]["tail_count"] > curve[1]["ks"] + 0.3


def test_p_zero_and_p_one_edge_cases():
    b0 = batch.draw_batches(100, 10, 50, 0.0, 3, 0)
    assert b0.k == 0 and b0.adversarial.shape == (3, 0) and b0.clean.shape == (3, 50) and not b0.mask.any()
    b1 = batch.draw_batches(100, 80, 50, 1.0, 3, 0)
    assert b1.k == 50 and b1.clean.shape == (3, 0) and b1.mask.all() and not b1.repeats_adversarial
    small = batch.draw_batches(100, 5, 50, 1.0, 2, 0)  # more draws than adversarial examples
    assert small.repeats_adversarial and small.adversarial.max() < 5
    for row in b1.adversarial:
        assert len(set(row)) == 50  # distinct within a batch when the population allows
    with pytest.raises(batch.BatchError, match="adversarial population is empty"):
        batch.draw_batches(100, 0, 50, 0.1, 1, 0)
    with pytest.raises(batch.BatchError, match=r"p must be a number in \[0, 1\]"):
        batch.draw_batches(100, 10, 50, 1.5, 1, 0)


# ---------------------------------------------------------------- which samples
def test_benjamini_hochberg_on_known_pvalues():
    p = np.array([[0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205, 0.212, 0.216]])
    # BH at q = 0.05: the k-th smallest p-value against k·q/m = 0.005k; only the first two pass
    assert batch.benjamini_hochberg(p, 0.05)[0].tolist() == [True, True] + [False] * 8
    fdp, recall = batch.flag_quality(batch.benjamini_hochberg(p, 0.05), np.array([True, False] + [False] * 8))
    assert fdp[0] == 0.5 and recall[0] == 1.0


def test_bh_flags_keep_the_fdr_on_conformal_pvalues():
    rng = np.random.default_rng(0)
    cal = rng.normal(size=5000)
    clean, adv = rng.normal(size=5000), rng.normal(3.5, 1, size=500)
    b = batch.draw_batches(len(clean), len(adv), 500, 0.1, 300, 1)
    u = batch.conformal_pvalues(cal, np.r_[clean, adv])[np.c_[b.clean, len(clean) + b.adversarial]]
    fdp, recall = batch.flag_quality(batch.benjamini_hochberg(u, 0.1), b.mask)
    assert fdp.mean() <= 0.1 + 0.02 and recall.mean() > 0.5


# ---------------------------------------------------------------- MMD
def test_mmd_permutation_pvalue_is_never_zero_and_detects_a_shift():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 5, generator=g), torch.randn(60, 5, generator=g) + 3.0
    stat, p = batch.mmd_test(x, y, permutations=200)
    assert stat > 0 and p == pytest.approx(1 / 201)  # every permutation falls below: (1 + 0)/(1 + B)
    _, p_same = batch.mmd_test(x, torch.randn(60, 5, generator=g), permutations=200)
    assert p_same > 0.05
    with pytest.raises(batch.BatchError, match="permutations must be an int ≥ 1"):
        batch.mmd_test(x, y, permutations=0)


def test_batched_mmd_equals_the_direct_formula():
    g = torch.Generator().manual_seed(1)
    feats, ref = torch.randn(40, 3, generator=g), torch.randn(25, 3, generator=g)
    m = batch.MMDBatches(feats, ref, bandwidth=1.5)
    idx = np.array([[0, 5, 7, 9], [1, 2, 3, 39]])
    direct = [batch.mmd2(feats[i].double(), ref.double(), 1.5) for i in idx]
    assert m.statistics(idx) == pytest.approx(direct, rel=1e-4)


# ---------------------------------------------------------------- group subset scanning
def test_group_scan_finds_a_planted_group():
    rng = np.random.default_rng(0)
    p = rng.uniform(size=(100, 300))
    planted = p.copy()
    planted[:15, :40] = rng.uniform(0, 0.01, size=(15, 40))  # 15 samples share 40 anomalous nodes
    clean = batch.group_scan_statistic(batch.pvalue_levels(p))
    tampered = batch.group_scan_statistic(batch.pvalue_levels(planted))
    assert tampered > 3 * clean


# ---------------------------------------------------------------- populations
def test_held_out_populations_are_disjoint_from_each_other_and_the_pool():
    pool = np.arange(0, 1000, 7)
    h = batch.held_out_split(1000, pool, 500, seed=0)
    assert len(h.calibration) == 500 and len(h.clean) == 1000 - len(pool) - 500
    assert not set(h.calibration) & set(h.clean)
    assert not (set(h.calibration) | set(h.clean)) & set(pool)
    with pytest.raises(batch.BatchError, match="leaves no clean batch population"):
        batch.held_out_split(1000, pool, 900)


# ---------------------------------------------------------------- one incoming batch
def test_batch_pvalue_and_flags_for_one_incoming_batch():
    rng = np.random.default_rng(4)
    cal = rng.normal(size=4000)
    clean = rng.normal(size=300)
    tampered = np.r_[rng.normal(size=285), rng.normal(6, 1, size=15)]
    assert batch.batch_pvalue(clean, cal, "tail_count", null_batches=300) > 0.05
    assert batch.batch_pvalue(tampered, cal, "tail_count", null_batches=300) == pytest.approx(1 / 301)  # never 0
    flags = batch.flag_samples(tampered, cal, q=0.1)
    assert flags[285:].mean() > 0.8 and flags[:285].sum() <= 3


def test_batch_tests_refuse_bad_scores_and_names():
    cal = np.random.default_rng(0).normal(size=500)
    with pytest.raises(batch.BatchError, match=r"batch: 1 of 3 scores are not finite \(samples \[1\]\)"):
        batch.batch_pvalue(np.array([0.1, np.nan, 0.3]), cal)
    with pytest.raises(batch.BatchError, match=r"calibration: 1 of 500 scores are not finite"):
        batch.flag_samples(np.zeros(3), np.r_[cal[:-1], np.inf])
    with pytest.raises(batch.BatchError, match="unknown batch test 'kss'; valid score tests: ks, mann_whitney"):
        batch.batch_pvalue(np.zeros(3), cal, "kss")
