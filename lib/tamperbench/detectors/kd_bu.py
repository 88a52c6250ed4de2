r"""Kernel density and Bayesian uncertainty (Feinman et al. 2017). Supervised.

- **KD**: a Gaussian kernel density of the penultimate features, estimated on clean training
  samples of the *predicted* class: :math:`KD(x) = \frac{1}{|X_t|}\sum_{x_i\in X_t} k(z(x), z(x_i))`.
- **BU**: the predictive variance under Monte-Carlo dropout (T stochastic passes):
  :math:`\frac1T\sum_t \lVert p_t\rVert^2 - \lVert\frac1T\sum_t p_t\rVert^2`.

A logistic regression on (log KD, BU) separates clean and noisy inputs (Gaussian noise of the
adversarial perturbation's norm, as in the paper) from adversarial examples.

**Bandwidth.** The paper set one per dataset. Here ``bandwidth=None`` chooses it on clean data
only: among ``BANDWIDTHS``, the one that maximises the log-likelihood of held-out clean training
features under the class-conditional densities (predicted class = true class on clean data).

Monte-Carlo dropout draws from its own seeded random state: scoring leaves ``torch``'s global
random state as it found it.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.neighbors import KernelDensity

from .. import data, models
from .base import DetectorError, SupervisedDetector, layer_outputs, split


#: candidate bandwidths for the held-out choice (features are post-ReLU penultimate activations)
BANDWIDTHS = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


def choose_bandwidth(z_fit: np.ndarray, y_fit: np.ndarray, z_held: np.ndarray, y_held: np.ndarray,
                     candidates=BANDWIDTHS) -> tuple[float, dict[float, float]]:
    """The bandwidth maximising the mean held-out log-likelihood of class-conditional KDEs."""
    scores = {}
    for bw in candidates:
        total = 0.0
        for c in np.unique(y_held):
            if (y_fit == c).any():
                total += KernelDensity(bandwidth=bw).fit(z_fit[y_fit == c]).score(z_held[y_held == c])
        scores[float(bw)] = total / len(z_held)
    return max(scores, key=scores.get), scores


class KDBU(SupervisedDetector):
    name = "kd_bu"

    def __init__(self, bandwidth: float | None = None, mc_samples: int = 20, n_density: int = 2000, seed: int = 0, **kw):
        super().__init__(**kw)
        if mc_samples < 2:
            raise DetectorError(f"kd_bu: mc_samples must be ≥ 2, got {mc_samples}")
        if bandwidth is not None and (not isinstance(bandwidth, (int, float)) or bandwidth <= 0):
            raise DetectorError(f"kd_bu: bandwidth must be a positive number or None (chosen on held-out data), got {bandwidth!r}")
        self.bandwidth, self.mc_samples, self.n_density, self.seed = bandwidth, mc_samples, n_density, seed
        self.bandwidth_scores: dict[float, float] = {}

    def _fit_unsupervised(self, trained: models.Trained, clean_train: data.Dataset) -> None:
        model = trained.model
        if not any(isinstance(m, torch.nn.Dropout) for m in model.modules()):
            raise DetectorError("kd_bu needs a classifier with dropout layers (for Bayesian uncertainty)")
        self.layer = model.penultimate_layer
        both = clean_train.take(self.n_density * 3 // 2, self.seed)  # density images, then a held-out third
        z_all = layer_outputs(model, both.x, [self.layer], self.device)[self.layer].numpy()
        y_all = both.y.numpy()
        n_fit = min(self.n_density, len(both) - max(1, len(both) // 3))
        z, y = z_all[:n_fit], y_all[:n_fit]
        if self.bandwidth is None:
            self.bandwidth, self.bandwidth_scores = choose_bandwidth(z, y, z_all[n_fit:], y_all[n_fit:])
        self.kdes = {int(c): KernelDensity(bandwidth=self.bandwidth).fit(z[y == c]) for c in np.unique(y)}

    def _mc_dropout_probs(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """T softmax outputs with dropout on (BatchNorm in eval mode), on a forked, seeded RNG:
        the same masks at every call, so that an attack differentiates the detector's own score."""
        dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(self.seed)
            for m in dropouts:
                m.train()
            try:
                return torch.stack([model(x.to(self.device)).softmax(1) for _ in range(self.mc_samples)])
            finally:
                for m in dropouts:
                    m.eval()

    def torch_features(self, x: torch.Tensor) -> torch.Tensor:
        """(log KD, BU), differentiable in ``x``: the Gaussian KDE of the predicted class written
        in torch over its fitted points, and Monte-Carlo dropout with the detector's fixed masks."""
        model = self.trained.model
        encoder, _ = split(model, self.layer)
        z = encoder(x.float()).flatten(1)
        with torch.no_grad():
            pred = model(x.float()).argmax(1)
        log_kd = torch.full((len(x),), -1e6, dtype=z.dtype, device=z.device)
        for c, kde in self.kdes.items():
            sel = pred == c
            if sel.any():
                bank = torch.as_tensor(np.asarray(kde.tree_.data), dtype=z.dtype, device=z.device)
                h, d = float(kde.bandwidth), z.shape[1]
                sq = torch.cdist(z[sel], bank, compute_mode="donot_use_mm_for_euclid_dist").pow(2)
                norm = np.log(len(bank)) + 0.5 * d * np.log(2 * np.pi * h * h)
                log_kd = log_kd.index_put((sel.nonzero().squeeze(1),), torch.logsumexp(-sq / (2 * h * h), 1) - norm)
        probs = self._mc_dropout_probs(model, x.float())
        bu = (probs ** 2).sum(-1).mean(0) - (probs.mean(0) ** 2).sum(-1)
        return torch.stack([log_kd, bu], 1)

    def _features(self, x: torch.Tensor) -> np.ndarray:
        model = self.trained.model
        z = layer_outputs(model, x, [self.layer], self.device)[self.layer].numpy()
        with torch.no_grad():
            pred = model(x.to(self.device)).argmax(1).cpu().numpy()
        log_kd = np.empty(len(x))
        for c, kde in self.kdes.items():
            sel = pred == c
            if sel.any():
                log_kd[sel] = kde.score_samples(z[sel])
        log_kd[~np.isin(pred, list(self.kdes))] = -1e6
        # MC dropout: dropout on, BatchNorm kept in eval mode, on a forked (then restored) RNG
        with torch.no_grad():
            probs = self._mc_dropout_probs(model, x).cpu()
        bu = (probs ** 2).sum(-1).mean(0) - (probs.mean(0) ** 2).sum(-1)
        return np.stack([log_kd, bu.numpy()], axis=1)
