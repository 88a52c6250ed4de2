r"""The OpenOOD family, through pytorch-ood (not re-implemented here).

Each entry builds the pytorch-ood detector on the frozen classifier's parts: the whole model
(logits), the encoder up to the penultimate layer (features :math:`z`), or the trunk up to the
last convolutional map and the head after it. Scores are pytorch-ood's outlier scores: higher
is more suspicious.

============  =====================================================  ==========================
name          method (paper)                                          score
============  =====================================================  ==========================
``msp``       Maximum softmax probability (Hendrycks & Gimpel 2017)   :math:`-\max_c p_c`
``odin``      ODIN (Liang et al. 2018): temperature + input step      :math:`-\max_c p_c(\tilde x; T)`
``mds``       Mahalanobis (Lee et al. 2018), class-conditional        :math:`\min_c d_M(z, \mu_c)`
``rmds``      Relative Mahalanobis (Ren et al. 2021)                  :math:`\min_c d_M(z,\mu_c) - d_M(z,\mu_0)`
``ebo``       Energy (Liu et al. 2020)                                :math:`-T\log\sum_c e^{z_c/T}`
``mls``       Maximum logit (Hendrycks et al. 2022)                   :math:`-\max_c z_c`
``gen``       Generalised entropy (Liu et al. 2023)                   :math:`\sum_c p_c^\gamma(1-p_c)^\gamma`
``react``     ReAct (Sun et al. 2021): clipped activations + energy   energy of the clipped net
``ash``       ASH-S (Djurisic et al. 2023): pruned, rescaled maps     energy of the shaped net
``knn``       Deep k-NN (Sun et al. 2022) on normalised features      distance to the k-th neighbour
``vim``       Virtual logit matching (Wang et al. 2022)               residual norm vs energy
``she``       Simplified Hopfield energy (Zhang et al. 2023)          −similarity to class patterns
============  =====================================================  ==========================
"""

from __future__ import annotations

import contextlib
import copy
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from .. import data, models
from .base import Detector, DetectorError, split, unknown_parameters


def _builders() -> dict[str, tuple[Callable, bool]]:
    """name → (build(parts, **params) → pytorch-ood detector, whether it needs fitting). The
    first argument is not named ``p``: that is a parameter of scikit-learn's NearestNeighbors,
    which KNN passes on."""
    import pytorch_ood.detector as pd

    return {
        "msp": (lambda parts, **kw: pd.MaxSoftmax(parts.model, **kw), False),
        "odin": (lambda parts, **kw: pd.ODIN(parts.model, **{"eps": 0.0014, "temperature": 1000.0, **kw}), False),
        "mds": (lambda parts, **kw: pd.Mahalanobis(parts.encoder, **kw), True),
        "rmds": (lambda parts, **kw: pd.RMD(parts.encoder, **kw), True),
        "ebo": (lambda parts, **kw: pd.EnergyBased(parts.model, **kw), False),
        "mls": (lambda parts, **kw: pd.MaxLogit(parts.model, **kw), False),
        "gen": (lambda parts, **kw: pd.GEN(parts.model, **kw), False),
        "react": (lambda parts, **kw: pd.ReAct(parts.encoder, parts.last, **{"percentile": 0.9, **kw}), True),
        "ash": (lambda parts, **kw: pd.ASH(parts.trunk, parts.head, **{"variant": "ash-s", "percentile": 0.65, **kw}), False),
        "knn": (lambda parts, **kw: pd.KNN(parts.encoder, **{"k": 50, **kw}), True),
        "vim": (lambda parts, **kw: pd.ViM(parts.encoder, w=parts.last.weight, b=parts.last.bias, **{"d": 64, **kw}), True),
        "she": (lambda parts, **kw: pd.SHE(parts.encoder, parts.last, **kw), True),
    }


NAMES = ("msp", "odin", "mds", "rmds", "ebo", "mls", "gen", "react", "ash", "knn", "vim", "she")

#: pytorch-ood class per method, and the constructor arguments this module fills from the model
_CLASSES = {"msp": "MaxSoftmax", "odin": "ODIN", "mds": "Mahalanobis", "rmds": "RMD", "ebo": "EnergyBased",
            "mls": "MaxLogit", "gen": "GEN", "react": "ReAct", "ash": "ASH", "knn": "KNN", "vim": "ViM", "she": "SHE"}
_FROM_MODEL = {"model", "encoder", "backbone", "head", "w", "b"}
#: scikit-learn NearestNeighbors arguments that KNN fixes itself (k is its own, n_jobs is -1)
_KNN_FIXED = {"n_neighbors", "radius", "n_jobs"}
#: what PytorchOOD itself takes, before the method's own parameters
_OWN = ("n_fit", "seed", "device", "batch_size")


def method_parameters(method: str) -> list[str]:
    """Every keyword parameter ``PytorchOOD(method, ...)`` accepts: its own, then those of
    pytorch-ood's class for ``method``, less those built from the model here; for ``knn``, also
    the arguments it passes on to scikit-learn's ``NearestNeighbors``. Read from the installed
    signatures, so a new pytorch-ood version cannot make this list stale."""
    import inspect

    import pytorch_ood.detector as pd

    sig = inspect.signature(getattr(pd, _CLASSES[method]).__init__).parameters
    names = [*_OWN, *(n for n, p in sig.items() if n != "self" and n not in _FROM_MODEL
                      and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))]
    if method == "knn":
        from sklearn.neighbors import NearestNeighbors

        names += [n for n in inspect.signature(NearestNeighbors.__init__).parameters if n not in {"self", *_KNN_FIXED}]
    return names


