import numpy as np
import pytest
import torch

from tamperbench import benchmark, cache
from tamperbench.attacks import AttackRecord


def _record(n, success):
    z = np.zeros(n, dtype=np.float32)
    x = np.random.default_rng(n).random((n, 1, 2, 2), dtype=np.float32)
    y = np.zeros(n, dtype=np.int64)
    return AttackRecord("fgsm", {}, x, x, y, y, y, y - 1, success, z, z, y, 1.0, 0.0, 1.0, 1e-4)


def test_halves_are_disjoint_successful_and_shared_across_attacks():
    a = _record(100, np.ones(100, dtype=bool))
    b = _record(60, np.arange(60) % 3 > 0)  # a shorter prefix of the pool, some failures
    fit_a, ev_a = benchmark.split_halves(a, seed=0)
    fit_b, ev_b = benchmark.split_halves(b, seed=0)
    assert not set(fit_a) & set(ev_a) and len(fit_a) + len(ev_a) == 100
    assert b.success[fit_b].all() and b.success[ev_b].all()
    # the same pool image is on the same side for every attack: no clean image leaks
    assert set(fit_b) <= set(fit_a) and set(ev_b) <= set(ev_a)
    assert 30 < len(fit_a) < 70


class _Counting:
    def __init__(self):
        self.calls = 0

    def score(self, x):
        self.calls += 1
        return x.flatten(1).sum(1).numpy()


def test_scores_are_cached_by_detector_inputs_and_code(data_root, monkeypatch):
    det, x = _Counting(), np.random.default_rng(0).random((5, 1, 2, 2), dtype=np.float32)
    key = {"detector": "demo", "params": {"k": 1}, "model": "m"}
    first = benchmark.cached_scores(det, key, x)
    assert np.array_equal(first, benchmark.cached_scores(det, key, torch.from_numpy(x))) and det.calls == 1
    benchmark.cached_scores(det, {**key, "params": {"k": 2}}, x)
    assert det.calls == 2
    monkeypatch.setattr(cache, "source_digest", lambda: "changed-code")
    benchmark.cached_scores(det, key, x)
    assert det.calls == 3  # a code change never serves stale scores


def _attacked(n, seed=0):
    """A record whose adversarial images differ from their clean originals, every attack successful."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, 1, 2, 2), dtype=np.float32)
    z, y = np.zeros(n, dtype=np.float32), np.zeros(n, dtype=np.int64)
    return AttackRecord("fgsm", {}, x, x + 1, y, y, y + 1, y - 1, np.ones(n, dtype=bool), z, z, y, 1.0, 0.0, 1.0, 1e-4)


def _spy_on_select(monkeypatch):
    from tamperbench import detectors

    seen = []

    def select(trained, x_clean, x_adv, device="auto"):
        seen.append((np.asarray(x_clean), np.asarray(x_adv)))
        return {"bit_depth": 1, "median_window": None}, []

    monkeypatch.setattr(detectors.feature_squeezing, "select_squeezers", select)
    return seen


def test_squeezers_are_chosen_on_exactly_the_fit_half(monkeypatch):
    seen = _spy_on_select(monkeypatch)
    rec = _attacked(40)
    fit, ev = benchmark.split_halves(rec, seed=3)
    assert len(fit) >= 2 and len(ev) >= 2
    benchmark.study_squeezers(None, {"fgsm": rec}, "fgsm", 3, {})
    (x_clean, x_adv), = seen
    assert np.array_equal(x_clean, rec.x_clean[fit]) and np.array_equal(x_adv, rec.x_adv[fit])
    benchmark.study_squeezers(None, {"fgsm": rec}, "fgsm", 3, {}, indices=fit[:5])  # part of the fit half is fine
    assert np.array_equal(seen[-1][1], rec.x_adv[fit[:5]])


def test_squeezer_choice_refuses_evaluation_half_indices(monkeypatch):
    from tamperbench.detectors import DetectorError

    seen = _spy_on_select(monkeypatch)
    rec = _attacked(40)
    fit, ev = benchmark.split_halves(rec, seed=3)
    leak = np.append(fit[:4], ev[0])
    with pytest.raises(DetectorError, match=rf"1 of the 5 indices lie in the evaluation half of fgsm \(seed 3\), e.g. \[{ev[0]}\]"):
        benchmark.study_squeezers(None, {"fgsm": rec}, "fgsm", 3, {}, indices=leak)
    rec.success[fit[0]] = False  # a failed attack is not an adversarial example to choose on
    fit_now, _ = benchmark.split_halves(rec, seed=3)
    with pytest.raises(DetectorError, match=rf"indices \[{fit[0]}\] are not fit-half adversarial examples"):
        benchmark.study_squeezers(None, {"fgsm": rec}, "fgsm", 3, {}, indices=fit[:3])
    with pytest.raises(DetectorError, match="need ≥ 2 distinct"):
        benchmark.study_squeezers(None, {"fgsm": rec}, "fgsm", 3, {}, indices=fit_now[[0, 0]])
    assert seen == []  # nothing reached the selection
