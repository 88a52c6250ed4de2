r"""Feature squeezing (Xu, Evans & Qi, NDSS 2018).

Squeeze the input and compare the classifier's softmax outputs:

.. math:: s(x) = \max_{q \in Q} \lVert \mathrm{softmax}(f(x)) - \mathrm{softmax}(f(q(x))) \rVert_1

Adversarial perturbations are fragile: squeezing moves their prediction far more than a clean
input's. The squeezers :math:`Q` are chosen **per dataset**, as the authors did: bit-depth
reduction (ART's ``FeatureSqueezing``), a median filter (ART's ``SpatialSmoothing``) and, for
colour images, non-local means (scikit-image's ``denoise_nl_means``). The authors' sets:

- MNIST: 1-bit depth and a 2×2 median;
- CIFAR-10: 5-bit depth, a 2×2 median and non-local means 13-3-2 (search window 13, patch 3,
  strength 2 on the 0–255 scale).

For another dataset, :func:`select_squeezers` picks one bit depth and one median size on
held-out data (clean images and adversarial examples of one attack's fit half), never on
evaluation data.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import data, models
from .base import Detector, DetectorError

BIT_DEPTHS = tuple(range(1, 8))
MEDIAN_WINDOWS = (2, 3)


def _nl_means(spec: str):
    """A non-local means squeezer from the authors' "window-patch-strength" notation."""
    try:
        window, patch, strength = (int(v) for v in spec.split("-"))
    except ValueError:
        raise DetectorError(f"feature_squeezing: nl_means must read 'window-patch-strength', e.g. '13-3-2', got {spec!r}") from None

    def squeeze(x: np.ndarray) -> np.ndarray:
        from skimage.restoration import denoise_nl_means

        out = np.empty_like(x)
        for i, img in enumerate(x):
            out[i] = np.moveaxis(denoise_nl_means(np.moveaxis(img, 0, -1), patch_size=patch, patch_distance=window // 2,
                                                  h=strength / 255.0, channel_axis=-1), -1, 0)
        return out

    return squeeze


def squeezer(kind: str, value) -> callable:
    """One squeezer, ``x`` (N×C×H×W in [0, 1], NumPy) → squeezed ``x``."""
    from art.defences.preprocessor import FeatureSqueezing as Bits, SpatialSmoothing

    if kind == "bit_depth":
        art = Bits(clip_values=(0.0, 1.0), bit_depth=value)
    elif kind == "median_window":
        art = SpatialSmoothing(window_size=value, channels_first=True, clip_values=(0.0, 1.0))
    elif kind == "nl_means":
        return _nl_means(value)
    else:
        raise DetectorError(f"unknown squeezer {kind!r}; valid: bit_depth, median_window, nl_means")
    return lambda x: art(x)[0]


class FeatureSqueezing(Detector):
    """The joint detector over the enabled squeezers (``None`` disables one)."""

    name = "feature_squeezing"

    def __init__(self, bit_depth: int | None = 1, median_window: int | None = 2, nl_means: str | None = None, **kw):
        super().__init__(**kw)
        if bit_depth is not None and (not isinstance(bit_depth, int) or not 1 <= bit_depth <= 8):
            raise DetectorError(f"feature_squeezing: bit_depth must be an int in [1, 8] or None, got {bit_depth!r}")
        if median_window is not None and (not isinstance(median_window, int) or median_window < 2):
            raise DetectorError(f"feature_squeezing: median_window must be an int ≥ 2 or None, got {median_window!r}")
        if nl_means is not None:
            _nl_means(nl_means)  # checks the notation now
        self.config = {k: v for k, v in (("bit_depth", bit_depth), ("median_window", median_window), ("nl_means", nl_means))
                       if v is not None}
        if not self.config:
            raise DetectorError("feature_squeezing: enable at least one of bit_depth, median_window, nl_means")

    def _fit(self, trained: models.Trained, clean_train: data.Dataset, **kwargs) -> None:
        # nothing to learn: the squeezers are fixed transformations
        self.squeezers = {f"{k}={v}": squeezer(k, v) for k, v in self.config.items()}
        self.model = trained.model

    def _probs(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(x.to(self.device)).softmax(1)

    def single_scores(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        """Each squeezer's L1 distance on its own (the joint score is their maximum)."""
        p = self._probs(x)
        x_np = x.cpu().numpy()
        return {name: (p - self._probs(torch.from_numpy(sq(x_np).astype(np.float32)))).abs().sum(1).cpu().numpy()
                for name, sq in self.squeezers.items()}

    def _score(self, x: torch.Tensor) -> np.ndarray:
        return np.max(np.stack(list(self.single_scores(x).values())), axis=0)


def select_squeezers(trained: models.Trained, x_clean: np.ndarray, x_adv: np.ndarray, device: str = "auto",
                     bit_depths=BIT_DEPTHS, median_windows=MEDIAN_WINDOWS) -> tuple[dict, list[dict]]:
    """(the chosen ``{"bit_depth": b or None, "median_window": m or None}``, every candidate's AUROC).

    The candidates are each bit depth alone, each median size alone and every (bit depth, median)
    pair; a set's score is the joint detector's (the maximum of its squeezers' L1 distances),
    measured on the given held-out pairs. Ties go to fewer squeezers, then to the coarser squeeze
    (fewer bits, a larger window), as the authors preferred the strongest squeezer that works.
    """
    from .. import metrics

    clean_t, adv_t = torch.from_numpy(np.asarray(x_clean)), torch.from_numpy(np.asarray(x_adv))
    single = {}
    for kind, values in (("bit_depth", bit_depths), ("median_window", median_windows)):
        for value in values:
            det = FeatureSqueezing(**{"bit_depth": None, "median_window": None, kind: value}, device=device)
            det.fit(trained, data.Dataset("held-out", "test", clean_t[:1], torch.zeros(1, dtype=torch.long), ()))
            single[(kind, value)] = (det.score(clean_t), det.score(adv_t))
    candidates = [{"bit_depth": b, "median_window": None} for b in bit_depths]
    candidates += [{"bit_depth": None, "median_window": m} for m in median_windows]
    candidates += [{"bit_depth": b, "median_window": m} for b in bit_depths for m in median_windows]
    rows = []
    for cand in candidates:
        parts = [single[(k, v)] for k, v in cand.items() if v is not None]
        clean, adv = np.max([c for c, _ in parts], axis=0), np.max([a for _, a in parts], axis=0)
        rows.append({**cand, "squeezers": " + ".join(f"{k}={v}" for k, v in cand.items() if v is not None),
                     "n_squeezers": len(parts), "auroc": metrics.detection_metrics(clean, adv)["auroc"]})
    best = max(rows, key=lambda r: (r["auroc"], -r["n_squeezers"], -(r["bit_depth"] or 9), r["median_window"] or 0))
    for r in rows:
        r["chosen"] = r is best
    return {"bit_depth": best["bit_depth"], "median_window": best["median_window"]}, rows
