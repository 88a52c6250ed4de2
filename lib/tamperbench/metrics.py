"""Detection metrics, with the positive class = "tampered" (adversarial or OOD).

Computed with pytorch-ood's functional metrics (its convention: larger score = more likely
OOD, labels < 0 mark the positives), and scikit-learn's ROC curve for TPR at a fixed FPR:

- AUROC; FPR@95TPR (the false-positive rate when 95 % of tampered inputs are caught), and
  FPR@80TPR, which the PARTICUL/CODE authors reported;
- AUPR-In (clean as the positive class) and AUPR-Out (tampered as the positive class);
- TPR@5FPR (the share of tampered inputs caught when 5 % of clean inputs are flagged);
- a stratified bootstrap 95 % confidence interval for any of them;
- the Wilson score interval of a rate (an attack's success rate, a detection rate), from SciPy.
"""

from __future__ import annotations

import numpy as np
import torch
from pytorch_ood.metrics import functional as pf
from sklearn.metrics import roc_curve

METRICS = ("auroc", "fpr95", "fpr80", "aupr_in", "aupr_out", "tpr_at_fpr5")


def _scores_labels(clean: np.ndarray, tampered: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    clean, tampered = np.asarray(clean, dtype=np.float64), np.asarray(tampered, dtype=np.float64)
    if len(clean) == 0 or len(tampered) == 0:
        raise ValueError(f"need clean and tampered scores, got {len(clean)} clean and {len(tampered)} tampered")
    if not (np.isfinite(clean).all() and np.isfinite(tampered).all()):
        raise ValueError("scores must be finite")
    scores = torch.from_numpy(np.concatenate([clean, tampered]))
    labels = torch.cat([torch.zeros(len(clean), dtype=torch.long), -torch.ones(len(tampered), dtype=torch.long)])
    return scores, labels


def tpr_at_fpr(clean: np.ndarray, tampered: np.ndarray, fpr: float = 0.05) -> float:
    """Largest TPR whose FPR does not exceed ``fpr`` (thresholds on the observed scores)."""
    y = np.r_[np.zeros(len(clean)), np.ones(len(tampered))]
    fprs, tprs, _ = roc_curve(y, np.r_[clean, tampered])
    return float(tprs[fprs <= fpr + 1e-12].max())


def detection_metrics(clean: np.ndarray, tampered: np.ndarray) -> dict[str, float]:
    """All metrics for suspicion scores of clean and tampered inputs (higher = more suspicious)."""
    scores, labels = _scores_labels(clean, tampered)
    return {
        "auroc": float(pf.auroc(scores, labels)),
        "fpr95": float(pf.fpr_at_tpr(scores, labels, 0.95)),
        "fpr80": float(pf.fpr_at_tpr(scores, labels, 0.80)),
        "aupr_in": float(pf.aupr(scores, labels, positive="id")),
        "aupr_out": float(pf.aupr(scores, labels, positive="ood")),
        "tpr_at_fpr5": tpr_at_fpr(np.asarray(clean), np.asarray(tampered), 0.05),
    }


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of the rate ``successes / n`` (NaNs when ``n`` is 0).

    Unlike the normal approximation it stays inside [0, 1] and is honest at 0 % and 100 %.
    """
    from scipy.stats import binomtest

    if n == 0:
        return float("nan"), float("nan")
    ci = binomtest(int(successes), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def bootstrap_ci(clean: np.ndarray, tampered: np.ndarray, metric: str = "auroc", n_boot: int = 200,
                 seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval, resampling clean and tampered scores separately."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; valid metrics: {', '.join(METRICS)}")
    clean, tampered = np.asarray(clean), np.asarray(tampered)
    rng = np.random.default_rng(seed)
    if metric == "auroc":
        values = _bootstrap_auroc(clean, tampered, n_boot, rng)
        lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
        return float(lo), float(hi)
    values = []
    for _ in range(n_boot):
        c = clean[rng.integers(0, len(clean), len(clean))]
        t = tampered[rng.integers(0, len(tampered), len(tampered))]
        values.append(detection_metrics(c, t)[metric])
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _bootstrap_auroc(clean: np.ndarray, tampered: np.ndarray, n_boot: int, rng) -> np.ndarray:
    """AUROC of ``n_boot`` resamples at once: AUROC = P(t > c) + ½P(t = c) over the resampled
    pairs, i.e. wᵀHv / (n_t n_c) with H the pair matrix and w, v the resampling counts."""
    _scores_labels(clean, tampered)  # validates
    h = (tampered[:, None] > clean[None, :]) + 0.5 * (tampered[:, None] == clean[None, :])
    w = rng.multinomial(len(tampered), np.full(len(tampered), 1 / len(tampered)), size=n_boot)
    v = rng.multinomial(len(clean), np.full(len(clean), 1 / len(clean)), size=n_boot)
    return ((w @ h) * v).sum(1) / (len(tampered) * len(clean))


def roc(clean: np.ndarray, tampered: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) points of the ROC curve."""
    y = np.r_[np.zeros(len(clean)), np.ones(len(tampered))]
    fprs, tprs, _ = roc_curve(y, np.r_[clean, tampered])
    return fprs, tprs
