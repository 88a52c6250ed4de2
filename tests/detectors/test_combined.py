import numpy as np
import pytest
import torch
from scipy import stats

from tamperbench import data, metrics, models
from tamperbench.detectors import DetectorError, combined, detector
from tamperbench.detectors.base import Detector


# ---------------------------------------------------------------- pure functions
def test_conformal_pvalues_count_each_tail_by_hand():
    cal = np.array([1.0, 2.0, 2.0, 3.0])
    s = np.array([0.0, 2.0, 3.5])
    assert combined.conformal_pvalues(cal, s, "upper") == pytest.approx([5 / 5, 4 / 5, 1 / 5])
    assert combined.conformal_pvalues(cal, s, "lower") == pytest.approx([1 / 5, 4 / 5, 5 / 5])
    assert combined.conformal_pvalues(cal, s, "two") == pytest.approx([2 / 5, 1.0, 2 / 5])
    with pytest.raises(DetectorError, match="valid tails: upper, lower, two"):
        combined.conformal_pvalues(cal, s, "left")


@pytest.mark.parametrize("method", ["fisher", "bonferroni"])
def test_combined_pvalues_follow_scipy_and_the_bonferroni_bound(method):
    p = np.random.default_rng(0).uniform(1e-4, 1, size=(50, 3))
    got = np.exp(combined.combined_log_pvalue(p, method))
    expect = (stats.combine_pvalues(p, method="fisher", axis=1).pvalue if method == "fisher"
              else np.minimum(1, 3 * p.min(1)))
    assert got == pytest.approx(expect, rel=1e-9)


def test_cauchy_combination_is_liu_and_xie_and_does_not_underflow():
    p = np.array([[0.5, 0.5], [0.01, 0.5], [1e-20, 0.3]])
    t = np.tan((0.5 - p) * np.pi).mean(1)
    assert np.exp(combined.combined_log_pvalue(p[:2], "cauchy")) == pytest.approx(0.5 - np.arctan(t[:2]) / np.pi, rel=1e-9)
    # far tail: 1/2 − arctan(T)/π would round to 0; the score stays finite and ordered
    logs = combined.combined_log_pvalue(p, "cauchy")
    assert np.isfinite(logs).all() and logs[2] < logs[1] < logs[0]


@pytest.mark.parametrize("method", combined.METHODS)
def test_the_combined_pvalue_of_clean_inputs_is_uniform(method):
    """Clean inputs scored against a clean calibration set: each member's conformal p-value is
    uniform, so the combined p-value is (super-)uniform: its false-alarm rate at α lies within the
    interval of α (Bonferroni may sit below, never above)."""
    rng = np.random.default_rng(1)
    n_cal, n_test, k = 2000, 20000, 2
    cal = [rng.normal(size=n_cal) for _ in range(k)]  # independent members, as Fisher assumes
    test = [rng.normal(size=n_test) for _ in range(k)]
    p = np.stack([combined.conformal_pvalues(c, s) for c, s in zip(cal, test)], axis=1)
    p_comb = np.exp(combined.combined_log_pvalue(p, method))
    for alpha in (0.01, 0.05, 0.2):
        rate = (p_comb <= alpha).mean()
        half = 4 * np.sqrt(alpha * (1 - alpha) / n_test) + 1 / n_cal
        assert rate <= alpha + half, (method, alpha, rate)
        if method != "bonferroni":
            assert rate >= alpha - half, (method, alpha, rate)
    # two-tailed members: also (super-)uniform
    p2 = np.stack([combined.conformal_pvalues(c, s, "two") for c, s in zip(cal, test)], axis=1)
    rate2 = (np.exp(combined.combined_log_pvalue(p2, method)) <= 0.05).mean()
    assert rate2 <= 0.05 + 4 * np.sqrt(0.05 * 0.95 / n_test) + 2 / n_cal, (method, rate2)
    # a broken combination (say, the product of p-values read as a p-value) fails the same check
    assert (p.prod(1) <= 0.05).mean() > 0.05 + 4 * np.sqrt(0.05 * 0.95 / n_test)


# ---------------------------------------------------------------- the detector
@pytest.fixture
def setup(data_root, fake_debian_fmnist):
    trained = models.train_or_load("smallcnn", "fashion_mnist", models.TrainConfig(epochs=2, batch_size=32), "cpu")
    train, test = data.load("fashion_mnist", "train"), data.load("fashion_mnist", "test")
    return trained, train, test


