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


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters live (the CPU for a model without any)."""
    return next(iter(model.parameters()), torch.zeros(0)).device


def _check_restarts(restarts) -> None:
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        raise AdaptiveError(f"restarts must be an int ≥ 1, got {restarts!r}")


def restart_seed(seed: int, restart: int) -> int:
    """The seed of restart ``restart`` (0 is the first run): far apart, so that no two restarts
    or targets of one attack share a random start."""
    return int(seed) + 7919 * int(restart)


def _gradients(model: nn.Module, score: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor):
    """(classifier-loss gradient, minus the score's gradient, logits, scores), per sample."""
    x = x.detach().requires_grad_(True)
    logits = model(x)
    g_c = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), x)[0]
    if score is None:  # a detector-blind attack
        return g_c, torch.zeros_like(g_c), logits.detach(), torch.zeros(len(x), device=x.device)
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


def detector_aware_pgd(model: nn.Module, score: Callable[[torch.Tensor], torch.Tensor] | None, x: torch.Tensor,
                       y: torch.Tensor, eps: float, steps: int = 50, step_size: float | None = None,
                       mode: str = "orthogonal", lam: float = 1.0, seed: int = 0, random_start: bool = True,
                       tau: float | None = None, start: torch.Tensor | None = None) -> AdaptiveResult:
    """L∞ PGD against the classifier and the detector together (see the module docstring).

    ``score(x)`` is the detector's differentiable suspicion score (N,); ``None`` gives plain PGD on
    the classifier alone (the non-adaptive baseline). Returns, per input, the misclassified
    iterate with the lowest score, or the last iterate when none was misclassified.

    ``tau``: an input is done once it is misclassified with a score ≤ τ (the attacker's goal at
    that threshold); later steps skip it, which is where most of the cost goes otherwise.
    ``start``: a starting point inside the ε-ball (e.g. the result at a smaller ε).
    """
    if mode not in MODES:
        raise AdaptiveError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps <= 1:
        raise AdaptiveError(f"eps must be in (0, 1] (images in [0, 1]), got {eps!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise AdaptiveError(f"steps must be an int ≥ 1, got {steps!r}")
    blind = score is None
    score_fn = (lambda v: torch.zeros(len(v), device=v.device)) if blind else score
    alpha = step_size if step_size is not None else 2.5 * eps / steps  # Madry et al.'s rule of thumb
    model.eval()
    dev = model_device(model)
    x0, y = x.detach().float().to(dev), y.long().to(dev)
    if start is not None:
        x_cur = torch.min(torch.max(start.detach().float().to(dev), x0 - eps), x0 + eps).clamp(0, 1)
    elif random_start:
        gen = torch.Generator().manual_seed(seed)
        x_cur = (x0 + (torch.rand(x0.shape, generator=gen) * 2 - 1).to(x0.device) * eps).clamp(0, 1)
    else:
        x_cur = x0.clone()
    best_x, best_s = x_cur.clone(), torch.full((len(x0),), float("inf"), device=x0.device)
    ever = torch.zeros(len(x0), dtype=torch.bool, device=x0.device)
    done = torch.zeros(len(x0), dtype=torch.bool, device=x0.device)
    expand = (-1,) + (1,) * (x0.dim() - 1)

    def keep(idx, xs, logits, s):
        nonlocal best_x, best_s
        wrong = logits.argmax(1) != y[idx]
        better = wrong & (s < best_s[idx])
        best_x[idx[better]], best_s[idx[better]] = xs[better], s[better]
        ever[idx[wrong]] = True
        if tau is not None:
            done[idx[wrong & (s <= tau)]] = True
        return wrong

    for _ in range(steps):
        idx = torch.nonzero(~done).squeeze(1)
        if len(idx) == 0:
            break
        xs = x_cur[idx]
        g_c, g_d, logits, s = _gradients(model, score, xs, y[idx])
        wrong = keep(idx, xs, logits, s)
        if blind:
            g = g_c
        elif mode == "naive":
            g = g_c + lam * g_d
        else:
            if mode == "orthogonal":
                g_c, g_d = orthogonal_to(g_c, g_d), orthogonal_to(g_d, g_c)
            g = torch.where(wrong.view(expand), g_d, g_c)
        stepped = xs + alpha * g.sign()
        x_cur[idx] = torch.min(torch.max(stepped, x0[idx] - eps), x0[idx] + eps).clamp(0, 1).detach()
    idx = torch.nonzero(~done).squeeze(1)
    if len(idx):
        with torch.no_grad():  # the last iterate counts too
            keep(idx, x_cur[idx], model(x_cur[idx]), score_fn(x_cur[idx]))
    never = ~ever
    best_x[never] = x_cur[never]
    with torch.no_grad():
        best_s[never] = score_fn(x_cur[never]) if never.any() else best_s[never]
    return AdaptiveResult(best_x.cpu(), best_s.cpu(), ever.cpu(), steps)


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


def composite_apgd(model: nn.Module, score: Callable[[torch.Tensor], torch.Tensor], tau: float, x: torch.Tensor,
                   y: torch.Tensor, eps: float, steps: int = 50, seed: int = 0, beta: float = 1.0,
                   batch_size: int = 128, targets: int | None = None, restarts: int = 1) -> np.ndarray:
    """Targeted APGD (ART's, cross-entropy on the K+1 outputs) on :class:`Composite`: misclassified
    *and* below the reject logit.

    Each wrong class is a target in turn, the most likely on the clean input first (``targets``:
    how many; None: all K − 1, as AutoAttack's APGD-T); a target is tried only on the inputs that
    no earlier target broke. ``restarts``: APGD's random restarts per target. Returns the
    adversarial images (for an input no target broke, the first target's result)."""
    from art.attacks.evasion import AutoProjectedGradientDescent

    from .attacks import contained_random_states, wrap

    dev = model_device(model)
    x_np = x.detach().cpu().numpy().astype(np.float32)
    y_np = np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y, dtype=np.int64)
    with torch.no_grad():
        logits = model(x.float().to(dev)).cpu()
    k = logits.shape[1]
    targets = k - 1 if targets is None else targets
    if isinstance(targets, bool) or not isinstance(targets, int) or not 1 <= targets <= k - 1:
        raise AdaptiveError(f"targets must be an int in [1, {k - 1}] (the wrong classes) or None for all, got {targets!r}")
    _check_restarts(restarts)
    logits[torch.arange(len(x)), torch.as_tensor(y_np)] = -float("inf")
    ranked = logits.argsort(1, descending=True)[:, :targets].numpy()  # the wrong classes, most likely first
    clf = wrap(Composite(model, score, tau, beta).eval(), tuple(x.shape[1:]), k + 1, dev.type)
    apgd = AutoProjectedGradientDescent(clf, norm=np.inf, eps=eps, eps_step=eps, max_iter=steps, targeted=True,
                                        nb_random_init=restarts, batch_size=batch_size, loss_type=None, verbose=False)
    x_adv, broken = x_np.copy(), np.zeros(len(x_np), dtype=bool)
    for t in range(targets):
        todo = np.flatnonzero(~broken)
        if len(todo) == 0:
            break
        with contained_random_states(restart_seed(seed, t)):
            got = apgd.generate(x_np[todo], y=np.eye(k + 1, dtype=np.float32)[ranked[todo, t]]).astype(np.float32)
        label = clf.predict(got).argmax(1)
        ok = (label != y_np[todo]) & (label != k)
        keep = np.ones(len(todo), dtype=bool) if t == 0 else ok
        x_adv[todo[keep]] = got[keep]
        broken[todo[ok]] = True
    return x_adv


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


