r"""Adaptive attacks: an attacker who knows the classifier, the detector and its threshold.

Every number of chapters 3–5 comes from attacks that ignore the detector. An attacker who knows
it wants inputs that are **misclassified and accepted** (detector score :math:`s(x) \le \tau`).
This module holds what such attacks need, in torch:

- :func:`threshold_at_fpr`: the detector's threshold τ, set on held-out clean scores;
- :func:`detector_aware_pgd`: L∞ PGD on the classifier loss and the detector score, in three
  variants (Bryniarski et al., "Evading Adversarial Example Detection Defenses with Orthogonal
  Projected Gradient Descent", ICLR 2022). With :math:`g_c = \nabla_x \mathrm{CE}(f(x), y)` and
  :math:`g_d = -\nabla_x s(x)`:

  - *naive*: step along :math:`g_c + \lambda g_d`;
  - *selective*: along :math:`g_c` until the input is misclassified, then along :math:`g_d`;
  - *orthogonal*: as selective, with each gradient projected orthogonally to the other,
    :math:`g_c^\perp = g_c - \frac{g_c \cdot g_d}{\lVert g_d \rVert^2} g_d` (and symmetrically),
    so that a step for one goal does not undo the other.

  Each step is :math:`\alpha\,\mathrm{sign}(g)`, projected onto the ε-ball and [0, 1]; per input,
  the attack keeps the misclassified iterate with the **lowest detector score**.
- :class:`Composite`: the detector as an extra class (Carlini & Wagner, AISec 2017): logits
  :math:`(z_1, \dots, z_K, \max_j z_j + \beta (s(x) - \tau))`, whose argmax is the extra class
  exactly when :math:`s(x) > \tau`;
- the metrics at threshold τ: the detector's TPR on the successful adaptive examples, the attack
  success rate, and robust accuracy with detection (the share of inputs still classified
  correctly *or* rejected), with the worst case over several attacks per input.

A detector gives its differentiable score through ``Detector.torch_score``; a detector that has
none (a non-differentiable one) needs a surrogate, and the attack says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

MODES = ("naive", "selective", "orthogonal")


class AdaptiveError(ValueError):
    """A bad attack setting: an unknown mode, a budget out of range, mismatched inputs."""


def threshold_at_fpr(clean_scores: np.ndarray, fpr: float = 0.05) -> float:
    """τ such that at most a share ``fpr`` of the held-out clean scores lies above it."""
    if not 0 < fpr < 1:
        raise AdaptiveError(f"fpr must be in (0, 1), got {fpr!r}")
    clean = np.sort(np.asarray(clean_scores, dtype=np.float64))
    if len(clean) == 0 or not np.isfinite(clean).all():
        raise AdaptiveError("the clean scores must be finite and not empty")
    allowed = int(np.floor(fpr * len(clean)))  # clean scores allowed strictly above τ
    return float(clean[len(clean) - allowed - 1])


def orthogonal_to(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Each sample of ``a`` minus its projection on the same sample of ``b`` (flattened)."""
    fa, fb = a.flatten(1), b.flatten(1)
    coef = (fa * fb).sum(1, keepdim=True) / fb.pow(2).sum(1, keepdim=True).clamp_min(1e-20)
    return (fa - coef * fb).view_as(a)


def _gradients(model: nn.Module, score: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor):
    """(classifier-loss gradient, minus the score's gradient, logits, scores), per sample."""
    x = x.detach().requires_grad_(True)
    logits = model(x)
    g_c = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), x)[0]
    x2 = x.detach().requires_grad_(True)
    s = score(x2)
    g_d = -torch.autograd.grad(s.sum(), x2)[0]
    return g_c, g_d, logits.detach(), s.detach()


@dataclass
class AdaptiveResult:
    """The kept iterate per input, with its score and whether it was ever misclassified."""

    x_adv: torch.Tensor
    scores: torch.Tensor
    misclassified: torch.Tensor
    iterations: int


