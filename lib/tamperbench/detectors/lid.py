r"""Local Intrinsic Dimensionality (Ma et al., ICLR 2018). Supervised.

For each named block of the classifier, the maximum-likelihood LID estimate of a sample from
its distances :math:`r_1 \le \dots \le r_k` to its k nearest neighbours among a batch of clean
reference samples:

.. math:: \widehat{\mathrm{LID}}(x) = -\Big(\frac1k\sum_{i=1}^{k}\log\frac{r_i}{r_k}\Big)^{-1}

The per-layer LID vector feeds a logistic regression trained on clean vs adversarial examples
of one attack (k = 20 and reference batches of 100, as in the paper).
"""

from __future__ import annotations

import numpy as np
import torch

from .. import data, models
from .base import DetectorError, SupervisedDetector, layer_outputs


def lid_estimate(distances: np.ndarray) -> np.ndarray:
    """MLE of LID from each row's k smallest positive distances (sorted ascending)."""
    d = np.maximum(distances, 1e-12)
    return -1.0 / (np.log(d / d[:, -1:]).mean(axis=1) - 1e-12)


class LID(SupervisedDetector):
    name = "lid"

    def __init__(self, k: int = 20, n_reference: int = 100, seed: int = 0, **kw):
        super().__init__(**kw)
        if not isinstance(k, int) or k < 2 or k >= n_reference:
            raise DetectorError(f"lid: k must be an int in [2, n_reference), got {k!r}")
        self.k, self.n_reference, self.seed = k, n_reference, seed

    def _fit_unsupervised(self, trained: models.Trained, clean_train: data.Dataset) -> None:
        self.layers = [n for n, _ in trained.model.named_children()]
        ref = clean_train.take(self.n_reference, self.seed).x
        self.reference = layer_outputs(trained.model, ref, self.layers, self.device)

    def torch_features(self, x: torch.Tensor) -> torch.Tensor:
        """Per-layer LID against the fixed reference batch, differentiable in ``x``: an adaptive
        attacker sees the same neighbours as the detector (Athalye et al. 2018 fixed the batch)."""
        cols, h = [], x.float()
        for layer, block in self.trained.model.named_children():
            h = block(h)
            dist = torch.cdist(h.flatten(1), self.reference[layer].to(h.device))
            dist = torch.where(dist > 0, dist, torch.full_like(dist, float("inf")))
            near = dist.topk(self.k, dim=1, largest=False).values.clamp_min(1e-12)  # ascending
            cols.append(-1.0 / (torch.log(near / near[:, -1:]).mean(1) - 1e-12))
        return torch.stack(cols, 1)

    def _features(self, x: torch.Tensor) -> np.ndarray:
        acts = layer_outputs(self.trained.model, x, self.layers, self.device)
        cols = []
        for layer in self.layers:
            dist = torch.cdist(acts[layer], self.reference[layer]).numpy()
            dist = np.sort(np.where(dist > 0, dist, np.inf), axis=1)[:, : self.k]  # a sample is not its own neighbour
            cols.append(lid_estimate(dist))
        return np.stack(cols, axis=1)