# --------------------------------------------------------------------------- surrogates
class SoftSubsetScan(nn.Module):
    r"""A differentiable surrogate of per-image subset scanning (Berk–Jones, upper tail).

    The true scan counts background activations above each node's value (a step function) and
    maximises over thresholds (a max over a sort): its gradient is zero almost everywhere. The
    surrogate smooths both steps:

    - each node's empirical p-value from ``quantiles`` background quantiles and a sigmoid CDF,
      :math:`\tilde p_j = \frac{1 + M \cdot \frac1Q \sum_q \sigma((b_{q,j} - a_j)/T_j)}{M + 1}`,
      with :math:`T_j` a fraction ``softness`` of the node's background spread;
    - the count of p-values below α as a sigmoid in log space, on a fixed grid of α, and the max
      over the grid as a log-sum-exp.

    Higher is more suspicious, as the detector's own score; the test checks that the two rank
    images alike.
    """

    def __init__(self, detector, quantiles: int = 16, softness: float = 0.1, grid: int = 32, sharpness: float = 20.0):
        super().__init__()
        if detector.tails != "upper" or detector.scoring != "berk_jones":
            raise AdaptiveError("the surrogate covers the upper-tail Berk–Jones scan (the study's default)")
        bg = torch.as_tensor(detector.background, dtype=torch.float32)
        self.trunk, self.m = detector.trunk, bg.shape[0]
        probs = torch.linspace(0.5 / quantiles, 1 - 0.5 / quantiles, quantiles)
        self.register_buffer("q", torch.quantile(bg, probs, dim=0))  # Q×J
        spread = (bg.std(0) + 1e-3)
        self.register_buffer("temp", softness * spread)
        low = np.log(1.0 / (self.m + 1))
        self.register_buffer("log_alpha", torch.linspace(low, float(np.log(detector.alpha_max)), grid))
        self.sharpness = sharpness

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.trunk(x).flatten(1)  # N×J
        above = torch.sigmoid((self.q[None] - a[:, None]) / self.temp).mean(1)  # N×J: share of background above
        log_p = torch.log((1 + self.m * above) / (self.m + 1))
        counts = torch.sigmoid(self.sharpness * (self.log_alpha[None, :, None] - log_p[:, None, :])).sum(-1)  # N×G
        phi = counts * (-self.log_alpha)[None]
        return torch.logsumexp(phi, dim=1)


