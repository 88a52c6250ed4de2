"""Natural perturbations of clean images, and the CODE perturbation benchmark.

CODE (Xu-Darme et al., SAFECOMP 2023 workshops, arXiv:2311.12855) asks whether a detector's
confidence that an image is in distribution moves the right way as the image is degraded. For
each perturbation it sweeps a magnitude over the in-distribution test images, takes the mean
confidence at each magnitude, and computes the Spearman rank correlation :math:`\\rho` between
magnitude and mean confidence. A good confidence **falls** as noise, blur and rotation towards
180° grow (:math:`\\rho < -0.3`) and **rises** as brightness returns to 1 and rotation returns
to 360° (:math:`\\rho > 0.3`); a sweep that misses its direction is *flagged*.

The perturbations follow the authors' benchmark code:

- ``noise``: :math:`x + m \\cdot (\\max x - \\min x)\\, \\varepsilon`, :math:`\\varepsilon \\sim
  N(0, 1)` per pixel; one seeded draw of :math:`\\varepsilon` serves every magnitude, so the
  sweep varies only the magnitude. Clipped to [0, 1] here, since the detectors refuse values
  outside the image range (the authors normalised afterwards instead);
- ``blur``: a Gaussian blur with a 3×3 kernel and standard deviation :math:`\\sigma = m` (the
  authors' kernel size; with it, large :math:`\\sigma` tends to a 3×3 box blur);
- ``rotation``: a rotation by :math:`m` degrees, nearest-neighbour, black fill;
- ``brightness``: :math:`\\min(1, m\\,x)`, torchvision's brightness factor.

A detector's confidence is minus its suspicion score (every detector here scores higher = more
suspicious), so :math:`\\rho` of the confidence is minus :math:`\\rho` of the score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

#: perturbation name → what its magnitude means
KINDS = {
    "noise": "Gaussian noise, standard deviation as a fraction of the image's range",
    "blur": "Gaussian blur (3×3 kernel), σ in pixels",
    "rotation": "rotation, degrees",
    "brightness": "brightness factor (1 = unchanged)",
}

#: the CODE benchmark's threshold: ρ must pass it in the expected direction
SPEARMAN_THRESHOLD = 0.3


class PerturbationError(ValueError):
    """An unknown perturbation, or a magnitude outside its range."""


def available() -> list[str]:
    return list(KINDS)


def _check(kind: str, magnitude: float) -> float:
    if kind not in KINDS:
        raise PerturbationError(f"unknown perturbation {kind!r}; valid perturbations: {', '.join(KINDS)}")
    if isinstance(magnitude, bool) or not isinstance(magnitude, (int, float)) or not np.isfinite(magnitude):
        raise PerturbationError(f"{kind}: magnitude must be a finite number, got {magnitude!r}")
    if kind in ("noise", "blur", "brightness") and magnitude < 0:
        raise PerturbationError(f"{kind}: magnitude must be ≥ 0, got {magnitude!r}")
    return float(magnitude)


def perturb(x: torch.Tensor, kind: str, magnitude: float, seed: int = 0) -> torch.Tensor:
    """``x`` (N×C×H×W in [0, 1]) perturbed by ``kind`` at ``magnitude``; the result stays in [0, 1].

    Deterministic: the noise comes from a generator seeded with ``seed`` alone, so the same
    images and seed give the same perturbed images at every magnitude's own scale.
    """
    import torchvision.transforms.functional as TF

    m = _check(kind, magnitude)
    x = torch.as_tensor(x, dtype=torch.float32)
    if kind == "noise":
        if m == 0:
            return x.clone()
        eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
        span = (x.amax(dim=(1, 2, 3), keepdim=True) - x.amin(dim=(1, 2, 3), keepdim=True))
        return (x + m * span * eps).clamp(0, 1)
    if kind == "blur":
        return x.clone() if m == 0 else TF.gaussian_blur(x, kernel_size=[3, 3], sigma=[m, m]).clamp(0, 1)
    if kind == "rotation":
        return TF.rotate(x, m, interpolation=TF.InterpolationMode.NEAREST, fill=0.0)
    return (x * m).clamp(0, 1)  # brightness


@dataclass(frozen=True)
class Sweep:
    """One CODE sweep: a perturbation, its magnitudes, and the direction a good confidence takes."""

    name: str
    kind: str
    magnitudes: tuple[float, ...]
    expected: str  # "falls" or "rises" as the magnitude grows

    def __post_init__(self):
        for m in self.magnitudes:
            _check(self.kind, m)
        if self.expected not in ("falls", "rises"):
            raise PerturbationError(f"{self.name}: expected must be 'falls' or 'rises', got {self.expected!r}")
        if len(self.magnitudes) < 3:
            raise PerturbationError(f"{self.name}: a Spearman correlation needs ≥ 3 magnitudes, got {len(self.magnitudes)}")


#: the CODE benchmark's sweeps, at the magnitudes of its published protocol
CODE_SWEEPS = (
    Sweep("noise", "noise", tuple(round(0.1 * i, 1) for i in range(11)), "falls"),
    Sweep("blur", "blur", (0.0, 0.1, 0.3, 0.5, 0.7, 1.0, 2.0, 5.0, 10.0), "falls"),
    Sweep("rotation_0_180", "rotation", tuple(float(a) for a in range(0, 181, 20)), "falls"),
    Sweep("rotation_180_360", "rotation", tuple(float(a) for a in range(180, 361, 20)), "rises"),
    Sweep("brightness", "brightness", tuple(round(0.1 * i, 1) for i in range(1, 11)), "rises"),
)


def spearman_flag(magnitudes, mean_confidence, expected: str, threshold: float = SPEARMAN_THRESHOLD) -> tuple[float, bool]:
    """(Spearman ρ between magnitude and mean confidence, whether the sweep is flagged).

    Flagged: a confidence that should fall does not reach ρ < −threshold, or one that should rise
    does not reach ρ > threshold. A constant confidence (ρ undefined) moves neither way: flagged.
    """
    from scipy.stats import spearmanr

    if expected not in ("falls", "rises"):
        raise PerturbationError(f"expected must be 'falls' or 'rises', got {expected!r}")
    conf = np.asarray(mean_confidence, dtype=np.float64)
    if len(conf) != len(magnitudes) or len(conf) < 3:
        raise PerturbationError(f"need ≥ 3 (magnitude, confidence) pairs, got {len(magnitudes)} and {len(conf)}")
    if np.ptp(conf) == 0:
        return float("nan"), True
    rho = float(spearmanr(magnitudes, conf).statistic)
    return rho, bool(rho >= -threshold if expected == "falls" else rho <= threshold)


def sweep_images(x: torch.Tensor, sweep: Sweep, seed: int = 0) -> torch.Tensor:
    """Every magnitude's perturbed copy of ``x``, stacked magnitude after magnitude (one array to
    score, and to cache, per sweep)."""
    return torch.cat([perturb(x, sweep.kind, m, seed) for m in sweep.magnitudes])


def mean_confidence(scores: np.ndarray, sweep: Sweep) -> np.ndarray:
    """Mean confidence (minus the mean suspicion score) at each magnitude, from the scores of
    :func:`sweep_images`."""
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) % len(sweep.magnitudes):
        raise PerturbationError(f"{len(scores)} scores do not split into {len(sweep.magnitudes)} magnitudes")
    return -scores.reshape(len(sweep.magnitudes), -1).mean(axis=1)
