import numpy as np
import pytest
import torch

from tamperbench import data, metrics, models
from tamperbench.detectors import DetectorError, available, detector
from tamperbench.detectors import feature_response as fr
from tamperbench.detectors import lid as lid_mod
from tamperbench.detectors import subset_scan as ss

UNSUPERVISED = [n for n in available() if n not in ("lid", "kd_bu", "mahalanobis_adv")]


# ---------------------------------------------------------------- pure scoring functions
def test_entropy_of_a_constant_map_is_zero_and_of_noise_is_high():
    const = fr.normalise_response(torch.ones(2, 1, 8, 8))
    assert torch.equal(const, torch.zeros(2, 8, 8))
    assert torch.allclose(fr.local_spatial_entropy(const), torch.zeros(2))
    two_values = torch.zeros(1, 6, 6)
    two_values[0, :, ::2] = 1.0  # stripes: each 3×3 interior window holds both values
    ent = fr.local_spatial_entropy(two_values, window=3, bins=2)
    assert 0.5 < float(ent) <= 1.0  # at most 1 bit with 2 bins
    noise = torch.rand(1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert float(fr.local_spatial_entropy(noise, bins=8)) > 2.0


def test_lid_estimate_matches_hand_computation():
    # distances 1, 2, 4: mean log(r_i / r_k) = (log 1/4 + log 1/2 + 0) / 3 = −log(2)
    assert lid_mod.lid_estimate(np.array([[1.0, 2.0, 4.0]]))[0] == pytest.approx(1 / np.log(2))


def test_empirical_pvalues_are_conformal():
    bg = np.arange(1, 10, dtype=float)[:, None]  # 1..9 at one node
    p = ss.empirical_pvalues(bg, np.array([[0.0], [5.0], [9.0], [100.0]]))
    assert p[:, 0] == pytest.approx([10 / 10, 6 / 10, 2 / 10, 1 / 10])


def test_scan_statistic_is_large_for_small_pvalues_and_small_for_uniform():
    rng = np.random.default_rng(0)
    uniform = rng.uniform(size=(1, 2000))
    anomalous = uniform.copy()
    anomalous[0, :200] = 1e-3  # a subset of 200 nodes far in the tail
    ratio = {s: ss.scan_statistic(anomalous, s)[0] / ss.scan_statistic(uniform, s)[0] for s in ss.SCORING}
    # every statistic rises; HC and BJ (built for sparse signals) far more than KS
    assert ratio["higher_criticism"] > 3 and ratio["berk_jones"] > 1.5 and ratio["kolmogorov_smirnov"] > 1.0
    # Berk-Jones of exactly those 200 nodes at α = 1e-3: 200·log(1000)
    assert ss.scan_statistic(anomalous, "berk_jones")[0] >= 200 * np.log(1000) - 1e-6


# ---------------------------------------------------------------- detectors on a tiny model
@pytest.fixture
def setup(data_root, fake_debian_fmnist):
    trained = models.train_or_load("smallcnn", "fashion_mnist", models.TrainConfig(epochs=2, batch_size=32), "cpu")
    train, test = data.load("fashion_mnist", "train"), data.load("fashion_mnist", "test")
    return trained, train, test


@pytest.mark.parametrize("name", UNSUPERVISED)
def test_every_unsupervised_detector_separates_noise_and_not_identical_sets(setup, name):
    trained, train, test = setup
    from tamperbench.detectors import ood

    params = {"particul": {"epochs": 2}, "subset_scan": {"n_background": 200},
              "knn": {"n_fit": 300, "k": 5}, "vim": {"n_fit": 300, "d": 16}}.get(name, {})
    if name in ood.NAMES:
        params.setdefault("n_fit", 300)
    det = detector(name, device="cpu", **params).fit(trained, train)
    clean = det.score(test.x)
    assert clean.shape == (len(test),) and np.isfinite(clean).all()
    noise = det.score(data.load("noise_uniform", "test").x[:100])
    # squeezing and feature responses target adversarial perturbations, not OOD inputs
    floor = 0.75 if name in ("feature_squeezing", "feature_response") else 0.9
    assert metrics.detection_metrics(clean, noise)["auroc"] > floor, name
    half = len(test) // 2
    same = metrics.detection_metrics(clean[:half], det.score(test.x[:half]))["auroc"]
    assert same == pytest.approx(0.5, abs=0.02)  # identical inputs are indistinguishable


def test_feature_squeezing_ignores_what_squeezing_leaves_unchanged(setup):
    trained, train, test = setup
    det = detector("feature_squeezing", device="cpu").fit(trained, train)
    binary_flat = torch.cat([torch.zeros(2, 1, 28, 28), torch.ones(2, 1, 28, 28)])
    assert np.allclose(det.score(binary_flat), 0.0)  # 1-bit depth and the median change nothing
    assert (det.score(test.x[:20] * 0.5 + 0.25) >= 0).all()


@pytest.mark.parametrize("name", ["lid", "kd_bu", "mahalanobis_adv"])
def test_supervised_detectors_learn_from_examples(setup, name):
    trained, train, test = setup
    shifted = (test.x + 0.3 * torch.rand(test.x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    det = detector(name, device="cpu").fit(trained, train, x_clean=test.x[:50], x_adv=shifted[:50])
    assert det.supervised
    m = metrics.detection_metrics(det.score(test.x[50:]), det.score(shifted[50:]))
    assert m["auroc"] > 0.9
    with pytest.raises(DetectorError, match="supervised"):
        detector(name, device="cpu").fit(trained, train)


def test_subset_scan_agrees_with_art(setup):
    """Our scan and ART's SubsetScanningDetector rank the same images as anomalous."""
    from art.defences.detector.evasion import SubsetScanningDetector
    from scipy.stats import spearmanr

    from tamperbench import attacks

    trained, train, test = setup
    bg = train.take(200, 0).x
    clean = test.x[:40]
    noisy = (test.x[40:80] + 0.4 * torch.rand(40, 1, 28, 28, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    ours = detector("subset_scan", layer="block1", n_background=200, device="cpu").fit(trained, train.take(200, 0))
    clf = attacks.wrap(trained.model, (1, 28, 28), 10, "cpu")
    state = np.random.get_state()
    art = SubsetScanningDetector(clf, bgd_data=bg.numpy(), layer="block1", verbose=False)
    art_clean, art_noisy, art_power = art.scan(clean.numpy(), noisy.numpy())
    np.random.set_state(state)  # ART reseeds the global RNG from the OS
    our_clean, our_noisy = ours.score(clean), ours.score(noisy)
    our_power = metrics.detection_metrics(our_clean, our_noisy)["auroc"]
    assert our_power == pytest.approx(art_power, abs=0.05)
    rho = spearmanr(np.r_[our_clean, our_noisy], np.r_[art_clean, art_noisy]).statistic
    assert rho > 0.8


def test_registry_and_interface_errors(setup):
    trained, train, test = setup
    with pytest.raises(DetectorError, match="unknown detector 'mahalanobis'; valid detectors: particul, particul_multi, msp"):
        detector("mahalanobis")
    with pytest.raises(DetectorError, match="before score"):
        detector("msp").score(test.x)
    with pytest.raises(DetectorError, match="unknown layer 'conv9'"):
        detector("subset_scan", layer="conv9", device="cpu").fit(trained, train)
    det = detector("ebo", device="cpu").fit(trained, train)
    with pytest.raises(DetectorError, match="empty"):
        det.score(test.x[:0])
    with pytest.raises(DetectorError, match="empty training set"):
        detector("ebo", device="cpu").fit(trained, train.take(0))
    with pytest.raises(DetectorError, match="feature_squeezing: bit_depth"):
        detector("feature_squeezing", bit_depth=0)
