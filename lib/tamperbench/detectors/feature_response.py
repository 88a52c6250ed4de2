r"""Feature response maps and average local spatial entropy (Amirian, Schwenker & Stadelmann,
ANNPR 2018).

The feature response is the guided-backpropagation gradient (Springenberg et al. 2015) of the
predicted class's logit with respect to the input (Captum's ``GuidedBackprop``): absolute
values summed over channels, scaled to [0, 1] per image. Around each pixel, the values of a k×k
window are binned into a histogram :math:`h_k` (normalised to sum to 1), and

.. math:: S_k = -\sum_i h_k(i) \log_2 h_k(i), \qquad s(x) = \frac{1}{HW}\sum_k S_k .

Adversarial responses are diffuse and noisy: their average local entropy is higher.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import data, models
from .base import Detector, DetectorError


def local_spatial_entropy(response: torch.Tensor, window: int = 3, bins: int = 8) -> torch.Tensor:
    """Average over pixels of the entropy (bits) of each k×k window's value histogram.

    ``response``: N×H×W maps with values in [0, 1].
    """
    idx = (response.clamp(0, 1) * bins).long().clamp(max=bins - 1)  # bin of each pixel
    onehot = F.one_hot(idx, bins).permute(0, 3, 1, 2).float()  # N×B×H×W
    # window histograms: the share of each bin among the window's pixels (zero padding excluded)
    counts = F.avg_pool2d(onehot, window, stride=1, padding=window // 2, count_include_pad=False)
    h = counts / counts.sum(1, keepdim=True).clamp_min(1e-12)
    ent = -(h * torch.log2(h.clamp_min(1e-12))).sum(1)
    return ent.flatten(1).mean(1)


def normalise_response(grad: torch.Tensor) -> torch.Tensor:
    """|gradient| summed over channels, scaled to [0, 1] per image (a constant map becomes 0)."""
    r = grad.abs().sum(1)
    lo = r.flatten(1).min(1).values.view(-1, 1, 1)
    span = (r.flatten(1).max(1).values.view(-1, 1, 1) - lo)
    return torch.where(span > 0, (r - lo) / span.clamp_min(1e-12), torch.zeros_like(r))


class FeatureResponse(Detector):
    name = "feature_response"

    def __init__(self, window: int = 3, bins: int = 8, **kw):
        super().__init__(**kw)
        if not isinstance(window, int) or window < 1 or window % 2 == 0:
            raise DetectorError(f"feature_response: window must be an odd int ≥ 1, got {window!r}")
        self.window, self.bins = window, bins

    def _fit(self, trained: models.Trained, clean_train: data.Dataset, **kwargs) -> None:
        from captum.attr import GuidedBackprop

        model = copy.deepcopy(trained.model).eval().to(self.device)
        for m in model.modules():  # guided backprop hooks ReLU modules; in-place ones break them
            if isinstance(m, nn.ReLU):
                m.inplace = False
        self.model, self.guided = model, GuidedBackprop(model)

    def responses(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device)
        with torch.no_grad():
            target = self.model(x).argmax(1)
        return normalise_response(self.guided.attribute(x.clone().requires_grad_(True), target=target).detach())

    def _score(self, x: torch.Tensor) -> np.ndarray:
        return local_spatial_entropy(self.responses(x), self.window, self.bins).cpu().numpy()
