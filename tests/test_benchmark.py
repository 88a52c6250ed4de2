import numpy as np
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
