import numpy as np
import pytest

from tamperbench.attacks import AttackRecord
from tamperbench.tampering import tamper


def _record(n=50, succeed_every=2):
    rng = np.random.default_rng(0)
    x = rng.random((n, 1, 4, 4), dtype=np.float32)
    adv = np.clip(x + 0.1, 0, 1).astype(np.float32)
    y = np.arange(n) % 3
    success = np.arange(n) % succeed_every == 0
    z = np.zeros(n, dtype=np.float32)
    return AttackRecord("fgsm", {"eps": 0.1}, x, adv, y, y.copy(), np.where(success, (y + 1) % 3, y), np.full(n, -1),
                        success, z, z, z.astype(np.int64), 1.0, 1.0, 1.0, 1e-4, key="k")


@pytest.mark.parametrize("p", [0.0, 0.1, 0.3, 0.5])
def test_fraction_and_mask_strict(p):
    rec = _record()
    t = tamper(rec, p, seed=1, policy="strict")
    assert t.mask.sum() == round(p * len(rec))
    assert np.array_equal(t.x[t.mask], rec.x_adv[t.mask]) and np.array_equal(t.x[~t.mask], rec.x_clean[~t.mask])
    assert rec.success[t.mask].all() and np.array_equal(t.fooled, t.mask)  # strict: only successes
    assert t.provenance["tampered_indices"] == np.flatnonzero(t.mask).tolist()


def test_p_zero_is_the_clean_set_and_p_one_realistic_is_all_adversarial():
    rec = _record()
    assert np.array_equal(tamper(rec, 0, seed=0).x, rec.x_clean)
    full = tamper(rec, 1.0, seed=0, policy="realistic")
    assert full.mask.all() and np.array_equal(full.x, rec.x_adv)
    assert full.fooled.sum() == rec.success.sum()  # failures kept, but not counted as fooling


def test_strict_needs_enough_successes():
    with pytest.raises(ValueError, match="needs 50 successful attacks.*succeeded on 25"):
        tamper(_record(), 1.0, policy="strict")


def test_deterministic_per_seed():
    rec = _record()
    a, b, c = tamper(rec, 0.2, seed=5), tamper(rec, 0.2, seed=5), tamper(rec, 0.2, seed=6)
    assert np.array_equal(a.mask, b.mask) and np.array_equal(a.x, b.x)
    assert not np.array_equal(a.mask, c.mask)


@pytest.mark.parametrize("p, message", [(-0.1, "in \\[0, 1\\]"), (1.2, "in \\[0, 1\\]"), ("half", "number")])
def test_bad_fraction_or_policy(p, message):
    with pytest.raises(ValueError, match=message):
        tamper(_record(), p)
    with pytest.raises(ValueError, match="valid policies: strict, realistic"):
        tamper(_record(), 0.1, policy="lenient")
