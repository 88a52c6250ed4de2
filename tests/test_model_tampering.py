import numpy as np
import pytest
import torch
from scipy.stats import binom

from tamperbench import model_tampering as mt


@pytest.fixture
def small(data_root, fake_debian_fmnist):
    from tamperbench import data, models

    trained = models.train_or_load("smallcnn", "fashion_mnist", models.TrainConfig(epochs=1, batch_size=32), "cpu")
    return trained, data.load("fashion_mnist", "train"), data.load("fashion_mnist", "test")


@pytest.mark.parametrize("size", [100, 20, 37])
def test_the_threshold_keeps_false_acceptance_at_the_level(size):
    theta = mt.verification_threshold(size, 0.05)
    assert binom.cdf(theta, size, 0.5) <= 0.05 < binom.cdf(theta + 1, size, 0.5)
    if size == 100:
        assert theta == 41  # P(m ≤ 41) = 0.044; 42 would give 0.067


def test_a_key_too_short_for_the_level_accepts_nothing():
    assert mt.verification_threshold(4, 0.05) == -1  # even 0 mismatches happens with probability 1/16
    with pytest.raises(mt.TamperingError, match="level must be in"):
        mt.verification_threshold(100, 1.5)


def test_an_untouched_model_never_raises_an_alarm(small):
    trained, _, test = small
    for strategy in mt.MARKERS:
        markers = mt.select_markers(strategy, trained, test, 30, seed=1, eps=0.05)
        assert len(markers) == 30
        assert mt.queries_to_detect(mt.cpu_copy(trained.model), markers) is None, strategy
    rows = mt.detection_rows({("none", "copy"): [mt.cpu_copy(trained.model)] * 2},
                             {"boundary": [mt.select_markers("boundary", trained, test, 10)]}, budget=10)
    assert rows[0]["detection_rate"] == 0.0 and rows[0]["queries_to_detect"] == np.inf


def test_boundary_markers_are_the_closest_to_the_boundary(small):
    trained, _, test = small
    markers = mt.select_markers("boundary", trained, test, 10)
    gaps = mt.logit_gaps(trained.model, markers.x)
    # queried smallest gap first; the gaps are recomputed in other batch sizes, so float32
    # summation order may move them by a few ulps of the largest gap
    tol = 1e-5 * max(1.0, float(np.abs(gaps).max()))
    assert (np.diff(gaps) >= -tol).all()
    assert gaps.max() <= np.sort(mt.logit_gaps(trained.model, test.x))[9] + tol


def test_every_tampering_changes_the_weights_and_leaves_the_original_alone(small):
    trained, train, test = small
    before = {k: v.clone() for k, v in trained.model.state_dict().items()}
    key = mt.build_key(trained, test, eps=0.3, size=10, seed=0)
    for kind, strength in (("finetune", 5), ("quantize", "int8"), ("prune", 0.2), ("trojan", 5), ("watermark", 20)):
        tampered = mt.tamper(kind, trained.model, strength, train, seed=0, key=key)
        changed = mt.changed_weights(trained.model, tampered)
        assert changed > 0, kind
        if kind == "prune":
            assert changed == pytest.approx(0.2, abs=0.01)
    after = trained.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_changed_label_is_found_at_its_position(small):
    trained, _, test = small
    markers = mt.select_markers("random", trained, test, 8, seed=0)
    flipped = mt.Markers("random", markers.x, markers.labels.copy())
    flipped.labels[3] = (flipped.labels[3] + 1) % 10  # as if the model now answered otherwise there
    assert mt.queries_to_detect(mt.cpu_copy(trained.model), flipped) == 4
    rows = mt.detection_rows({("x", 1): [mt.cpu_copy(trained.model)]}, {"random": [flipped]}, budget=3)
    assert rows[0]["queries_to_detect"] == 4 and rows[0]["detection_rate"] == 0.0


def test_the_watermark_is_learned_and_verified(small):
    trained, train, test = small
    key = mt.build_key(trained, test, eps=0.3, size=10, seed=0)
    assert key.true_adversary.sum() == 5 and len(key) == 10
    marked, steps = mt.embed_watermark(trained.model, train, key, max_steps=300, seed=0)
    got = mt.verify(marked, key, level=0.05)
    assert got["mismatches"] == 0 and got["accepted"] and steps < 300
    assert mt.verify(trained.model, key, 0.05)["mismatches"] >= 5  # the true adversaries fool the original


def test_bad_settings_name_the_valid_choices(small):
    trained, train, test = small
    with pytest.raises(mt.TamperingError, match="unknown marker strategy 'edge'; valid: boundary, adversarial, random"):
        mt.select_markers("edge", trained, test, 5)
    with pytest.raises(mt.TamperingError, match="unknown tampering 'melt'; valid: finetune, quantize, prune, trojan, watermark"):
        mt.tamper("melt", trained.model, 1, train)
    with pytest.raises(mt.TamperingError, match=r"amount must be a share in \(0, 1\)"):
        mt.prune(trained.model, 1.5)
    with pytest.raises(mt.TamperingError, match="n must be an int"):
        mt.select_markers("random", trained, test, 0)
    with pytest.raises(mt.TamperingError, match="size must be an even int"):
        mt.build_key(trained, test, eps=0.1, size=7)
