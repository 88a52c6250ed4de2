r"""Several detectors as one: their conformal p-values, combined. **This study's construction**
from textbook parts, not a published adversarial-example detector.

Members' scores live on unrelated scales (PARTICUL's 1 − confidence, MSP's 1 − max softmax,
a scan's statistic), so they are first put on one: each member's **conformal p-value** against
its scores on clean *calibration* images, held out from everything the members were fitted on
and from everything the combination is evaluated on (Vovk et al. 2005; Bates et al. 2023, eq. 2):

.. math:: p_j^{\uparrow}(x) = \frac{1 + \#\{i : s_j(c_i) \ge s_j(x)\}}{1 + n}, \qquad
          p_j^{\downarrow}(x) = \frac{1 + \#\{i : s_j(c_i) \le s_j(x)\}}{1 + n}.

A member enters **upper**-tailed (:math:`p_j = p_j^{\uparrow}`: only high scores are suspicious,
as for every detector alone) or **two**-tailed, :math:`p_j = \min(1, 2\min(p_j^{\uparrow},
p_j^{\downarrow}))`, when tampered inputs can also sit *below* clean ones (MSP on fixed-budget
attacks, which make the softmax more confident than on clean images). On a clean input each
:math:`p_j` is super-uniform, :math:`P(p_j \le t) \le t`, whatever the member.

The :math:`k` p-values are then combined by one of three classical rules:

- ``fisher`` (Fisher 1932): :math:`T = -2\sum_j \log p_j`, combined p-value
  :math:`P(\chi^2_{2k} \ge T)` (``scipy.stats.combine_pvalues(method="fisher")``); exact when the
  members are independent;
- ``cauchy`` (Liu & Xie 2020, JASA, eq. 2): :math:`T = \frac1k \sum_j \tan((\tfrac12 - p_j)\pi)`,
  combined p-value :math:`\tfrac12 - \arctan(T)/\pi`; its tail stays close to exact under
  arbitrary dependence between the members (their Theorem 1), which scipy does not implement;
- ``bonferroni`` (the Bonferroni bound on Tippett's minimum): :math:`\min(1, k \min_j p_j)`,
  valid under any dependence, conservative.

Members read the same image, so they are dependent and Fisher's χ² p-value is only nominal; the
chapters therefore never threshold it: thresholds are set on held-out clean scores as for every
detector, and AUROC needs only the ranking.

**The score** is :math:`-\log` of the combined p-value (higher = more suspicious), computed from
the statistic in closed form so that it never underflows: :math:`-\log P(\chi^2_{2k} \ge T)`
(``scipy.stats.chi2.logsf``), :math:`-\log(\tfrac12 - \arctan(T)/\pi)` (via the tail's
:math:`\arctan(1/T)/\pi` for large T), :math:`-\log \min(1, k \min_j p_j)`.

A combination costs its members' scores and a sorted search per member: no extra forward pass
of its own. Combining a detector with itself ranks inputs exactly as the detector does.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn.functional as F

from .. import data, models
from .base import Detector, DetectorError

#: how the members' p-values are combined
METHODS = ("fisher", "cauchy", "bonferroni")
#: which tail of a member's score is suspicious
TAILS = ("upper", "two")


def conformal_pvalues(calibration: np.ndarray, scores: np.ndarray, tail: str = "upper") -> np.ndarray:
    r"""Conformal p-values of ``scores`` against clean ``calibration`` scores:
    :math:`(1 + \#\{cal \ge s\}) / (1 + n)` (``upper``), its mirror (``lower``), or twice the
    smaller of the two, capped at 1 (``two``)."""
    cal = np.sort(np.asarray(calibration, dtype=np.float64))
    s = np.asarray(scores, dtype=np.float64)
    n = len(cal)
    upper = (1.0 + n - np.searchsorted(cal, s, side="left")) / (1.0 + n)
    if tail == "upper":
        return upper
    lower = (1.0 + np.searchsorted(cal, s, side="right")) / (1.0 + n)
    if tail == "lower":
        return lower
    if tail == "two":
        return np.minimum(1.0, 2.0 * np.minimum(upper, lower))
    raise DetectorError(f"unknown tail {tail!r}; valid tails: upper, lower, two")


def member_pvalues(calibration: np.ndarray, scores: np.ndarray, tail: str) -> np.ndarray:
    """A member's conformal p-values in its tail, capped at 1 − 1/(2(n + 1)) (see
    :meth:`Combined.pvalues`)."""
    return np.minimum(conformal_pvalues(calibration, scores, tail), 1.0 - 0.5 / (len(calibration) + 1))


def combined_log_pvalue(pvalues: np.ndarray, method: str = "fisher") -> np.ndarray:
    """log of the combined p-value of each row of ``pvalues`` (N × k, each in (0, 1])."""
    from scipy import stats

    p = np.asarray(pvalues, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 1:
        raise DetectorError(f"pvalues must be N × k with k ≥ 1, got shape {p.shape}")
    k = p.shape[1]
    if method == "fisher":
        return stats.chi2.logsf(-2.0 * np.log(p).sum(axis=1), 2 * k)
    if method == "cauchy":
        t = np.tan((0.5 - p) * np.pi).mean(axis=1)
        # 1/2 − arctan(t)/π equals arctan(1/t)/π for t > 0: no cancellation in the far tail
        with np.errstate(divide="ignore"):
            tail = np.where(t > 0, np.arctan(1.0 / np.where(t > 0, t, 1.0)) / np.pi, 0.5 - np.arctan(t) / np.pi)
        return np.log(tail)
    if method == "bonferroni":
        return np.log(np.minimum(1.0, k * p.min(axis=1)))
    raise DetectorError(f"unknown combination method {method!r}; valid methods: {', '.join(METHODS)}")


def member_spec(member) -> tuple[str, dict]:
    """(registry name, parameters) of a member given as ``"msp"``, ``("msp", {...})`` or
    ``{"name": "msp", "params": {...}}``."""
    if isinstance(member, str):
        return member, {}
    if isinstance(member, (list, tuple)) and len(member) == 2 and isinstance(member[0], str) and isinstance(member[1], dict):
        return member[0], dict(member[1])
    if isinstance(member, dict) and set(member) <= {"name", "params"} and isinstance(member.get("name"), str):
        return member["name"], dict(member.get("params", {}))
    raise DetectorError(f"combined: a member is a detector name, (name, params) or {{name:, params:}}, got {member!r}")


class Combined(Detector):
    """The conformal-p-value combination of unsupervised ``members``.

    ``fit(trained, clean_train, calibration=x_cal)`` fits each member on ``clean_train`` and
    scores the held-out clean images ``x_cal`` (required: they must not be training images, or
    every p-value of a new clean input would be too small). :meth:`from_members` combines
    detectors already fitted, with their calibration scores.
    """

    name = "combined"

    def __init__(self, members=("particul", "msp"), method: str = "fisher", tails: list[str] | None = None,
                 device: str = "auto", batch_size: int = 256, seed: int = 0):
        super().__init__(device=device, batch_size=batch_size, seed=seed)
        from . import DETECTORS, SUPERVISED

        self.member_batch_size, self.batch_size = batch_size, sys.maxsize  # one _score call per input

        if isinstance(members, (str, bytes)) or not isinstance(members, (list, tuple)) or len(members) < 1:
            raise DetectorError(f"combined: members must be a list of at least one detector, got {members!r}")
        self.member_specs = [member_spec(m) for m in members]
        for name, _ in self.member_specs:
            if name == self.name or name in SUPERVISED or name not in DETECTORS:
                valid = [d for d in DETECTORS if d != self.name and d not in SUPERVISED]
                raise DetectorError(f"combined: member {name!r} is not an unsupervised detector; valid members: "
                                    f"{', '.join(valid)}")
        if method not in METHODS:
            raise DetectorError(f"combined: unknown method {method!r}; valid methods: {', '.join(METHODS)}")
        tails = ["upper"] * len(self.member_specs) if tails is None else list(tails)
        if len(tails) != len(self.member_specs) or any(t not in TAILS for t in tails):
            raise DetectorError(f"combined: tails must list one of {', '.join(TAILS)} per member "
                                f"({len(self.member_specs)}), got {tails!r}")
        self.method, self.tails = method, tails
        self.member_names = [name for name, _ in self.member_specs]  # the study's labels, where they differ
        self.members: list[Detector] = []
        self.calibration: list[np.ndarray] = []
        self.scorers = None

    @classmethod
    def from_members(cls, members: list[Detector], calibration_scores: list[np.ndarray], method: str = "fisher",
                     tails: list[str] | None = None, scorers=None, names: list[str] | None = None) -> "Combined":
        """The combination of fitted detectors, given each one's scores on held-out clean
        calibration images. ``scorers`` (optional, one per member): how to score inputs, e.g.
        through the study's score cache; by default each member's ``score``."""
        if not members or not all(m.is_fitted for m in members):
            raise DetectorError("combined: needs at least one fitted detector")
        if len(calibration_scores) != len(members) or (scorers is not None and len(scorers) != len(members)):
            raise DetectorError("combined: one calibration score array (and scorer) per member")
        det = cls(members=[m.name for m in members], method=method, tails=tails, device=str(members[0].device),
                  batch_size=members[0].batch_size, seed=members[0].seed)
        det.members, det.trained, det.scorers = list(members), members[0].trained, scorers
        if names is not None:
            if len(names) != len(members):
                raise DetectorError("combined: one name per member")
            det.member_names = list(names)
        det.calibration = [cls._checked_calibration(c, m.name) for c, m in zip(calibration_scores, members)]
        return det

    def without_cache(self) -> "Combined":
        """The same combination scoring through its members' own ``score`` (to time it)."""
        import copy

        twin = copy.copy(self)
        twin.scorers = None
        return twin

    @staticmethod
    def _checked_calibration(scores, name: str) -> np.ndarray:
        cal = np.sort(np.asarray(scores, dtype=np.float64).ravel())
        if len(cal) < 1 or not np.isfinite(cal).all():
            raise DetectorError(f"combined: {name}'s calibration scores must be finite and not empty")
        return cal

    def _fit(self, trained: models.Trained, clean_train: data.Dataset, calibration=None, **kwargs) -> None:
        from . import detector

        if calibration is None or len(calibration) == 0:
            raise DetectorError("combined: fit(trained, clean_train, calibration=x_cal) needs held-out clean images "
                                "(not training images) to calibrate its members' p-values")
        self.members = [detector(name, device=str(self.device), batch_size=self.member_batch_size, **{"seed": self.seed, **params})
                        .fit(trained, clean_train) for name, params in self.member_specs]
        x_cal = torch.as_tensor(np.asarray(calibration) if not isinstance(calibration, torch.Tensor) else calibration)
        self.calibration = [self._checked_calibration(m.score(x_cal), m.name) for m in self.members]

    def pvalues(self, member_scores: list[np.ndarray]) -> np.ndarray:
        """N × k: each member's conformal p-value in its tail, capped at 1 − 1/(2(n + 1)): a
        p-value of exactly 1 (a score below every calibration score) would send Cauchy's
        tan((½ − p)π) to −∞ and hide every other member (Liu & Xie assume p < 1); the cap keeps
        the order of every p-value and changes Fisher's and Bonferroni's scores by at most
        1/(2(n + 1)) in p."""
        return np.stack([member_pvalues(cal, s, tail) for cal, s, tail in zip(self.calibration, member_scores, self.tails)],
                        axis=1)

    def combine(self, member_scores: list[np.ndarray]) -> np.ndarray:
        """The score (−log combined p-value) from the members' scores of the same inputs."""
        if len(member_scores) != len(self.calibration):
            raise DetectorError(f"combined: expected {len(self.calibration)} members' scores, got {len(member_scores)}")
        return -combined_log_pvalue(self.pvalues(member_scores), self.method)

    def _score(self, x: torch.Tensor) -> np.ndarray:
        # the base class checked the input and passes it whole (batch_size is unbounded): each
        # member batches it itself, and a cached scorer sees the same array the chapters cache
        scorers = self.scorers or [m.score for m in self.members]
        return self.combine([np.asarray(f(x.cpu()), dtype=np.float64) for f in scorers])

    def torch_score(self, x: torch.Tensor, member_scores=None, bandwidth: float = 1.0) -> torch.Tensor:
        r"""A differentiable stand-in of the score, for adaptive attacks (its *gradient* is what
        matters: :func:`tamperbench.adaptive.attack_score` pairs it with the exact value).

        Each conformal count :math:`\#\{c_i \ge s\}` becomes :math:`\sum_i \sigma((c_i - s)/h)`
        (h = ``bandwidth`` × the member's Silverman bandwidth on its calibration scores), and the
        p-value :math:`\tilde p = \sum_i \sigma((c_i - s)/h) / (n + 1)` has **no floor**: beyond
        the calibration range :math:`-\log \tilde p` keeps growing linearly in s, so the member
        that flags an input keeps a gradient however far out its score is (with the exact floor
        1/(n + 1) that gradient would vanish and an attacker would only move the blind members).
        ``member_scores`` (one differentiable function per member, e.g. a surrogate) defaults to
        each member's ``torch_score``."""
        fns = member_scores or [m.torch_score for m in self.members]
        log_p = []
        for fn, cal_np, tail in zip(fns, self.calibration, self.tails):
            s = fn(x).double()
            cal = torch.as_tensor(cal_np, dtype=torch.float64, device=s.device)
            n = len(cal_np)
            h = bandwidth * 1.06 * (float(np.std(cal_np)) or 1.0) * n ** (-0.2)
            z = (cal[None, :] - s[:, None]) / h
            log_upper = torch.logsumexp(F.logsigmoid(z), dim=1) - np.log(n + 1)
            if tail == "upper":
                log_p.append(log_upper)
            else:
                log_lower = torch.logsumexp(F.logsigmoid(-z), dim=1) - np.log(n + 1)
                log_p.append(torch.clamp(np.log(2.0) + torch.minimum(log_upper, log_lower), max=0.0))
        log_p = torch.stack(log_p, dim=1)
        k = log_p.shape[1]
        if self.method == "fisher":
            # −log P(χ²_2k ≥ T) = T/2 − log Σ_{i<k} (T/2)^i / i!  (the χ² tail with even degrees)
            half = -log_p.sum(1)
            terms = torch.stack([i * torch.log(half.clamp_min(1e-300)) - float(np.sum(np.log(np.arange(1, i + 1))))
                                 for i in range(k)], dim=1)
            return (half - torch.logsumexp(terms, dim=1)).float()
        if self.method == "cauchy":
            p = torch.exp(log_p).clamp(max=1.0 - 0.5 / (len(self.calibration[0]) + 1))
            t = torch.tan((0.5 - p) * np.pi).mean(1)
            return (-torch.log((0.5 - torch.atan(t) / np.pi).clamp_min(1e-300))).float()
        return (-torch.clamp(np.log(k) + log_p.min(1).values, max=0.0)).float()