class BPDASqueezing(nn.Module):
    """Feature squeezing whose squeezers pass the gradient straight through (BPDA, Athalye et al.,
    ICML 2018): the forward pass is the detector's own score, the backward pass treats each
    squeezer as the identity, as ART's NumPy preprocessors do."""

    def __init__(self, detector):
        super().__init__()
        self.detector = detector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        det = self.detector
        p = det.model(x).softmax(1)
        distances = []
        for squeeze in det.squeezers.values():
            squeezed = torch.from_numpy(squeeze(x.detach().cpu().numpy()).astype(np.float32)).to(x.device)
            through = x + (squeezed - x).detach()  # value: the squeezed image; gradient: the identity
            distances.append((p - det.model(through).softmax(1)).abs().sum(1))
        return torch.stack(distances).max(0).values


class _GuidedSoftplus(torch.autograd.Function):
    """Softplus forward; guided backward (only positive gradients pass), written in differentiable
    operations so that the response it produces can itself be differentiated."""

    @staticmethod
    def forward(ctx, x, beta):
        ctx.save_for_backward(x)
        ctx.beta = beta
        return F.softplus(x, beta=beta)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad.clamp(min=0) * torch.sigmoid(ctx.beta * x), None


class _GuidedSoftplusModule(nn.Module):
    def __init__(self, beta: float):
        super().__init__()
        self.beta = beta

    def forward(self, x):
        return _GuidedSoftplus.apply(x, self.beta)