@contextlib.contextmanager
def gradients_through_no_grad():
    """Let gradients flow through code that pytorch-ood runs under ``torch.no_grad``.

    pytorch-ood decorates most ``predict`` methods with ``@torch.no_grad()``, since a defender
    never needs their gradient; an adaptive attacker differentiates through the very same code.
    While this context is open, ``torch.no_grad`` (as a decorator or a ``with`` block) leaves
    gradient tracking as it was. Not thread-safe: the patch is process-wide, for the duration.
    """
    cls = torch.no_grad
    enter, exit_ = cls.__enter__, cls.__exit__
    cls.__enter__ = lambda self: None
    cls.__exit__ = lambda self, *args: None
    try:
        yield
    finally:
        cls.__enter__, cls.__exit__ = enter, exit_


# pytorch-ood detaches the features of these methods (KNN even leaves torch for scikit-learn),
# so their differentiable scores are written here from the fitted state, formula for formula
def _mds_score(ood, z: torch.Tensor) -> torch.Tensor:
    """−max_c −½ (z − μ_c)ᵀ P (z − μ_c), pytorch-ood's Mahalanobis score."""
    f = z.view(len(z), z.size(1), -1).mean(2)
    centred = f[:, None, :] - ood.mu[None]
    return -(-0.5 * ((centred @ ood.precision) * centred).sum(-1)).max(1).values


def _knn_score(ood, z: torch.Tensor) -> torch.Tensor:
    """Distance of the normalised features to their k-th nearest fitted neighbour."""
    bank = torch.as_tensor(ood.knn._fit_X, dtype=z.dtype, device=z.device)
    dist = torch.cdist(ood._prepare(z), bank, compute_mode="donot_use_mm_for_euclid_dist")  # exact, as scikit-learn
    return dist.topk(ood.k, dim=1, largest=False).values[:, -1]


def _vim_score(ood, z: torch.Tensor) -> torch.Tensor:
    """−(energy − α‖(z − u) R‖), R the residual subspace: pytorch-ood's ViM score."""
    logits = z @ ood.w.T + ood.b
    virtual = ((z - ood.u) @ ood.principal_subspace).norm(dim=-1) * ood.alpha
    return virtual - torch.logsumexp(logits, dim=-1)


DETACHED = {"mds": _mds_score, "knn": _knn_score, "vim": _vim_score}


class Parts:
    """The frozen classifier cut where each method reads it."""

    def __init__(self, trained: models.Trained, device: torch.device):
        model = copy.deepcopy(trained.model).eval().to(device)
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model
        self.trunk, self.head = split(model, model.feature_layer)  # feature maps → logits
        self.encoder, self.last = split(model, model.penultimate_layer)  # features z → logits
        if not isinstance(self.last, nn.Sequential) or len(self.last) != 1 or not isinstance(self.last[0], nn.Linear):
            raise DetectorError("the classifier must end with one Linear layer after its penultimate layer")
        self.last = self.last[0]


class PytorchOOD(Detector):
    """One OpenOOD-family method from pytorch-ood, fitted on clean training data."""

    def __init__(self, method: str, n_fit: int | None = 10000, seed: int = 0, device: str = "auto",
                 batch_size: int = 256, **params):
        if method not in NAMES:
            raise DetectorError(f"unknown detector {method!r}; valid detectors: {', '.join(NAMES)}")
        valid = method_parameters(method)
        unknown = [k for k in params if k not in valid]
        if unknown:
            raise DetectorError(unknown_parameters(method, unknown, valid))
        super().__init__(device=device, batch_size=batch_size)
        self.name, self.method, self.n_fit, self.seed, self.params = method, method, n_fit, seed, params
        self.ood = None

    def _fit(self, trained: models.Trained, clean_train: data.Dataset, **kwargs) -> None:
        build, needs_fit = _builders()[self.method]
        parts = Parts(trained, self.device)
        try:
            self.ood = build(parts, **self.params)
        except TypeError as exc:
            raise DetectorError(f"{self.method}: {exc}") from exc
        self.ood.to(self.device)
        if needs_fit:
            train = clean_train.take(self.n_fit, self.seed)
            self.ood.fit(train.loader(batch_size=self.batch_size))

    def torch_score(self, x: torch.Tensor) -> torch.Tensor:
        r"""pytorch-ood's outlier score, differentiable in ``x``.

        ODIN's score contains a signed gradient step on the input, :math:`\hat x = x - \epsilon\,
        \mathrm{sign}(\nabla_x \mathcal L)`. The sign is piecewise constant, so its derivative is
        zero almost everywhere and :math:`\partial\hat x/\partial x = I`: the step is computed
        apart and added as a constant, which gives the exact gradient (not an approximation)."""
        if self.ood is None:
            raise DetectorError(f"{self.method}: call fit(trained, clean_train) before torch_score(x)")
        if self.method == "odin":
            from pytorch_ood.detector import odin_preprocessing

            o = self.ood
            step = odin_preprocessing(o.model, x.detach(), criterion=o.criterion, eps=o.eps, temperature=o.temperature,
                                      norm_std=o.norm_std) - x.detach()
            logits = o.model(x + step.detach()) / o.temperature
            return -logits.softmax(1).max(1).values
        if self.method in DETACHED:
            return DETACHED[self.method](self.ood, self.ood.encoder(x.float()))
        with gradients_through_no_grad():
            return self.ood.predict(x)

    def _score(self, x: torch.Tensor) -> np.ndarray:
        if self.method == "odin":  # ODIN takes a gradient step on the input
            return self.ood.predict(x).detach().cpu().numpy()
        with torch.no_grad():
            return self.ood.predict(x).cpu().numpy()
