r"""Feature response maps and average local spatial entropy (Amirian, Schwenker & Stadelmann,
"Trace and detect adversarial attacks on CNNs using feature response maps", ANNPR 2018,
arXiv:2208.11436).

**Feature response.** The guided-backpropagation gradient (Springenberg et al. 2015) of the
predicted class's logit with respect to the input (Captum's ``GuidedBackprop``), summed over
colour channels and kept **signed**: the paper treats it as a grey-scale image.

**Grey image.** The response :math:`r` of each image is mapped to 8 bits with the standard
visualisation of guided backpropagation: standardised, scaled so that ±5 standard deviations
span the grey range, and clipped,

.. math:: g = \mathrm{round}\Big(255\cdot\mathrm{clip}\big(\tfrac12 + 0.1\,\tfrac{r-\bar r}{\sigma_r},\,0,\,1\big)\Big) \in \{0,\dots,255\}.

**Local spatial entropy.** Around each pixel, the 3×3 patch's grey levels form a normalised
histogram :math:`h_k` over the 256 levels (pixels outside the image are not counted), and

.. math:: S_k = -\sum_i h_k(i)\log_2 h_k(i), \qquad s(x) = \frac{1}{HW}\sum_k S_k ,

computed with scikit-image's rank entropy filter. A clean image's response is structured and
follows the object; an adversarial one is noisy, so its average local entropy is higher.

``mapping="abs_minmax"`` keeps this study's earlier variant as a labelled ablation: the
absolute response, min-max scaled per image, binned into ``bins`` levels.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import data, models
from .base import Detector, DetectorError

MAPPINGS = ("published", "abs_minmax")


def grey_levels(response: torch.Tensor) -> np.ndarray:
    """The signed response (N×H×W) as 8-bit grey images: ±5 standard deviations span 0–255."""
    r = response.double()
    mean = r.flatten(1).mean(1).view(-1, 1, 1)
    std = r.flatten(1).std(1).view(-1, 1, 1)
    z = torch.where(std > 0, (r - mean) / std.clamp_min(1e-12), torch.zeros_like(r))
    return torch.round(255 * (0.5 + 0.1 * z).clamp(0, 1)).to(torch.uint8).cpu().numpy()


def mean_local_entropy(grey: np.ndarray, window: int = 3) -> np.ndarray:
    """Mean over pixels of the entropy (bits) of each window×window patch's 256-level histogram."""
    from skimage.filters.rank import entropy
    from skimage.morphology import footprint_rectangle

    footprint = footprint_rectangle((window, window))
    return np.array([entropy(g, footprint).mean() for g in grey])


def local_spatial_entropy(response: torch.Tensor, window: int = 3, bins: int = 8) -> torch.Tensor:
    """The ablation's entropy: maps in [0, 1] binned into ``bins`` levels (N×H×W → N)."""
    idx = (response.clamp(0, 1) * bins).long().clamp(max=bins - 1)  # bin of each pixel
    onehot = F.one_hot(idx, bins).permute(0, 3, 1, 2).float()  # N×B×H×W
    # window histograms: the share of each bin among the window's pixels (zero padding excluded)
    counts = F.avg_pool2d(onehot, window, stride=1, padding=window // 2, count_include_pad=False)
    h = counts / counts.sum(1, keepdim=True).clamp_min(1e-12)
    ent = -(h * torch.log2(h.clamp_min(1e-12))).sum(1)
    return ent.flatten(1).mean(1)


def normalise_response(grad: torch.Tensor) -> torch.Tensor:
    """The ablation's map: |gradient| summed over channels, min-max scaled to [0, 1] per image."""
    r = grad.abs().sum(1)
    lo = r.flatten(1).min(1).values.view(-1, 1, 1)
    span = (r.flatten(1).max(1).values.view(-1, 1, 1) - lo)
    return torch.where(span > 0, (r - lo) / span.clamp_min(1e-12), torch.zeros_like(r))


def functional_relus(model: nn.Module) -> list[str]:
    """Where ``model`` applies ReLU as a function (``F.relu``, ``torch.relu``, ``x.relu()``):
    guided backpropagation hooks only ``nn.ReLU`` modules, so those would not be guided."""
    import torch.fx

    relus = {F.relu, torch.relu, torch.relu_, getattr(F, "relu_", None)}
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:  # an untraceable model cannot be checked, so it is not trusted
        return [f"(the model cannot be traced to check: {type(exc).__name__}: {exc})"]
    return [str(n.name) for n in graph.nodes
            if (n.op == "call_function" and n.target in relus) or (n.op == "call_method" and n.target in ("relu", "relu_"))]


class FeatureResponse(Detector):
    name = "feature_response"

    def __init__(self, window: int = 3, mapping: str = "published", bins: int = 8, **kw):
        super().__init__(**kw)
        if not isinstance(window, int) or window < 1 or window % 2 == 0:
            raise DetectorError(f"feature_response: window must be an odd int ≥ 1, got {window!r}")
        if mapping not in MAPPINGS:
            raise DetectorError(f"feature_response: unknown mapping {mapping!r}; valid: {', '.join(MAPPINGS)}")
        if not isinstance(bins, int) or bins < 2:
            raise DetectorError(f"feature_response: bins must be an int ≥ 2, got {bins!r}")
        self.window, self.mapping, self.bins = window, mapping, bins

    def _fit(self, trained: models.Trained, clean_train: data.Dataset, **kwargs) -> None:
        from captum.attr import GuidedBackprop

        functional = functional_relus(trained.model)
        if functional:
            raise DetectorError(
                f"feature_response: the classifier applies ReLU as a function at {', '.join(functional)}; guided "
                "backpropagation only guides nn.ReLU modules, so its response would not be guided backprop. "
                "Use nn.ReLU modules in the model.")
        model = copy.deepcopy(trained.model).eval().to(self.device)
        for m in model.modules():  # guided backprop hooks ReLU modules; in-place ones break them
            if isinstance(m, nn.ReLU):
                m.inplace = False
        self.model, self.guided = model, GuidedBackprop(model)

    def raw_responses(self, x: torch.Tensor) -> torch.Tensor:
        """The guided-backprop gradient of the predicted class's logit (N×C×H×W)."""
        x = x.to(self.device)
        with torch.no_grad():
            target = self.model(x).argmax(1)
        return self.guided.attribute(x.clone().requires_grad_(True), target=target).detach()

    def grey(self, x: torch.Tensor) -> np.ndarray:
        """The signed response of each image as an 8-bit grey image (N×H×W)."""
        return grey_levels(self.raw_responses(x).sum(1))

    def _score(self, x: torch.Tensor) -> np.ndarray:
        if self.mapping == "abs_minmax":
            return local_spatial_entropy(normalise_response(self.raw_responses(x)), self.window, self.bins).cpu().numpy()
        return mean_local_entropy(self.grey(x), self.window)
