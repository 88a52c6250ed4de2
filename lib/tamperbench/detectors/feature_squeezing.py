r"""Feature squeezing (Xu, Evans & Qi, NDSS 2018).

Squeeze the input with ART's preprocessors — bit-depth reduction (``FeatureSqueezing``) and a
median filter (``SpatialSmoothing``) — and compare the classifier's softmax outputs:

.. math:: s(x) = \max_{q \in Q} \lVert \mathrm{softmax}(f(x)) - \mathrm{softmax}(f(q(x))) \rVert_1

Adversarial perturbations are fragile: squeezing moves their prediction far more than a clean
input's. The authors' MNIST setting is 1-bit depth and a 2×2 median (CIFAR-10: 5 bits, 2×2).
"""

from __future__ import annotations

import numpy as np
import torch

from .. import data, models
from .base import Detector, DetectorError


class FeatureSqueezing(Detector):
    name = "feature_squeezing"

    def __init__(self, bit_depth: int = 1, median_window: int = 2, **kw):
        super().__init__(**kw)
        if not isinstance(bit_depth, int) or not 1 <= bit_depth <= 8:
            raise DetectorError(f"feature_squeezing: bit_depth must be an int in [1, 8], got {bit_depth!r}")
        if not isinstance(median_window, int) or median_window < 2:
            raise DetectorError(f"feature_squeezing: median_window must be an int ≥ 2, got {median_window!r}")
        self.bit_depth, self.median_window = bit_depth, median_window

    def _fit(self, trained: models.Trained, clean_train: data.Dataset, **kwargs) -> None:
        from art.defences.preprocessor import FeatureSqueezing as Bits, SpatialSmoothing

        # nothing to learn: the squeezers are fixed transformations
        self.squeezers = [
            Bits(clip_values=(0.0, 1.0), bit_depth=self.bit_depth),
            SpatialSmoothing(window_size=self.median_window, channels_first=True, clip_values=(0.0, 1.0)),
        ]
        self.model = trained.model

    def _probs(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(x.to(self.device)).softmax(1)

    def _score(self, x: torch.Tensor) -> np.ndarray:
        p = self._probs(x)
        x_np = x.cpu().numpy()
        dists = [(p - self._probs(torch.from_numpy(sq(x_np)[0].astype(np.float32)))).abs().sum(1) for sq in self.squeezers]
        return torch.stack(dists).max(0).values.cpu().numpy()
