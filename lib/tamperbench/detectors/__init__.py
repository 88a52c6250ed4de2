"""Detectors of tampered and out-of-distribution inputs, behind one interface.

    det = detector("particul", epochs=30).fit(trained, clean_train)
    scores = det.score(x)  # higher = more suspicious

One short module per method, the paper and its maths in its docstring.
"""

from __future__ import annotations

from .base import Detector, DetectorError
from .particul import Particul

DETECTORS: dict[str, type[Detector]] = {cls.name: cls for cls in (Particul,)}


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
