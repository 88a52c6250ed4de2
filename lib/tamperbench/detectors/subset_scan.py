r"""Subset scanning of activations (Speakman et al. 2018; Cintas et al., IJCAI 2020).

For a layer of the frozen classifier with :math:`J` nodes (C×H×W of a feature map):

1. **Empirical p-values.** Against background activations :math:`b_{1..M,j}` of clean data,
   :math:`p^+_j(a) = (1 + \#\{m: b_{m,j} \ge a_j\}) / (M + 1)`: one-sided (large activations
   are anomalous, the authors' default) and never 0 (the conformal +1). ``tails="two"`` also
   counts unusually *small* activations,
   :math:`p_j = \min(1, 2\min(p^+_j, p^-_j))` with
   :math:`p^-_j(a) = (1 + \#\{m: b_{m,j} \le a_j\}) / (M + 1)`: after a ReLU, an attack that
   switches features off shows up only in the lower tail.
2. **Scan statistic.** :math:`F(S) = \max_{\alpha \le \alpha_{max}} \phi(\alpha, N_\alpha(S), N(S))`
   with :math:`N_\alpha` the p-values ≤ α in the subset S of nodes:

   - Berk-Jones: :math:`\phi = N\,\mathrm{KL}(N_\alpha/N \,\|\, \alpha)`;
   - Higher Criticism: :math:`(N_\alpha - N\alpha)/\sqrt{N\alpha(1-\alpha)}`;
   - Kolmogorov-Smirnov: :math:`(N_\alpha - N\alpha)/\sqrt{N}`.
3. **Linear-time subset scanning.** For fixed α these scores are maximised by the nodes with
   p ≤ α (adding a node with p > α lowers them once :math:`N_\alpha/N > \alpha`), so the scan
   over subsets reduces to a scan over the sorted p-values: :math:`O(J\log J)` per image.

The score of an image is :math:`F` of its most anomalous node subset: higher = more suspicious.
The default layer is the network's first block: in the seed paper's one-tailed table the early
layers carry the signal (0.86-0.98) and deeper ones fall to 0.45-0.69. Here deeper layers can fall well
*below* 0.5 (adversarial images less anomalous in the upper tail), which the two-tailed scan
(``tails="two"``) reads; chapter 4 measures both.
ART's ``SubsetScanningDetector`` scans the same way but reseeds NumPy's global RNG, flags only
above the maximum background score and cannot be fitted once and reused; this module is
validated against it in the tests.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import data, models
from .base import Detector, DetectorError, split

SCORING = ("berk_jones", "higher_criticism", "kolmogorov_smirnov")


TAILS = ("upper", "two")


def empirical_pvalues(background: np.ndarray, activations: np.ndarray, tails: str = "upper") -> np.ndarray:
    """Conformal p-values of ``activations`` (N×J) against ``background`` (M×J): upper-tail, or
    two-tailed (twice the smaller tail, capped at 1)."""
    if tails not in TAILS:
        raise DetectorError(f"unknown tails {tails!r}; valid: {', '.join(TAILS)}")
    m, j = background.shape
    bg = np.sort(background.astype(np.float64), axis=0)  # per node, ascending
    activations = np.asarray(activations, dtype=np.float64)  # float32 shifts would round ties away
    # One searchsorted for all nodes: shift node k's values by k·span so that the nodes occupy
    # disjoint, increasing ranges of one sorted array. #{b >= a} = M − #{b < a}.
    lo = min(bg.min(), activations.min())
    span = max(bg.max(), activations.max()) - lo + 1.0
    offsets = np.arange(j) * span
    flat_bg = (bg - lo + offsets).T.ravel()
    # queries node by node (the transpose): each node's queries search one small block of flat_bg
    # in turn, which stays in cache; image by image, every query jumps across the whole array (4× slower)
    shifted = (activations.T - lo + offsets[:, None]).ravel()
    block_start = (np.arange(j) * m)[:, None]  # positions are counted from the start of each node's block
    below = (np.searchsorted(flat_bg, shifted, side="left").reshape(j, -1) - block_start).T
    upper = (1.0 + (m - below)) / (m + 1.0)
    if tails == "upper":
        return upper
    at_most = (np.searchsorted(flat_bg, shifted, side="right").reshape(j, -1) - block_start).T  # #{b ≤ a}
    lower = (1.0 + at_most) / (m + 1.0)
    return np.minimum(1.0, 2.0 * np.minimum(upper, lower))


def scan_statistic(pvalues: np.ndarray, scoring: str = "berk_jones", alpha_max: float = 0.5) -> np.ndarray:
    """Best subset score of each row of p-values (N×J), by linear-time subset scanning."""
    if scoring not in SCORING:
        raise DetectorError(f"unknown scoring function {scoring!r}; valid: {', '.join(SCORING)}")
    p = np.sort(pvalues, axis=1)  # ascending: candidate α are the p-values themselves
    n_alpha = np.arange(1, p.shape[1] + 1, dtype=np.float64)[None, :]  # nodes with p ≤ α = p_(k)
    alpha = np.clip(p, 1e-12, 1 - 1e-12)
    valid = p <= alpha_max
    if scoring == "berk_jones":
        # the subset is exactly those nodes: N = N_α, so N·KL(1 ‖ α) = N_α·log(1/α)
        phi = n_alpha * np.log(1.0 / alpha)
    elif scoring == "higher_criticism":
        phi = (n_alpha - n_alpha * alpha) / np.sqrt(n_alpha * alpha * (1 - alpha))
    else:
        phi = (n_alpha - n_alpha * alpha) / np.sqrt(n_alpha)
    phi = np.where(valid, phi, 0.0)
    return phi.max(axis=1)


class SubsetScan(Detector):
    """Per-image subset scanning of one layer's activations against clean background data."""

    name = "subset_scan"

    def __init__(self, layer: str | None = None, scoring: str = "berk_jones", alpha_max: float = 0.5,
                 n_background: int = 1000, tails: str = "upper", seed: int = 0, **kw):
        super().__init__(**kw)
        if scoring not in SCORING:
            raise DetectorError(f"unknown scoring function {scoring!r}; valid: {', '.join(SCORING)}")
        if tails not in TAILS:
            raise DetectorError(f"subset_scan: unknown tails {tails!r}; valid: {', '.join(TAILS)}")
        self.tails = tails
        if not 0 < alpha_max < 1:
            raise DetectorError(f"alpha_max must lie in (0, 1), got {alpha_max}")
        self.layer, self.scoring, self.alpha_max = layer, scoring, alpha_max
        self.n_background, self.seed = n_background, seed

    def _activations(self, x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return torch.cat([self.trunk(x[i : i + 512].to(self.device)).flatten(1).cpu() for i in range(0, len(x), 512)]).numpy()

    def _fit(self, trained: models.Trained, clean_train: data.Dataset, **kwargs) -> None:
        # default: the first block, where the seed paper found the signal (its deeper layers scored 0.45-0.69)
        self.layer = self.layer or next(iter(trained.model.named_children()))[0]
        self.trunk, _ = split(trained.model, self.layer)
        self.background = self._activations(clean_train.take(self.n_background, self.seed).x)

    def _score(self, x: torch.Tensor) -> np.ndarray:
        return scan_statistic(empirical_pvalues(self.background, self._activations(x), self.tails), self.scoring,
                              self.alpha_max)
