"""Batches come from outside: every detector refuses what it cannot judge, with one clear error."""

import numpy as np
import pytest
import torch

from tamperbench.detectors import DETECTORS, Detector, DetectorError, available, detector
from tamperbench.detectors.base import invalid_samples


def _bad_batches():
    x = torch.rand(6, 1, 28, 28)
    nan, inf, big, neg = x.clone(), x.clone(), x.clone(), x.clone()
    nan[2, 0, 3, 3] = float("nan")
    inf[4, 0, 0, 0] = float("inf")
    big[1, 0, 5, 5] = 1.5
    neg[3, 0, 5, 5] = -0.2
    return {"nan": (nan, [2], "non-finite"), "inf": (inf, [4], "non-finite"),
            "above": (big, [1], r"outside \[0, 1\]"), "below": (neg, [3], r"outside \[0, 1\]")}


def test_no_detector_bypasses_the_base_class_check():
    for name, factory in DETECTORS.items():
        cls = factory.func if hasattr(factory, "func") else factory
        assert cls.score is Detector.score, f"{name} overrides score() and may skip the input check"


@pytest.mark.parametrize("name", available())
@pytest.mark.parametrize("case", ["nan", "inf", "above", "below"])
def test_every_detector_refuses_bad_samples_by_name(name, case, monkeypatch):
    det = detector(name)
    det.trained = type("T", (), {"input_shape": (1, 28, 28)})()  # fitted as far as score() can tell
    called = []
    monkeypatch.setattr(det, "_score", lambda x: called.append(len(x)) or np.zeros(len(x)))
    x, bad, message = _bad_batches()[case]
    with pytest.raises(DetectorError, match=rf"{name}: 1 of 6 samples cannot be scored: .*{message}.*sample\(s\) \[{bad[0]}\]"):
        det.score(x)
    assert not called  # refused before the model saw anything
    scores = det.score(x, invalid="suspicious")
    assert np.isinf(scores[bad]).all() and np.isfinite(np.delete(scores, bad)).all()
    assert called == [5]  # only the good samples reached the model


def test_unknown_invalid_policy_is_refused():
    det = detector("msp")
    det.trained = type("T", (), {"input_shape": (1, 28, 28)})()
    with pytest.raises(DetectorError, match="unknown invalid='ignore'; valid: raise, suspicious"):
        det.score(torch.rand(2, 1, 28, 28), invalid="ignore")


def test_invalid_samples_on_clean_input_is_all_false():
    assert not invalid_samples(torch.rand(4, 1, 28, 28)).any()
    assert invalid_samples(np.array([[[[0.0, 1.0]]], [[[1.0 + 1e-6, 0.5]]]])).tolist() == [False, True]