class FeatureResponseSurrogate(nn.Module):
    r"""A differentiable stand-in for the feature-response entropy (double backpropagation).

    The detector's score has no useful gradient: a ReLU network's guided-backprop response is
    piecewise constant in :math:`x`, and the grey levels are rounded and counted. The surrogate
    replaces each ReLU by a softplus of sharpness ``beta`` whose backward pass is still guided (the
    smoothing of Dombrowski et al., "Explanations can be manipulated", NeurIPS 2019), keeps the
    response's graph (``create_graph``), maps it to grey levels without rounding, and counts each
    3×3 window's levels with a Gaussian kernel of ``bandwidth`` grey levels. The value returned is
    the detector's **own** score; only the gradient comes from the surrogate (BPDA's
    straight-through form, Athalye et al. 2018).
    """

    def __init__(self, detector, beta: float = 10.0, bandwidth: float = 2.0, levels: int = 256):
        super().__init__()
        if detector.mapping != "published":
            raise AdaptiveError("the surrogate covers the published grey-level mapping (the study's default)")
        import copy

        self.detector, self.bandwidth, self.window = detector, float(bandwidth), detector.window
        smooth = copy.deepcopy(detector.model).eval()
        for name, module in list(smooth.named_modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, nn.ReLU):
                    setattr(module, child_name, _GuidedSoftplusModule(beta))
        for p in smooth.parameters():
            p.requires_grad_(False)
        self.smooth = smooth
        self.register_buffer("levels", torch.arange(levels, dtype=torch.float32))

    def soft_entropy(self, x: torch.Tensor) -> torch.Tensor:
        """The smoothed mean local entropy (bits), differentiable in ``x``."""
        with torch.no_grad():
            target = self.detector.model(x).argmax(1)
        xg = x if x.requires_grad else x.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = self.smooth(xg)
            (response,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), xg, create_graph=True)
        r = response.sum(1)
        flat = r.flatten(1)
        z = (r - flat.mean(1).view(-1, 1, 1)) / flat.std(1).clamp_min(1e-12).view(-1, 1, 1)
        grey = 255 * (0.5 + 0.1 * z).clamp(0, 1)  # N×H×W, not rounded
        weight = torch.exp(-0.5 * ((grey[:, None] - self.levels.view(1, -1, 1, 1)) / self.bandwidth) ** 2)
        weight = weight / weight.sum(1, keepdim=True).clamp_min(1e-12)  # a soft one-hot over the levels
        hist = F.avg_pool2d(weight, self.window, stride=1, padding=self.window // 2, count_include_pad=False)
        entropy = -(hist * torch.log2(hist.clamp_min(1e-12))).sum(1)
        return entropy.flatten(1).mean(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        soft = self.soft_entropy(x)
        true = torch.as_tensor(self.detector.score(x.detach()), dtype=soft.dtype, device=soft.device)
        return true + (soft - soft.detach())


def attack_score(detector) -> Callable[[torch.Tensor], torch.Tensor]:
    """What an adaptive attacker differentiates for ``detector``: its own differentiable score, or
    the surrogate this module gives it (subset scanning: :class:`SoftSubsetScan`; feature
    squeezing: :class:`BPDASqueezing`; feature response: :class:`FeatureResponseSurrogate`; a
    combined detector: its smoothed formula over each member's own gradient or surrogate). A
    detector with neither is left to the gradient-free check."""
    from .detectors.base import DetectorError

    name = getattr(detector, "name", "")
    if name == "combined":
        # the exact score's value, the smoothed combination's gradient (through each member's own
        # gradient or surrogate): the attack stops and keeps iterates by the score it is judged on
        members = [attack_score(m) for m in detector.members]
        exact = detector.without_cache()

        def combined_score(x: torch.Tensor) -> torch.Tensor:
            soft = detector.torch_score(x, member_scores=members)
            true = torch.as_tensor(exact.score(x.detach()), dtype=soft.dtype, device=soft.device)
            return true + (soft - soft.detach())

        return combined_score
    if name == "subset_scan":
        return SoftSubsetScan(detector).to(detector.device)
    if name == "feature_squeezing":
        return BPDASqueezing(detector)
    if name == "feature_response":
        return FeatureResponseSurrogate(detector).to(detector.device)
    try:
        probe = torch.rand(1, *detector.trained.input_shape, device=detector.device, requires_grad=True)
        detector.torch_score(probe)
    except DetectorError as exc:
        raise AdaptiveError(f"{name or detector}: no gradient and no surrogate here ({exc}); use gradient_free_check") from None
    return detector.torch_score


def remembered(score: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``score`` with a per-image memory (no gradient). ART's Square scores the same images up to
    three times per iteration (the success check over every input, then the loss before and after
    the step); the memory scores each distinct image once."""
    import hashlib

    memory: dict[bytes, float] = {}

    def score_once(v: torch.Tensor) -> torch.Tensor:
        rows = v.detach().cpu().numpy()
        keys = [hashlib.blake2b(r.tobytes(), digest_size=16).digest() for r in rows]
        missing = [i for i, k in enumerate(keys) if k not in memory]
        if missing:
            with torch.no_grad():
                fresh = score(v[torch.as_tensor(missing, device=v.device)]).detach().cpu().numpy()
            memory.update({keys[i]: float(s) for i, s in zip(missing, fresh)})
        return torch.tensor([memory[k] for k in keys], dtype=torch.float32, device=v.device)

    return score_once


def gradient_free_check(model: nn.Module, score: Callable[[torch.Tensor], torch.Tensor], tau: float,
                        x: np.ndarray, y: np.ndarray, eps: float, max_iter: int = 200, seed: int = 0,
                        beta: float = 1.0):
    r"""Square attack (ART) on the composite model, whose success is "misclassified **and**
    accepted": a detector that only hides its gradients is caught by an attack that needs none.

    ``score`` needs no gradient here (a detector's plain ``score`` will do). ART hands its success
    criterion only the predictions, so the attack runs on :class:`Composite`: its K+1 outputs say
    both the class and the rejection. The loss it lowers is
    :math:`\max(z_y, z_{K+1}) - \max_{j \ne y, j \le K} z_j`: a wrong class must beat the true
    class *and* the rejection logit. Returns (adversarial images, misclassified, accepted).
    """
    from art.attacks.evasion import SquareAttack

    from .attacks import contained_random_states, wrap

    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    if len(x) == 0:  # no input left to check
        return x.copy(), np.zeros(0, dtype=bool), np.zeros(0, dtype=bool)
    dev = model_device(model)
    composite = Composite(model, remembered(score), tau, beta).eval()
    with torch.no_grad():
        k = int(model(torch.as_tensor(x[:1]).to(dev)).shape[1])
    clf = wrap(composite, tuple(x.shape[1:]), k + 1, dev.type)

    def criterion(y_pred: np.ndarray, y_onehot: np.ndarray) -> np.ndarray:  # True where it succeeded
        label = y_pred.argmax(1)
        return (label != y_onehot.argmax(1)) & (label != k)

    def loss(x_batch: np.ndarray, y_onehot: np.ndarray) -> np.ndarray:
        z = clf.predict(x_batch)
        true = y_onehot.argmax(1)
        rows = np.arange(len(z))
        guard = np.maximum(z[rows, true], z[:, k])
        others = z[:, :k].copy()
        others[rows, true] = -np.inf
        return guard - others.max(1)

    attack = SquareAttack(clf, norm=np.inf, eps=eps, max_iter=max_iter, nb_restarts=1, adv_criterion=criterion,
                          loss=loss, verbose=False, batch_size=128)
    with contained_random_states(seed):
        x_adv = attack.generate(x, y=np.eye(k + 1, dtype=np.float32)[y])
    with torch.no_grad():
        wrong = model(torch.as_tensor(x_adv).to(dev)).argmax(1).cpu().numpy() != y
        accepted = score(torch.as_tensor(x_adv).to(dev)).cpu().numpy() <= tau
    return x_adv, wrong, accepted


# --------------------------------------------------------------------------- the chapter's battery
#: the attacks run against every detector: the detector-blind PGD baseline, then the adaptive ones
BATTERY = ("pgd", "selective", "orthogonal", "composite_apgd")
CACHE_VERSION = 2


def outcomes(model: nn.Module, score_np: Callable[[torch.Tensor], np.ndarray], taus: dict[float, float],
             x_adv: np.ndarray | torch.Tensor, y: np.ndarray) -> dict:
    """Per input: still classified correctly, and accepted at each FPR level's threshold."""
    x_adv = torch.as_tensor(x_adv, dtype=torch.float32)
    if len(x_adv) == 0:  # nothing left to judge (every input already broken)
        empty = np.zeros(0, dtype=bool)
        return {"correct": empty, "scores": np.zeros(0), **{fpr: empty for fpr in taus}}
    with torch.no_grad():
        correct = model(x_adv.to(model_device(model))).argmax(1).cpu().numpy() == np.asarray(y)
    s = score_np(x_adv)
    return {"correct": correct, "scores": s, **{fpr: s <= tau for fpr, tau in taus.items()}}


def _pgd(model, grad_score, x, y, eps, steps, seed, restarts, tau=None, **kw) -> np.ndarray:
    """Detector-aware PGD with ``restarts`` random starts: each restart attacks only the inputs the
    earlier ones did not break, and an input keeps its best result (misclassified first, then the
    lowest score)."""
    best = detector_aware_pgd(model, grad_score, x, y, eps, steps, seed=seed, tau=tau, **kw)
    for r in range(1, restarts):
        done = best.misclassified & (best.scores <= tau) if tau is not None else best.misclassified
        todo = torch.nonzero(~done).squeeze(1)
        if len(todo) == 0:
            break
        other = detector_aware_pgd(model, grad_score, x[todo], y[todo], eps, steps, seed=restart_seed(seed, r), tau=tau, **kw)
        was = best.misclassified[todo]
        better = other.misclassified & (~was | (other.scores < best.scores[todo]))
        best.x_adv[todo[better]] = other.x_adv[better]
        best.scores[todo[better]] = other.scores[better]
        best.misclassified[todo[better]] = True
    return best.x_adv.numpy()


def run_attack(attack: str, model: nn.Module, grad_score, tau: float, x: torch.Tensor, y: torch.Tensor, eps: float,
               steps: int, seed: int, lam: float = 1.0, restarts: int = 1, targets: int | None = 1) -> np.ndarray:
    """One attack of the battery on (x, y) at ε, with ``restarts`` random starts (and, for
    composite APGD, ``targets`` wrong classes); the adversarial images."""
    _check_restarts(restarts)
    if attack == "pgd":
        return _pgd(model, None, x, y, eps, steps, seed, restarts)
    if attack in ("selective", "orthogonal"):
        return _pgd(model, grad_score, x, y, eps, steps, seed, restarts, tau=tau, mode=attack)
    if attack == "naive":
        return _pgd(model, grad_score, x, y, eps, steps, seed, restarts, tau=tau, mode="naive", lam=lam)
    if attack == "composite_apgd":
        return composite_apgd(model, grad_score, tau, x, y, eps, steps, seed, targets=targets, restarts=restarts)
    raise AdaptiveError(f"unknown attack {attack!r}; valid attacks: {', '.join(BATTERY)}, naive")


def cascade(attacks, model: nn.Module, grad_score, score_np, tau: float, x: torch.Tensor, y: torch.Tensor, eps_grid,
            steps: int, seed: int, key: dict, start: dict[float, np.ndarray] | None = None, lam: float = 1.0,
            restarts: int = 1, targets: int | None = 1) -> dict[float, dict[str, np.ndarray]]:
    """The attacks of ``attacks`` in turn at every ε of ``eps_grid`` (ascending), as AutoAttack
    runs its attacks: each one only on the inputs the earlier ones left robust. An input is broken
    once misclassified and accepted at τ (misclassified alone for a detector-blind attack,
    ``grad_score=None``); an input broken at a smaller ε keeps that image at the larger ones, where
    it is still inside the ball.

    ``start``: per ε, images that open the cascade (the shared detector-blind PGD), judged first.
    Returns ``{eps: {attack: images after that attack and all before it}}``: an unbroken input
    holds the last attack's image. Each stage is cached under ``key`` (artifact kind
    "adaptive")."""
    from . import cache
    from .attacks import array_digest

    eps_grid = sorted(float(e) for e in eps_grid)
    x_np, y_np = x.numpy(), np.asarray(y)
    blind = grad_score is None

    def is_broken(images, idx):
        # judged on the whole batch, as the chapter judges every stage afterwards: a subset is
        # another batch size, whose float summation order can flip a score within ulps of τ
        got = outcomes(model, score_np, {0: tau}, images, y_np)
        return (~got["correct"] & (got[0] | blind))[idx]

    out: dict[float, dict[str, np.ndarray]] = {}
    images, broken = x_np.copy(), np.zeros(len(x_np), dtype=bool)
    for i, eps in enumerate(eps_grid):
        out[eps] = {}
        if start is not None:
            todo = np.flatnonzero(~broken)
            if len(todo):
                images[todo] = start[eps][todo]
                broken[todo] = is_broken(images, todo)
        for j, attack in enumerate(attacks):
            params = {"version": CACHE_VERSION, "code": cache.source_digest(), **key, "attacks": list(attacks[: j + 1]),
                      "eps_grid": eps_grid[: i + 1], "steps": steps, "seed": seed, "lam": lam, "tau": float(tau),
                      "data": array_digest(x_np, y_np), "start": None if start is None else array_digest(*(start[e] for e in eps_grid[: i + 1])),
                      "restarts": restarts, "targets": targets}

            def build(images=images, broken=broken, attack=attack, eps=eps):
                new = images.copy()
                todo = np.flatnonzero(~broken)
                if len(todo):
                    idx = torch.from_numpy(todo)
                    new[todo] = run_attack(attack, model, grad_score, tau, x[idx], y[idx], eps, steps, seed, lam, restarts, targets)
                return {"x_adv": new.astype(np.float32)}

            after = cache.cached("adaptive", params, build, fmt="npz")["x_adv"]
            todo = np.flatnonzero(~broken)
            images = after.copy()
            broken = broken.copy()
            if len(todo):
                broken[todo] = is_broken(images, todo)
            out[eps][attack] = images.copy()
    return out


def convergence_check(attacks, model: nn.Module, grad_score, score_np, tau: float, x: torch.Tensor, y: torch.Tensor,
                      eps: float, steps: int, seed: int, key: dict, robust: np.ndarray, targets: int | None = 1) -> dict[str, float]:
    """Robust accuracy with detection at ε once more effort is spent: the cascade of ``attacks``
    run again on the inputs still robust (``robust``: per input, after the chapter's attacks) with
    twice the iterations, and, apart, from a second random start. An input broken by either
    counts as broken. Returns the robust accuracy as run, after doubling the iterations, and after
    doubling the restarts (cached like the chapter's attacks)."""
    robust = np.asarray(robust, dtype=bool)
    still = np.flatnonzero(robust)
    y_np = np.asarray(y)
    out = {"as_run": float(robust.mean())}
    for label, n_steps, run_seed in (("twice_iterations", 2 * steps, seed), ("twice_restarts", steps, restart_seed(seed, 1))):
        broken = np.zeros(len(robust), dtype=bool)
        if len(still):
            idx = torch.from_numpy(still)
            final = cascade(attacks, model, grad_score, score_np, tau, x[idx], y[idx], [eps], n_steps, run_seed, key,
                            targets=targets)[float(eps)][attacks[-1]]
            got = outcomes(model, score_np, {0: tau}, final, y_np[still])
            broken[still[~got["correct"] & got[0]]] = True
        out[label] = float((robust & ~broken).mean())
    return out
