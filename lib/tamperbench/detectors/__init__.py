"""Detectors of tampered and out-of-distribution inputs, behind one interface.

    det = detector("particul", epochs=30).fit(trained, clean_train)
    scores = det.score(x)  # higher = more suspicious

One short module per method, the paper and its maths in its docstring.
"""

from __future__ import annotations

from functools import partial

from . import ood
from .base import Detector, DetectorError
from .feature_response import FeatureResponse
from .feature_squeezing import FeatureSqueezing
from .kd_bu import KDBU
from .lid import LID
from .mahalanobis_adv import MahalanobisAdv
from .ood import PytorchOOD
from .particul import Particul
from .particul_multi import ParticulMultiLayer
from .subset_scan import SubsetScan

#: name → factory of an unfitted detector
DETECTORS = {
    "particul": Particul,
    "particul_multi": ParticulMultiLayer,
    **{m: partial(PytorchOOD, m) for m in ood.NAMES},
    "subset_scan": SubsetScan,
    "feature_squeezing": FeatureSqueezing,
    "feature_response": FeatureResponse,
    "lid": LID,
    "kd_bu": KDBU,
    "mahalanobis_adv": MahalanobisAdv,
}
#: detectors that need adversarial examples to fit
SUPERVISED = ("lid", "kd_bu", "mahalanobis_adv")


def available() -> list[str]:
    return list(DETECTORS)


def detector(name: str, **params) -> Detector:
    """A new, unfitted detector ``name`` configured with ``params``."""
    if name not in DETECTORS:
        raise DetectorError(f"unknown detector {name!r}; valid detectors: {', '.join(available())}")
    try:
        return DETECTORS[name](**params)
    except TypeError as exc:  # an unknown keyword
        raise DetectorError(f"{name}: {exc}") from exc
