import numpy as np
import pytest

from tamperbench import batch, benchmark, combination
from tamperbench.attacks import AttackRecord
from tamperbench.detectors import DetectorError


def _fit_half(rng, clean_shift: dict, n=300, n_cal=1000):
    """Synthetic member scores: clean ~ N(0, 1); each attack's adversarial ~ N(shift, 1)."""
    return combination.FitHalf(rng.normal(size=n_cal),
                               {a: (rng.normal(size=n), rng.normal(shift, 1, size=n)) for a, shift in clean_shift.items()})


def test_the_rules_pick_the_complementary_pair_and_two_tails_only_where_the_fit_half_says_so():
    rng = np.random.default_rng(0)
    scores = {
        "sees_fgsm": _fit_half(rng, {"fgsm": 4.0, "deepfool": 0.0}),
        "sees_deepfool": _fit_half(rng, {"fgsm": -3.0, "deepfool": 4.0}),  # fgsm makes it *less* suspicious
        "blind": _fit_half(rng, {"fgsm": 0.0, "deepfool": 0.0}),
    }
    cfg = {**combination.DEFAULTS, "members": ["sees_fgsm", "blind"], "candidates": list(scores), "sizes": [2]}
    choice = combination.choose(scores, cfg, ["fgsm", "deepfool"], ["fgsm", "deepfool"])
    assert choice.tails == {"sees_fgsm": "upper", "sees_deepfool": "two", "blind": "upper"}
    assert choice.best_by_size[2] == ("sees_fgsm", "sees_deepfool") == choice.best
    best = choice.selection.iloc[0]
    assert best.worst_fit_auroc > 0.95 and best.chosen == "best"
    # upper-tailed, the fgsm examples would hide the second member: the two-tailed rule is what finds them
    one_tail = {**choice.tails, "sees_deepfool": "upper"}
    assert (combination.fit_half_auroc(scores, ("sees_fgsm", "sees_deepfool"), one_tail, "fisher", "fgsm")
            < combination.fit_half_auroc(scores, ("sees_fgsm", "sees_deepfool"), choice.tails, "fisher", "fgsm"))


def _record(n=80):
    x = np.random.default_rng(1).random((n, 1, 2, 2), dtype=np.float32)
    y, z = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.float32)
    return AttackRecord("fgsm", {}, x, x + 0.01, y, y, y, y - 1, np.ones(n, dtype=bool), z, z, y, 1.0, 0.0, 1.0, 1e-4)


class _Sum:
    def score(self, x):
        return np.asarray(x).reshape(len(x), -1).sum(1)


class _Pool:
    def __init__(self, x):
        self.x = x


def test_the_choice_refuses_evaluation_half_indices(data_root):
    rec = _record()
    fit, ev = benchmark.split_halves(rec, seed=2)
    args = (_Sum(), {"detector": "sum"}, _Pool(rec.x_clean), {"fgsm": rec}, ["fgsm"], 2, rec.x_clean[:5])
    ok = combination.fit_half_scores(*args)
    assert len(ok.attacks["fgsm"][1]) == len(fit)
    with pytest.raises(DetectorError, match=r"combination choice: 1 of the 4 indices lie in the evaluation half of fgsm"):
        combination.fit_half_scores(*args, indices={"fgsm": np.append(fit[:3], ev[0])})


def test_settings_name_what_is_wrong_and_the_valid_choices():
    with pytest.raises(combination.CombinationError, match="unknown setting"):
        combination.settings({"member": ["msp"]})
    with pytest.raises(combination.CombinationError, match=r"members \['lid'\] are not unsupervised detectors; valid: particul"):
        combination.settings({"members": ["msp", "lid"]})
    with pytest.raises(combination.CombinationError, match="valid methods: fisher, cauchy, bonferroni"):
        combination.settings({"method": "stouffer"})
    assert combination.settings(None)["members"] == ["particul", "msp"]


def test_the_combination_population_is_set_apart_first_and_disjoint():
    pool = np.arange(0, 1000, 7)
    old = batch.held_out_split(1000, pool, 300, seed=0)
    assert len(old.combination) == 0  # without it, the populations are as before
    h = batch.held_out_split(1000, pool, 300, seed=0, n_combination=100)
    parts = [set(h.combination), set(h.calibration), set(h.clean), set(pool)]
    assert sum(map(len, parts)) == len(set().union(*parts)) == 1000
    assert np.array_equal(batch.held_out_split(1000, pool, 50, seed=0, n_combination=100).combination, h.combination)
    with pytest.raises(batch.BatchError, match="leaves no clean batch population"):
        batch.held_out_split(1000, pool, 700, n_combination=200)
