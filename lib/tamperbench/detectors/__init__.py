"""Detectors of tampered and out-of-distribution inputs, behind one interface.

    det = detector("particul", epochs=30).fit(trained, clean_train)
    scores = det.score(x)  # higher = more suspicious

One short module per method, the paper and its maths in its docstring.
"""

from __future__ import annotations

from functools import partial

from . import ood
from .base import Detector, DetectorError, unknown_parameters
from .combined import Combined
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
    "combined": Combined,
}
#: detectors that need adversarial examples to fit
SUPERVISED = ("lid", "kd_bu", "mahalanobis_adv")


def available() -> list[str]:
    return list(DETECTORS)


def _init_parameters(cls: type) -> list[str]:
    """The keyword parameters of ``cls``'s constructor, following ``**kw`` up the base classes."""
    import inspect

    names: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        sig = inspect.signature(vars(klass)["__init__"]).parameters.values()
        names += [p.name for p in sig if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
                  and p.name not in names]
        if not any(p.kind == p.VAR_KEYWORD for p in sig) or klass is Detector:
            break
    return names


def parameters(name: str) -> list[str]:
    """Every keyword parameter ``detector(name, ...)`` accepts."""
    if name not in DETECTORS:
        raise DetectorError(f"unknown detector {name!r}; valid detectors: {', '.join(available())}")
    if name in ood.NAMES:
        return ood.method_parameters(name)
    names = _init_parameters(DETECTORS[name])
    if name == "particul_multi":  # the rest are the single-layer detector's, per layer
        names += [n for n in _init_parameters(Particul) if n not in names and n != "layer"]
    return names


def check_parameters(name: str, params: dict) -> None:
    """Refuse, before any work, parameters that ``detector(name, ...)`` does not accept: one
    error naming each unknown key (and a close valid one) and listing the valid parameters."""
    if not isinstance(params, dict):
        raise DetectorError(f"{name}: parameters must be a mapping of name to value, got {params!r}")
    valid = parameters(name)
    unknown = [k for k in params if k not in valid]
    if unknown:
        raise DetectorError(unknown_parameters(name, unknown, valid))


def detector(name: str, **params) -> Detector:
    """A new, unfitted detector ``name`` configured with ``params`` (unknown keys are refused
    with the valid ones listed; values are checked by each detector's constructor)."""
    check_parameters(name, params)
    try:
        return DETECTORS[name](**params)
    except TypeError as exc:  # an unknown keyword
        raise DetectorError(f"{name}: {exc}") from exc
