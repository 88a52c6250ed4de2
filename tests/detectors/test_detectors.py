import numpy as np
import pytest
import torch

from tamperbench import data, metrics, models
from tamperbench.detectors import DetectorError, available, detector
from tamperbench.detectors import feature_response as fr
from tamperbench.detectors import lid as lid_mod
from tamperbench.detectors import subset_scan as ss

UNSUPERVISED = [n for n in available() if n not in ("lid", "kd_bu", "mahalanobis_adv", "combined")]  # combined: tests/detectors/test_combined.py


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


def test_empirical_pvalues_count_each_node_against_its_own_background():
    """Many nodes at once (one search over shifted blocks) equals counting node by node, ties
    and values outside the background's range included."""
    rng = np.random.default_rng(0)
    bg = rng.integers(-3, 4, size=(7, 5)).astype(float)  # small integers: many ties
    act = rng.integers(-5, 6, size=(6, 5)).astype(float)
    m = len(bg)
    at_least = (bg[None, :, :] >= act[:, None, :]).sum(1)  # images × nodes
    at_most = (bg[None, :, :] <= act[:, None, :]).sum(1)
    upper = (1 + at_least) / (m + 1)
    assert np.array_equal(ss.empirical_pvalues(bg, act, "upper"), upper)
    assert np.array_equal(ss.empirical_pvalues(bg, act, "two"), np.minimum(1, 2 * np.minimum(upper, (1 + at_most) / (m + 1))))
    # float32 activations below the background's minimum: the shift must not round ties away
    bg32 = rng.random((50, 40)).astype(np.float32) + 1.0
    act32 = np.concatenate([bg32[:5] * 1.0, np.full((1, 40), -3.0, np.float32)])  # exact ties, and one far below
    at_least32 = (bg32[None].astype(np.float64) >= act32[:, None].astype(np.float64)).sum(1)
    assert np.array_equal(ss.empirical_pvalues(bg32, act32), (1 + at_least32) / (len(bg32) + 1))


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
    again = det.score(test.x[:half])  # the same images in another batch size
    # identical inputs get the same score whatever their batch, so they cannot be told apart;
    # exact equality would depend on the machine's summation order, and a rank-based statistic
    # (subset scanning's p-values) may move a few of them by one rank. (An AUROC of the two
    # would not do: saturated, tied scores that differ by one ulp push it far from 0.5.)
    assert np.isclose(clean[:half], again, rtol=1e-4, atol=1e-5).mean() >= 0.95, name


def test_feature_squeezing_ignores_what_squeezing_leaves_unchanged(setup):
    trained, train, test = setup
    det = detector("feature_squeezing", bit_depth=1, median_window=2, device="cpu").fit(trained, train)
    binary_flat = torch.cat([torch.zeros(2, 1, 28, 28), torch.ones(2, 1, 28, 28)])
    assert np.allclose(det.score(binary_flat), 0.0)  # 1-bit depth and the median change nothing
    assert (det.score(test.x[:20] * 0.5 + 0.25) >= 0).all()


@pytest.mark.parametrize("name", ["lid", "kd_bu", "mahalanobis_adv"])
def test_supervised_detectors_learn_from_examples(setup, name):
    trained, train, test = setup
    shifted = test.x.clone()
    shifted[:, :, 2:12, 2:12] = 1.0  # a structured change, unlike the Gaussian noise of the noisy negatives
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


@pytest.mark.parametrize("name", available())
def test_a_parameter_typo_is_refused_at_construction_with_the_valid_ones(name):
    from tamperbench.detectors import parameters

    valid = parameters(name)
    with pytest.raises(DetectorError, match=rf"^{name}: unknown parameter 'seeed' \(did you mean 'seed'\?\); "
                                            rf"valid parameters: {', '.join(valid)}$"):
        detector(name, seeed=1)


