r"""Kernel density and Bayesian uncertainty (Feinman et al. 2017). Supervised.

- **KD**: a Gaussian kernel density of the penultimate features, estimated on clean training
  samples of the *predicted* class: :math:`KD(x) = \frac{1}{|X_t|}\sum_{x_i\in X_t} k(z(x), z(x_i))`.
- **BU**: the predictive variance under Monte-Carlo dropout (T stochastic passes):
  :math:`\frac1T\sum_t \lVert p_t\rVert^2 - \lVert\frac1T\sum_t p_t\rVert^2`.

A logistic regression on (log KD, BU) separates clean from adversarial examples. (The paper
also adds noisy inputs of matched norm as negatives; here the negatives are clean inputs.)
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.neighbors import KernelDensity

from .. import data, models
from .base import DetectorError, SupervisedDetector, layer_outputs


class KDBU(SupervisedDetector):
    name = "kd_bu"

    def __init__(self, bandwidth: float = 1.0, mc_samples: int = 20, n_density: int = 2000, seed: int = 0, **kw):
        super().__init__(**kw)
        if mc_samples < 2:
            raise DetectorError(f"kd_bu: mc_samples must be ≥ 2, got {mc_samples}")
        self.bandwidth, self.mc_samples, self.n_density, self.seed = bandwidth, mc_samples, n_density, seed

    def _fit_unsupervised(self, trained: models.Trained, clean_train: data.Dataset) -> None:
        model = trained.model
        if not any(isinstance(m, torch.nn.Dropout) for m in model.modules()):
            raise DetectorError("kd_bu needs a classifier with dropout layers (for Bayesian uncertainty)")
        self.layer = model.penultimate_layer
        train = clean_train.take(self.n_density, self.seed)
        z = layer_outputs(model, train.x, [self.layer], self.device)[self.layer].numpy()
        self.kdes = {int(c): KernelDensity(bandwidth=self.bandwidth).fit(z[train.y.numpy() == c]) for c in train.y.unique()}

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
        # MC dropout: dropout on, BatchNorm kept in eval mode
        torch.manual_seed(self.seed)
        dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
        for m in dropouts:
            m.train()
        try:
            with torch.no_grad():
                probs = torch.stack([model(x.to(self.device)).softmax(1) for _ in range(self.mc_samples)]).cpu()
        finally:
            for m in dropouts:
                m.eval()
        bu = (probs ** 2).sum(-1).mean(0) - (probs.mean(0) ** 2).sum(-1)
        return np.stack([log_kd, bu.numpy()], axis=1)