def detector_aware_pgd(model: nn.Module, score: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                       y: torch.Tensor, eps: float, steps: int = 50, step_size: float | None = None,
                       mode: str = "orthogonal", lam: float = 1.0, seed: int = 0,
                       random_start: bool = True) -> AdaptiveResult:
    """L∞ PGD against the classifier and the detector together (see the module docstring).

    ``score(x)`` is the detector's differentiable suspicion score (N,). Returns, per input, the
    misclassified iterate with the lowest score, or the last iterate when none was misclassified.
    """
    if mode not in MODES:
        raise AdaptiveError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
    if not 0 < eps <= 1:
        raise AdaptiveError(f"eps must be in (0, 1] (images in [0, 1]), got {eps!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise AdaptiveError(f"steps must be an int ≥ 1, got {steps!r}")
    alpha = step_size if step_size is not None else 2.5 * eps / steps  # Madry et al.'s rule of thumb
    model.eval()
    x0, y = x.detach().float(), y.long()
    if random_start:
        gen = torch.Generator().manual_seed(seed)
        start = (torch.rand(x0.shape, generator=gen) * 2 - 1).to(x0.device) * eps
        x_cur = (x0 + start).clamp(0, 1)
    else:
        x_cur = x0.clone()
    best_x, best_s = x_cur.clone(), torch.full((len(x0),), float("inf"), device=x0.device)
    ever = torch.zeros(len(x0), dtype=torch.bool, device=x0.device)
    for _ in range(steps):
        g_c, g_d, logits, s = _gradients(model, score, x_cur, y)
        wrong = logits.argmax(1) != y
        improved = wrong & (s < best_s)
        best_x[improved], best_s[improved] = x_cur[improved], s[improved]
        ever |= wrong
        if mode == "naive":
            g = g_c + lam * g_d
        else:
            if mode == "orthogonal":
                g_c, g_d = orthogonal_to(g_c, g_d), orthogonal_to(g_d, g_c)
            g = torch.where(wrong.view(-1, *[1] * (x0.dim() - 1)), g_d, g_c)
        x_cur = torch.min(torch.max(x_cur + alpha * g.sign(), x0 - eps), x0 + eps).clamp(0, 1).detach()
    with torch.no_grad():  # the last iterate counts too
        logits, s = model(x_cur), score(x_cur)
    wrong = logits.argmax(1) != y
    improved = wrong & (s < best_s)
    best_x[improved], best_s[improved] = x_cur[improved], s[improved]
    ever |= wrong
    never = ~ever
    best_x[never], best_s[never] = x_cur[never], s[never]
    return AdaptiveResult(best_x, best_s, ever, steps)


class Composite(nn.Module):
    """The classifier with the detector as a (K+1)-th class (Carlini & Wagner 2017).

    Logit K+1 is :math:`\\max_j z_j + \\beta (s(x) - \\tau)`: it wins exactly when
    :math:`s(x) > \\tau` (a tie goes to the classifier's classes, as ``argmax`` takes the first
    maximum). Attacking the composite towards a wrong class among the first K asks for an input
    that is misclassified and accepted.
    """

    def __init__(self, model: nn.Module, score: Callable[[torch.Tensor], torch.Tensor], tau: float, beta: float = 1.0):
        super().__init__()
        if beta <= 0:
            raise AdaptiveError(f"beta must be > 0, got {beta!r}")
        self.model, self.score, self.tau, self.beta = model, score, float(tau), float(beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.model(x)
        reject = z.max(1).values + self.beta * (self.score(x) - self.tau)
        return torch.cat([z, reject[:, None]], 1)


# --------------------------------------------------------------------------- metrics
def adaptive_metrics(correct_clean: np.ndarray, accepted_clean: np.ndarray, correct_adv: np.ndarray,
                     accepted_adv: np.ndarray) -> dict[str, float]:
    """The chapter's metrics at one threshold, from per-input booleans before and after the attack.

    - ``tpr``: among inputs the attack made misclassified, the share the detector rejects;
    - ``attack_success_rate``: among inputs correct and accepted when clean, the share that are
      misclassified and accepted after the attack;
    - ``robust_accuracy_with_detection``: the share of all inputs still classified correctly, or
      rejected, after the attack.
    """
    arrays = [np.asarray(a, dtype=bool) for a in (correct_clean, accepted_clean, correct_adv, accepted_adv)]
    if len({len(a) for a in arrays}) != 1 or len(arrays[0]) == 0:
        raise AdaptiveError(f"the four arrays must have one equal, non-zero length, got {[len(a) for a in arrays]}")
    cc, ac, ca, aa = arrays
    fooled = ~ca
    eligible = cc & ac
    return {
        "tpr": float((fooled & ~aa).sum() / fooled.sum()) if fooled.any() else float("nan"),
        "attack_success_rate": float((eligible & ~ca & aa).sum() / eligible.sum()) if eligible.any() else float("nan"),
        "robust_accuracy_with_detection": float((ca | ~aa).mean()),
        "n": len(cc), "n_eligible": int(eligible.sum()),
    }


def worst_case(outcomes: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Per input, the worst of several attacks: (correct, accepted) of the attack that fooled
    it undetected, if any did; else of the first attack. An input counts as robust only if it
    is robust to every attack."""
    if not outcomes:
        raise AdaptiveError("need at least one attack's outcome")
    correct = np.asarray(outcomes[0][0], dtype=bool).copy()
    accepted = np.asarray(outcomes[0][1], dtype=bool).copy()
    for c, a in outcomes[1:]:
        c, a = np.asarray(c, dtype=bool), np.asarray(a, dtype=bool)
        broken = ~c & a
        correct[broken], accepted[broken] = False, True
    return correct, accepted


def eps_at_half(eps: np.ndarray, robust: np.ndarray, clean_robust: float) -> float:
    """ε₅₀: the budget at which robust accuracy with detection falls to half its clean value,
    interpolated linearly between the measured budgets (NaN if it never gets there)."""
    eps, robust = np.asarray(eps, dtype=np.float64), np.asarray(robust, dtype=np.float64)
    order = np.argsort(eps)
    eps, robust = np.r_[0.0, eps[order]], np.r_[clean_robust, robust[order]]
    half = clean_robust / 2
    below = np.flatnonzero(robust <= half)
    if len(below) == 0:
        return float("nan")
    i = below[0]
    if i == 0:
        return 0.0
    e0, e1, r0, r1 = eps[i - 1], eps[i], robust[i - 1], robust[i]
    return float(e0 + (r0 - half) / (r0 - r1) * (e1 - e0)) if r0 != r1 else float(e1)