def test_a_detector_combined_with_itself_ranks_as_the_detector(setup):
    """Twice the same member: the score is a non-decreasing function of the member's score and
    a function of its conformal p-value alone, so every AUROC is the member's on its p-values."""
    trained, train, test = setup
    x_cal, noise = test.x[:50], data.load("noise_uniform", "test").x[:30]
    x = torch.cat([test.x[50:], noise])
    is_noise = np.r_[np.zeros(len(test) - 50, bool), np.ones(len(noise), bool)]
    for method in combined.METHODS:
        det = detector("combined", members=[("ebo", {"n_fit": 200}), ("ebo", {"n_fit": 200})], method=method,
                       device="cpu").fit(trained, train, calibration=x_cal)
        twice, alone = det.score(x), det.members[0].score(x)
        assert np.all(np.diff(twice[np.argsort(alone, kind="stable")]) >= -1e-9), method
        p = combined.conformal_pvalues(det.calibration[0], alone)
        assert all(np.ptp(twice[p == v]) <= 1e-9 for v in np.unique(p)), method
        auroc = metrics.detection_metrics(twice[~is_noise], twice[is_noise])["auroc"]
        assert auroc == pytest.approx(metrics.detection_metrics(-p[~is_noise], -p[is_noise])["auroc"], abs=1e-12), method


def test_fit_needs_held_out_calibration_images_and_members_must_be_unsupervised(setup):
    trained, train, _ = setup
    with pytest.raises(DetectorError, match="needs held-out clean images"):
        detector("combined", members=["msp", "ebo"], device="cpu").fit(trained, train)
    with pytest.raises(DetectorError, match="member 'lid' is not an unsupervised detector; valid members: particul"):
        detector("combined", members=["msp", "lid"])
    with pytest.raises(DetectorError, match="valid methods: fisher, cauchy, bonferroni"):
        detector("combined", method="stouffer")
    with pytest.raises(DetectorError, match="tails must list one of upper, two per member"):
        detector("combined", members=["msp", "ebo"], tails=["upper"])


def test_a_fitted_combination_flags_noise_and_its_stand_in_follows_it(setup):
    trained, train, test = setup
    det = detector("combined", members=["msp", ("knn", {"n_fit": 200, "k": 5})], device="cpu")
    det.fit(trained, train, calibration=test.x[:50])
    clean = det.score(test.x[50:])
    noise = det.score(data.load("noise_uniform", "test").x[:50])
    assert metrics.detection_metrics(clean, noise)["auroc"] > 0.9
    # its differentiable stand-in follows the exact score and carries a gradient
    x = test.x[50:66].clone().requires_grad_(True)
    soft = det.torch_score(x)
    assert stats.spearmanr(soft.detach().numpy(), clean[:16]).statistic > 0.8
    (grad,) = torch.autograd.grad(soft.sum(), x)
    assert torch.isfinite(grad).all() and float(grad.abs().sum()) > 0


class _Column(Detector):
    """A fake fitted member whose score is one input coordinate."""

    name = "ebo"

    def __init__(self, column):
        super().__init__(device="cpu")
        self.column, self.trained = column, object()

    def torch_score(self, x):
        return x.flatten(1)[:, self.column]

    def score(self, x, invalid="raise"):
        return np.asarray(torch.as_tensor(x).flatten(1)[:, self.column], dtype=np.float64)


@pytest.mark.parametrize("method", combined.METHODS)
def test_the_member_that_flags_an_input_keeps_a_gradient_far_beyond_the_calibration_range(method):
    """An attacker must be told to lower the member that flags the input: with the exact floor
    1/(n + 1) that member's gradient vanishes beyond the calibration scores, and the attack would
    only move the blind member."""
    rng = np.random.default_rng(0)
    cal = [rng.normal(size=1000), rng.normal(size=1000)]
    det = combined.Combined.from_members([_Column(0), _Column(1)], cal, method=method)
    x = torch.tensor([[8.0, 0.0]], requires_grad=True)  # member 0 at 8σ, member 1 at its median
    (grad,) = torch.autograd.grad(det.torch_score(x).sum(), x)
    assert grad[0, 0] > 0 and grad[0, 0] >= grad[0, 1], (method, grad)
    # and the cap keeps a member at p = 1 from hiding the other one (Cauchy's tan(−π/2))
    low = det.combine([np.array([8.0]), np.array([-10.0])])
    assert np.isfinite(low).all() and low[0] > det.combine([np.array([0.0]), np.array([-10.0])])[0]
