import numpy as np
import pytest
import torch

from tamperbench import perturbations as P


@pytest.fixture
def images():
    return torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("sweep", P.CODE_SWEEPS, ids=lambda s: s.name)
def test_every_sweep_keeps_shape_and_range_and_is_deterministic(images, sweep):
    stacked = P.sweep_images(images, sweep, seed=3)
    assert stacked.shape == (len(sweep.magnitudes) * len(images), 1, 28, 28)
    assert float(stacked.min()) >= 0.0 and float(stacked.max()) <= 1.0
    assert torch.equal(stacked, P.sweep_images(images, sweep, seed=3))


def test_the_identity_magnitudes_change_nothing(images):
    assert torch.equal(P.perturb(images, "noise", 0.0), images)
    assert torch.equal(P.perturb(images, "blur", 0.0), images)
    assert torch.equal(P.perturb(images, "brightness", 1.0), images)
    assert torch.allclose(P.perturb(images, "rotation", 360.0), images, atol=1e-6)


def test_perturbations_grow_with_their_magnitude(images):
    for kind, small, large in (("noise", 0.1, 0.8), ("blur", 0.3, 5.0), ("rotation", 10.0, 90.0)):
        d_small = (P.perturb(images, kind, small) - images).abs().mean()
        d_large = (P.perturb(images, kind, large) - images).abs().mean()
        assert d_large > d_small > 0, kind
    assert float(P.perturb(images, "brightness", 0.2).mean()) == pytest.approx(0.2 * float(images.mean()), rel=1e-5)


def test_noise_depends_on_the_seed_only(images):
    assert torch.equal(P.perturb(images, "noise", 0.3, seed=1), P.perturb(images, "noise", 0.3, seed=1))
    assert not torch.equal(P.perturb(images, "noise", 0.3, seed=1), P.perturb(images, "noise", 0.3, seed=2))


def test_bad_perturbations_name_the_valid_choices(images):
    with pytest.raises(P.PerturbationError, match="unknown perturbation 'fog'; valid perturbations: noise, blur"):
        P.perturb(images, "fog", 1.0)
    with pytest.raises(P.PerturbationError, match="≥ 0"):
        P.perturb(images, "blur", -1.0)
    with pytest.raises(P.PerturbationError, match="finite number"):
        P.perturb(images, "noise", "0.3")
    with pytest.raises(P.PerturbationError, match="≥ 3 magnitudes"):
        P.Sweep("short", "noise", (0.0, 0.1), "falls")


@pytest.mark.parametrize("confidence, expected, flagged", [
    ([4, 3, 2, 1, 0], "falls", False),       # falls as it should
    ([0, 1, 2, 3, 4], "falls", True),        # rises instead
    ([0, 1, 2, 3, 4], "rises", False),
    ([4, 3, 2, 1, 0], "rises", True),
    ([1, 0, 1, 0, 1], "falls", True),        # no trend: |ρ| ≤ 0.3
    ([2, 2, 2, 2, 2], "rises", True),        # constant: ρ undefined, moves neither way
])
def test_spearman_flagging(confidence, expected, flagged):
    rho, is_flagged = P.spearman_flag([0, 1, 2, 3, 4], confidence, expected)
    assert is_flagged is flagged
    assert np.isnan(rho) or -1 <= rho <= 1


def test_a_correlation_equal_to_the_threshold_is_flagged():
    mags, conf = list(range(10)), list(range(10))  # ρ = 1 exactly
    assert P.spearman_flag(mags, conf, "rises", threshold=0.99)[1] is False
    assert P.spearman_flag(mags, conf, "rises", threshold=1.0)[1] is True  # must pass it, not reach it


def test_mean_confidence_is_minus_the_mean_score_per_magnitude():
    sweep = P.Sweep("noise", "noise", (0.0, 0.5, 1.0), "falls")
    scores = np.array([1, 3, 5, 7, 10, 20], dtype=float)  # two images per magnitude
    assert P.mean_confidence(scores, sweep).tolist() == [-2.0, -6.0, -15.0]
    with pytest.raises(P.PerturbationError, match="do not split"):
        P.mean_confidence(scores[:5], sweep)