def test_listed_parameters_are_the_ones_the_libraries_take(setup):
    """Every parameter ``parameters`` lists for a pytorch-ood method reaches its constructor
    without a TypeError (its own default passed explicitly), and real values are kept."""
    import inspect

    import pytorch_ood.detector as pod
    from sklearn.neighbors import NearestNeighbors

    from tamperbench.detectors import ood

    trained, _, _ = setup
    parts = ood.Parts(trained, torch.device("cpu"))
    for method in ood.NAMES:
        defaults = {n: p.default for n, p in inspect.signature(getattr(pod, ood._CLASSES[method]).__init__).parameters.items()}
        defaults.update({n: p.default for n, p in inspect.signature(NearestNeighbors.__init__).parameters.items()}
                        if method == "knn" else {})
        given = {n: defaults[n] for n in ood.method_parameters(method) if defaults.get(n, inspect.Parameter.empty) is not inspect.Parameter.empty}
        ood._builders()[method][0](parts, **given)  # a TypeError here means the list is wrong
        assert detector(method, **given).params == given
    knn = detector("knn", k=3, metric="manhattan", device="cpu").fit(trained, setup[1].take(100))
    assert knn.ood.k == 3 and knn.ood.knn.metric == "manhattan"


# ---------------------------------------------------------------- issue 11: as the authors ran them
def _entropy_bits(values) -> float:
    _, counts = np.unique(np.asarray(values), return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def test_feature_response_entropy_matches_hand_computed_patches():
    grey = np.array([[0, 0, 255, 7],
                     [0, 128, 255, 7],
                     [9, 9, 9, 7]], dtype=np.uint8)
    # every pixel's 3×3 patch, cut at the border (pixels outside the image are not counted)
    expected = np.mean([_entropy_bits(grey[max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2])
                        for i in range(grey.shape[0]) for j in range(grey.shape[1])])
    assert fr.mean_local_entropy(grey[None]) == pytest.approx([expected], abs=1e-6)
    # the centre patch holds 9 pixels of 5 levels: 0,0,255 / 0,128,255 / 9,9,9
    # the centre patch holds 0 ×3, 255 ×2, 128 ×1, 9 ×3 (the reference helper, checked by hand)
    centre = _entropy_bits([0, 0, 255, 0, 128, 255, 9, 9, 9])
    assert centre == pytest.approx(-(2 * (1 / 3) * np.log2(1 / 3) + (2 / 9) * np.log2(2 / 9) + (1 / 9) * np.log2(1 / 9)))
    assert fr.mean_local_entropy(np.zeros((1, 5, 5), np.uint8)) == pytest.approx([0.0])


def test_feature_response_maps_the_signed_response_to_8_bit_grey():
    r = torch.tensor([[[0.0, 1.0, -1.0, 5.0, -5.0, 20.0]]])
    r = (r - r.mean()) / r.std()  # already standard: the mapping reads ±5 σ as 0 and 255
    grey = fr.grey_levels(r)
    z = r.double().numpy()
    assert grey.dtype == np.uint8
    assert np.array_equal(grey, np.round(255 * np.clip(0.5 + 0.1 * z, 0, 1)).astype(np.uint8))
    assert grey[0, 0, 2] < grey[0, 0, 0] < grey[0, 0, 1]  # the sign is kept: −1 < 0 < 1 survive in order
    spike = torch.zeros(1, 10, 10)
    spike[0, 0, 0] = 100.0  # ≈ 10 standard deviations: beyond +5 σ, white
    assert fr.grey_levels(spike)[0, 0, 0] == 255 and fr.grey_levels(-spike)[0, 0, 0] == 0
    assert np.array_equal(fr.grey_levels(torch.ones(1, 3, 3)), np.full((1, 3, 3), 128, np.uint8))  # flat → mid-grey


def test_guided_backprop_refuses_functional_relus(setup):
    trained, train, _ = setup
    import copy

    class FunctionalBlock(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return torch.nn.functional.relu(self.inner(x))

    tampered = copy.deepcopy(trained)
    tampered.model.block2 = FunctionalBlock(tampered.model.block2)
    with pytest.raises(DetectorError, match="applies ReLU as a function.*nn.ReLU modules"):
        detector("feature_response", device="cpu").fit(tampered, train)
    assert fr.functional_relus(trained.model) == []
    resnet = models.ResNet18_32(in_channels=1, num_classes=10, image_size=28)
    assert fr.functional_relus(resnet) == []  # its blocks now use ReLU modules
    assert sum(isinstance(m, torch.nn.ReLU) for m in resnet.modules()) == 17
    resnet.load_state_dict(models.ResNet18_32(in_channels=1, num_classes=10, image_size=28).state_dict())  # same keys


def test_two_tailed_pvalues_count_both_tails():
    bg = np.array([[1.0], [2.0], [3.0], [4.0]])  # M = 4 at one node
    act = np.array([[0.5], [2.5], [5.0], [4.0]])
    upper = ss.empirical_pvalues(bg, act, "upper")[:, 0]
    two = ss.empirical_pvalues(bg, act, "two")[:, 0]
    assert upper == pytest.approx([5 / 5, 3 / 5, 1 / 5, 2 / 5])
    # lower tail (1 + #{b ≤ a}) / 5: 1/5, 3/5, 5/5, 5/5; two-tailed = min(1, 2·min)
    assert two == pytest.approx([2 / 5, 1.0, 2 / 5, 4 / 5])
    with pytest.raises(DetectorError, match="valid: upper, two"):
        ss.empirical_pvalues(bg, act, "lower")


def test_squeezer_selection_picks_the_best_set_on_the_data_it_is_given(setup):
    trained, _, test = setup
    from tamperbench.detectors import feature_squeezing as fs

    clean = test.x[:40].numpy()
    rng = np.random.default_rng(0)
    adv = np.clip(clean + rng.choice([-0.15, 0.15], clean.shape), 0, 1).astype(np.float32)  # salt-and-pepper-like
    chosen, rows = fs.select_squeezers(trained, clean, adv, "cpu", bit_depths=(1, 3, 5), median_windows=(2, 3))
    assert len(rows) == 3 + 2 + 3 * 2  # singles and pairs
    best = max(r["auroc"] for r in rows)
    picked = [r for r in rows if r["chosen"]]
    assert len(picked) == 1 and picked[0]["auroc"] == best
    assert chosen == {"bit_depth": picked[0]["bit_depth"], "median_window": picked[0]["median_window"]}
    # a pair's score is the joint detector's: the maximum of its squeezers' distances
    det = detector("feature_squeezing", device="cpu", bit_depth=3, median_window=2).fit(trained, data.load("fashion_mnist", "train"))
    singles = det.single_scores(torch.from_numpy(adv[:10]))
    assert set(singles) == {"bit_depth=3", "median_window=2"}
    assert np.allclose(det.score(torch.from_numpy(adv[:10])), np.max(list(singles.values()), axis=0))
    pair = next(r for r in rows if r["bit_depth"] == 3 and r["median_window"] == 2)
    joint = metrics.detection_metrics(det.score(torch.from_numpy(clean)), det.score(torch.from_numpy(adv)))["auroc"]
    # the same detector on the same images, scored in other batches: one flipped near-tie of
    # the 40×40 pairs moves a rank statistic by 1/1600
    assert pair["auroc"] == pytest.approx(joint, abs=1 / (len(clean) * len(adv)))
    with pytest.raises(DetectorError, match="enable at least one"):
        detector("feature_squeezing", bit_depth=None, median_window=None)
    with pytest.raises(DetectorError, match="window-patch-strength"):
        detector("feature_squeezing", nl_means="13x3")


def test_noisy_negatives_match_the_perturbation_norm():
    from tamperbench.detectors.base import noisy_copies

    clean = np.full((5, 1, 8, 8), 0.5, np.float32)
    adv = clean.copy()
    adv[:, :, 0, :3] += np.array([0.1, 0.2, 0.3, 0.05, 0.0])[:, None, None]  # L2 norms differ per image
    noisy = noisy_copies(clean, adv, seed=0)
    want = np.linalg.norm((adv - clean).reshape(5, -1), axis=1)
    got = np.linalg.norm((noisy - clean).reshape(5, -1), axis=1)
    assert got == pytest.approx(want, abs=1e-5)  # no clipping at these sizes
    assert np.array_equal(noisy, noisy_copies(clean, adv, seed=0))


def test_kd_bandwidth_is_chosen_on_held_out_clean_data():
    from tamperbench.detectors import kd_bu

    rng = np.random.default_rng(0)
    z = rng.normal(size=(900, 2))
    y = np.zeros(900, int)
    best, scores = kd_bu.choose_bandwidth(z[:600], y[:600], z[600:], y[600:])
    assert scores[best] == max(scores.values())
    assert best in (0.2, 0.5)  # near Silverman's rule for 600 points of a unit Gaussian (≈ 0.29)


@pytest.mark.parametrize("name", ["kd_bu", "lid", "mahalanobis_adv", "particul", "feature_response", "subset_scan"])
def test_fitting_and_scoring_leave_the_global_random_state_alone(setup, name):
    trained, train, test = setup
    torch.manual_seed(123)
    np.random.seed(123)
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    params = {"particul": {"epochs": 1}, "subset_scan": {"n_background": 100}}.get(name, {})
    det = detector(name, device="cpu", **params)
    if det.supervised:
        det.fit(trained, train, x_clean=test.x[:30], x_adv=test.x[30:60].flip(-1))
    else:
        det.fit(trained, train)
    det.score(test.x[:20])
    assert torch.equal(torch.get_rng_state(), torch_state), name
    assert np.array_equal(np.random.get_state()[1], np_state), name


DIFFERENTIABLE = ["particul", "msp", "odin", "mds", "rmds", "ebo", "mls", "gen", "react", "ash", "knn", "vim", "she"]


@pytest.mark.parametrize("name", DIFFERENTIABLE)
def test_differentiable_scores_match_the_scores_and_carry_gradients(setup, name):
    """What adaptive attacks differentiate is the detector's own score, with a usable gradient."""
    trained, train, test = setup
    params = {"particul": {"epochs": 1}, "knn": {"k": 5}, "vim": {"d": 16}}.get(name, {})
    if name != "particul":
        params["n_fit"] = 300
    det = detector(name, device="cpu", **params).fit(trained, train)
    x = test.x[:16].clone().requires_grad_(True)
    s = det.torch_score(x)
    assert np.allclose(s.detach().numpy(), det.score(test.x[:16]), rtol=1e-4, atol=1e-5)
    (grad,) = torch.autograd.grad(s.sum(), x)
    assert torch.isfinite(grad).all() and float(grad.abs().sum()) > 0


@pytest.mark.parametrize("name", ["subset_scan", "feature_squeezing", "feature_response"])
def test_detectors_without_a_useful_gradient_say_so(setup, name):
    trained, train, _ = setup
    params = {"subset_scan": {"n_background": 100}}.get(name, {})
    det = detector(name, device="cpu", **params).fit(trained, train)
    with pytest.raises(DetectorError, match="no differentiable score"):
        det.torch_score(torch.rand(2, 1, 28, 28))


@pytest.mark.parametrize("name", ["lid", "mahalanobis_adv"])
def test_supervised_detectors_differentiate_their_own_score(setup, name):
    """LID against its fixed reference batch; Mahalanobis through its per-layer Gaussians."""
    trained, train, test = setup
    shifted = test.x.clone()
    shifted[:, :, 2:12, 2:12] = 1.0
    det = detector(name, device="cpu").fit(trained, train, x_clean=test.x[:50], x_adv=shifted[:50])
    x = shifted[50:66].clone().requires_grad_(True)
    s = det.torch_score(x)
    assert np.allclose(s.detach().numpy(), det.score(shifted[50:66]), rtol=1e-4, atol=1e-4)
    (grad,) = torch.autograd.grad(s.sum(), x)
    assert torch.isfinite(grad).all() and float(grad.abs().sum()) > 0


def test_kd_bu_differentiates_its_own_score(setup):
    trained, train, test = setup
    shifted = test.x.clone()
    shifted[:, :, 2:12, 2:12] = 1.0
    det = detector("kd_bu", device="cpu", mc_samples=5).fit(trained, train, x_clean=test.x[:50], x_adv=shifted[:50])
    x = shifted[50:66].clone().requires_grad_(True)
    s = det.torch_score(x)
    assert np.allclose(s.detach().numpy(), det.score(shifted[50:66]), rtol=1e-3, atol=1e-3)
    (grad,) = torch.autograd.grad(s.sum(), x)
    assert torch.isfinite(grad).all() and float(grad.abs().sum()) > 0
