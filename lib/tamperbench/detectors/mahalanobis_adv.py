r"""Mahalanobis detector for adversarial examples (Lee et al., NeurIPS 2018). Supervised.

At every named block, spatially averaged features are modelled by class-conditional Gaussians
with a tied covariance (pytorch-ood's ``Mahalanobis``); the layer's score is the minimum
Mahalanobis distance :math:`\min_c (z-\mu_c)^\top\Sigma^{-1}(z-\mu_c)`. A logistic regression
combines the layers' scores, trained on clean vs adversarial examples as in the paper (without
its input pre-processing step). The score is differentiable (:meth:`torch_features`), so adaptive
attacks differentiate it directly.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import data, models
from .base import SupervisedDetector, layer_outputs
from .ood import _mds_score


class MahalanobisAdv(SupervisedDetector):
    name = "mahalanobis_adv"

    def __init__(self, n_fit: int = 5000, seed: int = 0, **kw):
        super().__init__(**kw)
        self.n_fit, self.seed = n_fit, seed

    def _fit_unsupervised(self, trained: models.Trained, clean_train: data.Dataset) -> None:
        from pytorch_ood.detector import Mahalanobis

        self.layers = [n for n, _ in trained.model.named_children() if n != "logits"]
        train = clean_train.take(self.n_fit, self.seed)
        feats = layer_outputs(trained.model, train.x, self.layers, self.device, pool=True)
        self.gaussians = {layer: Mahalanobis(None).fit_features(feats[layer], train.y) for layer in self.layers}

    def _features(self, x: torch.Tensor) -> np.ndarray:
        feats = layer_outputs(self.trained.model, x, self.layers, self.device, pool=True)
        return np.stack([self.gaussians[layer].predict_features(feats[layer]).numpy() for layer in self.layers], axis=1)

    def torch_features(self, x: torch.Tensor) -> torch.Tensor:
        """Each layer's Mahalanobis score, differentiable in ``x`` (the features of :meth:`_features`)."""
        cols, h = [], x.float()
        for layer, block in self.trained.model.named_children():
            h = block(h)
            if layer in self.gaussians:
                pooled = h.mean((-2, -1)) if h.dim() == 4 else h.flatten(1)
                cols.append(_mds_score(self.gaussians[layer], pooled))
        return torch.stack(cols, 1)
