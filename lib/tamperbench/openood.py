"""The OpenOOD v1.5 protocol, offline: OOD sets by group, metrics, and the published numbers.

OpenOOD (Yang et al., NeurIPS 2022 Datasets and Benchmarks; v1.5: Zhang et al., arXiv:2306.09301)
evaluates a classifier's OOD detector on the whole in-distribution (ID) test split against
**near-OOD** sets (semantically close) and **far-OOD** sets, and reports each set and the near
and far means. Its own evaluator downloads its data and needs CUDA; this module keeps its
protocol, its metric conventions and its method names, and lets pytorch-ood and the study's
dataset registry do the work.

Conventions (v1.5): **OOD is the positive class**. AUROC; FPR@95TPR, the share of ID images
flagged when 95 % of the OOD images are caught; AUPR-In (ID positive) and AUPR-Out (OOD
positive); the classifier's ID accuracy. OpenOOD v1 used the opposite FPR convention.

A benchmark names its sets by group. A set that cannot be had (not on disk, no download) is
*skipped with its reason*, never dropped silently. Covariate shift, which v1.5 keeps apart
from near and far OOD, is represented by corrupted copies of ID test images
(:mod:`tamperbench.perturbations`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from . import data, metrics, perturbations

GROUPS = ("near", "far", "covariate")

#: ID dataset → group → OOD sets. CIFAR-10's are OpenOOD v1.5's; Fashion-MNIST's are the offline
#: stand-ins of the ``cpu`` profile (chosen because they ship with Python or Debian packages).
BENCHMARKS: dict[str, dict[str, tuple[str, ...]]] = {
    "cifar10": {"near": ("cifar100", "tin"), "far": ("mnist", "svhn", "dtd", "places365")},
    "fashion_mnist": {"near": ("mnist_subset",),
                      "far": ("textures", "sklearn_digits", "faces", "noise_gaussian", "noise_uniform")},
}

#: what each offline set stands in for, said plainly in the report
STAND_INS = {
    "mnist_subset": "near-OOD stand-in: real MNIST digits (grey, 28×28, ten classes, like Fashion-MNIST); OpenOOD v1's "
                    "MNIST benchmark counted Fashion-MNIST as near-OOD for MNIST",
    "textures": "stands in for DTD: random crops of three scikit-image photographs (brick, grass, gravel)",
    "sklearn_digits": "stands in for a digit set such as SVHN: scikit-learn's 8×8 digits, upsampled",
    "faces": "stands in for natural photographs such as Places365: scikit-image's 200 face and non-face crops",
    "noise_gaussian": "a sanity check, not an OpenOOD set: Gaussian noise",
    "noise_uniform": "a sanity check, not an OpenOOD set: uniform noise",
}

#: our detector name → OpenOOD's
OPENOOD_NAMES = {"msp": "MSP", "odin": "ODIN", "mds": "MDS", "rmds": "RMDS", "ebo": "EBO", "mls": "MLS", "gen": "GEN",
                 "react": "ReAct", "ash": "ASH", "knn": "KNN", "vim": "ViM", "she": "SHE"}

#: OpenOOD v1.5's CIFAR-10 / ResNet-18 AUROC (%), mean and standard deviation over 3 training
#: runs (leaderboard data of zjysteven/OpenOOD, ``CrossEntropy_<M>_ResNet18_100_epochs.json``;
#: ID accuracy 95.06 ± 0.30). RMDS has no standard deviation there.
PUBLISHED_V15 = {
    "cifar10": {
        "msp": {"near": (88.03, 0.25), "far": (90.73, 0.43)},
        "odin": {"near": (82.87, 1.85), "far": (87.96, 0.61)},
        "mds": {"near": (84.20, 2.40), "far": (89.72, 1.36)},
        "ebo": {"near": (87.58, 0.46), "far": (91.21, 0.92)},
        "react": {"near": (87.11, 0.61), "far": (90.42, 1.41)},
        "knn": {"near": (90.64, 0.20), "far": (92.96, 0.14)},
        "vim": {"near": (88.68, 0.28), "far": (93.48, 0.24)},
        "ash": {"near": (75.27, 1.04), "far": (78.49, 2.58)},
        "she": {"near": (81.54, 0.51), "far": (85.32, 1.43)},
        "gen": {"near": (88.20, 0.30), "far": (91.35, 0.69)},
        "mls": {"near": (87.52, 0.47), "far": (91.10, 0.89)},
        "rmds": {"near": (89.80, float("nan")), "far": (92.20, float("nan"))},
    },
}
PUBLISHED_ID_ACCURACY = {"cifar10": (95.06, 0.30)}

#: the methods whose published numbers check the protocol, and the tolerance (AUROC points)
PROTOCOL_CHECK = ("msp", "ebo", "knn", "vim")
PROTOCOL_TOLERANCE = 2.0


class ProtocolError(ValueError):
    """An unknown group, a set in two groups, or an empty benchmark."""


@dataclass(frozen=True)
class Skipped:
    ood_set: str
    group: str
    reason: str


def check_groups(groups: dict[str, list[str]]) -> None:
    """Refuse unknown groups, unknown sets and a set named in two groups."""
    seen: dict[str, str] = {}
    for group, names in groups.items():
        if group not in GROUPS[:2]:
            raise ProtocolError(f"unknown OOD group {group!r}; valid groups: near, far (covariate shift is built "
                                "from the ID test split)")
        for name in names:
            if name not in data.DATASETS:
                raise ProtocolError(f"{group}: unknown dataset {name!r}; valid datasets: {', '.join(data.available())}")
            if name in seen:
                raise ProtocolError(f"{name!r} is in both {seen[name]} and {group}")
            seen[name] = group


def load_sets(groups: dict[str, list[str]], shape: tuple[int, int, int], n: int | None, seed: int = 0
              ) -> tuple[dict[str, tuple[str, data.Dataset]], list[Skipped]]:
    """(set name → (group, images adapted to ``shape``), skipped sets with their reason)."""
    check_groups(groups)
    loaded, skipped = {}, []
    for group, names in groups.items():
        for name in names:
            try:
                loaded[name] = (group, data.load_evaluation(name, seed=seed, n=n, shape=shape))
            except data.DatasetUnavailable as exc:
                skipped.append(Skipped(name, group, " ".join(str(exc).split())))
    return loaded, skipped


def covariate_sets(x_id: torch.Tensor, corruptions: dict[str, float], seed: int = 0) -> dict[str, torch.Tensor]:
    """``corrupted_<kind>``: the ID images ``x_id`` perturbed by each kind at its magnitude."""
    return {f"corrupted_{kind}": perturbations.perturb(x_id, kind, magnitude, seed) for kind, magnitude in corruptions.items()}


def ood_row(detector: str, ood_set: str, group: str, id_scores: np.ndarray, ood_scores: np.ndarray) -> dict:
    """One row of ``ood.csv``: the OpenOOD metrics, OOD positive (higher score = more OOD)."""
    m = metrics.detection_metrics(id_scores, ood_scores)  # "tampered" = OOD is the positive class
    return {"detector": detector, "ood_set": ood_set, "group": group, "auroc": m["auroc"], "fpr95": m["fpr95"],
            "aupr_in": m["aupr_in"], "aupr_out": m["aupr_out"], "fpr80": m["fpr80"],
            "n_id": len(id_scores), "n_ood": len(ood_scores)}


def group_means(ood: pd.DataFrame) -> pd.DataFrame:
    """Per detector and group, the mean of each metric over the group's sets (OpenOOD's near and
    far means), with the number of sets averaged."""
    cols = ["auroc", "fpr95", "aupr_in", "aupr_out"]
    means = ood.groupby(["detector", "group"], sort=False)[cols].mean()
    return means.assign(n_sets=ood.groupby(["detector", "group"], sort=False).size()).reset_index()


def published_comparison(means: pd.DataFrame, id_dataset: str) -> pd.DataFrame:
    """Our near and far AUROC (in %) next to OpenOOD v1.5's, for the methods it published on
    ``id_dataset``; empty when it published none. ``within`` marks |ours − published| ≤ 2 points."""
    published = PUBLISHED_V15.get(id_dataset, {})
    rows = []
    for r in means[means.group.isin(("near", "far"))].itertuples():
        if r.detector not in published:
            continue
        value, std = published[r.detector][r.group]
        ours = 100 * r.auroc
        rows.append({"detector": r.detector, "openood_name": OPENOOD_NAMES[r.detector], "group": r.group,
                     "auroc_ours": ours, "auroc_published": value, "published_std": std,
                     "difference": ours - value, "within_tolerance": abs(ours - value) <= PROTOCOL_TOLERANCE,
                     "protocol_check": r.detector in PROTOCOL_CHECK})
    return pd.DataFrame(rows, columns=["detector", "openood_name", "group", "auroc_ours", "auroc_published",
                                       "published_std", "difference", "within_tolerance", "protocol_check"])


def rank_correlation(x, y) -> tuple[float, float, int]:
    """(Spearman ρ, two-sided p-value, number of pairs) over the pairs where both are finite."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return float("nan"), float("nan"), int(ok.sum())
    res = spearmanr(x[ok], y[ok])
    return float(res.statistic), float(res.pvalue), int(ok.sum())


def correlation_verdict(rho: float, p: float, level: float = 0.05) -> str:
    """A plain reading of a rank correlation across detectors."""
    if not np.isfinite(rho):
        return "undefined (too few detectors, or a constant ranking)"
    if p >= level:
        return f"no evidence of a link (ρ = {rho:.2f}, p = {p:.2f})"
    return f"{'a positive' if rho > 0 else 'a negative'} link (ρ = {rho:.2f}, p = {p:.3f})"
