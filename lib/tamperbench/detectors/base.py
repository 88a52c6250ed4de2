"""The detector interface, shared by every method.

``detector(name, **params)`` returns an object with ``fit(trained, clean_train)`` and
``score(x) -> np.ndarray``. **A higher score means more suspicious** (more likely tampered or
out of distribution), for every method. Supervised detectors, which need adversarial examples
to fit, set ``supervised = True`` and say so in the benchmark.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from .. import data, models


class DetectorError(ValueError):
    """Bad detector name, parameter or input, or ``score`` before ``fit``."""


class Detector:
    """Base class: subclasses implement ``_fit`` and ``_score``."""

    name: ClassVar[str] = ""
    supervised: ClassVar[bool] = False

    def __init__(self, device: str = "auto", batch_size: int = 256):
        self.device = models.pick_device(device)
        self.batch_size = batch_size
        self.trained: models.Trained | None = None

    @property
    def is_fitted(self) -> bool:
        return self.trained is not None

    def fit(self, trained: models.Trained, clean_train: data.Dataset, **kwargs) -> "Detector":
        if len(clean_train) == 0:
            raise DetectorError(f"{self.name}: cannot fit on an empty training set")
        trained.model.eval().to(self.device)
        self._fit(trained, clean_train, **kwargs)
        self.trained = trained
        return self

    def score(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        """Suspicion scores for images ``x`` (N×C×H×W in [0, 1]); higher = more suspicious."""
        if not self.is_fitted:
            raise DetectorError(f"{self.name}: call fit(trained, clean_train) before score(x)")
        x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
        if len(x) == 0:
            raise DetectorError(f"{self.name}: cannot score an empty input")
        expected = tuple(self.trained.input_shape)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise DetectorError(f"{self.name}: x must have shape (N, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        out = [self._score(x[i : i + self.batch_size].float().to(self.device)) for i in range(0, len(x), self.batch_size)]
        return np.concatenate(out).astype(np.float64)

    def _fit(self, trained: models.Trained, clean_train: data.Dataset, **kwargs) -> None:
        raise NotImplementedError

    def _score(self, x: torch.Tensor) -> np.ndarray:
        raise NotImplementedError
