r"""PARTICUL on several layers at once: **this study's extension**, not the authors' method.

One PARTICUL per layer :math:`l \in \mathcal{L}`, each trained and calibrated exactly as
:mod:`.particul` (same data, same validation split, same seed), all read in one forward pass of
the frozen classifier. A class's confidence is the mean over layers of its per-layer confidence,

.. math:: \mathrm{conf}_c(x) = \frac{1}{|\mathcal{L}|}\sum_{l\in\mathcal{L}} \mathrm{conf}^{(l)}_c(x),

and the image confidence aggregates it as PARTICUL does (``categorical``, ``argmax`` or
``mean``). Each aggregation is linear in the class confidences, so the image confidence is also
the mean of the per-layer image confidences. The suspicion score is 1 − confidence.

Why: early blocks see local texture (where small perturbations live), late blocks see object
parts; a part missing at any depth should count.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import data, models
from .base import Detector, DetectorError
from .particul import MODES, Particul, class_confidences, confidence_in_mode, fit_many, image_confidence


class ParticulMultiLayer(Detector):
    """PARTICUL on ``layers`` (default: every convolutional block of the classifier)."""

    name = "particul_multi"

    def __init__(self, layers: list[str] | None = None, mode: str = "categorical", device: str = "auto",
                 batch_size: int = 256, **particul_params):
        super().__init__(device=device, batch_size=batch_size, seed=particul_params.get("seed", 0))
        if mode not in MODES:
            raise DetectorError(f"unknown PARTICUL mode {mode!r}; valid modes: {', '.join(MODES)}")
        if layers is not None and (not isinstance(layers, (list, tuple)) or len(layers) < 2
                                   or len(set(layers)) != len(layers) or not all(isinstance(x, str) for x in layers)):
            raise DetectorError(f"particul_multi: layers must be a list of at least two distinct layer names, got {layers!r}")
        if "layer" in particul_params:
            raise DetectorError("particul_multi: give `layers` (a list), not `layer`")
        Particul(device="cpu", **particul_params)  # the shared settings are PARTICUL's: checked now
        self.layers = list(layers) if layers is not None else None
        self.mode = mode
        self.particul_params = particul_params
        self.members: list[Particul] = []

    @classmethod
    def from_members(cls, members: list[Particul], mode: str = "categorical") -> "ParticulMultiLayer":
        """The combination of already fitted single-layer detectors (no refit)."""
        if len(members) < 2 or not all(m.is_fitted for m in members):
            raise DetectorError("particul_multi: needs at least two fitted PARTICUL detectors")
        det = cls(layers=[m.layer for m in members], mode=mode, device=str(members[0].device),
                  batch_size=members[0].batch_size)
        det.members, det.trained = list(members), members[0].trained
        return det

    def _fit(self, trained: models.Trained, clean_train: data.Dataset, **kwargs) -> None:
        layers = self.layers or list(trained.model.conv_layers)
        if len(layers) < 2:
            raise DetectorError(f"particul_multi: needs at least two layers, got {layers}")
        configs = [{**self.particul_params, "layer": layer} for layer in layers]
        self.members = fit_many(trained, clean_train, configs, device=str(self.device), batch_size=self.batch_size)
        self.layers = layers

    @property
    def fit_seconds(self) -> float:
        return float(sum(m.fit_seconds for m in self.members))

    def layer_confidences(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(logits, each layer's per-class confidences), from one forward pass."""
        return class_confidences(self.members, self.trained.model, torch.as_tensor(x), self.device, self.batch_size)

    def _score(self, x: torch.Tensor) -> np.ndarray:
        logits, per_layer = self.layer_confidences(x)
        conf = image_confidence(torch.stack(per_layer).mean(0), logits, self.mode)
        return (1.0 - conf).cpu().numpy()

    def confidence(self, x: torch.Tensor, mode: str | None = None) -> np.ndarray:
        return confidence_in_mode(self, x, mode)
