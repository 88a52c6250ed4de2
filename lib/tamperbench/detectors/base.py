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


#: what ``score`` does with a sample it cannot judge
INVALID_POLICIES = ("raise", "suspicious")


def unknown_parameters(name: str, unknown, valid) -> str:
    """One sentence naming the unknown parameters of detector ``name``, a close valid match for
    each where there is one, and every valid parameter."""
    import difflib

    hints = [f"{k!r}" + (f" (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(k, valid, n=1)) else "")
             for k in unknown]
    return (f"{name}: unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; "
            f"valid parameters: {', '.join(valid)}")


def _validity(x: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(all values finite, all values in [0, 1]) per sample; NaN fails both."""
    flat = torch.as_tensor(x).reshape(len(x), -1).double()
    return torch.isfinite(flat).all(dim=1).numpy(), ((flat >= 0) & (flat <= 1)).all(dim=1).numpy()


def invalid_samples(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """True for each sample with a non-finite value or a value outside [0, 1]."""
    finite, in_range = _validity(x)
    return ~(finite & in_range)


def describe_invalid(x: torch.Tensor | np.ndarray, bad: np.ndarray, show: int = 5) -> str:
    """One sentence naming the bad samples and what is wrong with them."""
    finite, _ = _validity(x)
    nonfinite, out_of_range = np.flatnonzero(bad & ~finite).tolist(), np.flatnonzero(bad & finite).tolist()
    parts = []
    if nonfinite:
        parts.append(f"non-finite values (NaN or inf) in sample(s) {nonfinite[:show]}" + (" …" if len(nonfinite) > show else ""))
    if out_of_range:
        parts.append(f"values outside [0, 1] in sample(s) {out_of_range[:show]}" + (" …" if len(out_of_range) > show else ""))
    return f"{int(bad.sum())} of {len(x)} samples cannot be scored: " + "; ".join(parts)


class Detector:
    """Base class: subclasses implement ``_fit`` and ``_score``."""

    name: ClassVar[str] = ""
    supervised: ClassVar[bool] = False

    def __init__(self, device: str = "auto", batch_size: int = 256, seed: int = 0):
        self.device = models.pick_device(device)
        self.batch_size = batch_size
        self.seed = seed
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

    def score(self, x: torch.Tensor | np.ndarray, invalid: str = "raise") -> np.ndarray:
        """Suspicion scores for images ``x`` (N×C×H×W in [0, 1]); higher = more suspicious.

        Inputs come from outside, so a sample the detector cannot judge (a non-finite value, or
        a value outside [0, 1]) is refused with one error naming the bad samples
        (``invalid="raise"``), or scored +inf, the most suspicious, without reaching the model
        (``invalid="suspicious"``).
        """
        if not self.is_fitted:
            raise DetectorError(f"{self.name}: call fit(trained, clean_train) before score(x)")
        if invalid not in INVALID_POLICIES:
            raise DetectorError(f"{self.name}: unknown invalid={invalid!r}; valid: {', '.join(INVALID_POLICIES)}")
        x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
        if len(x) == 0:
            raise DetectorError(f"{self.name}: cannot score an empty input")
        expected = tuple(self.trained.input_shape)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise DetectorError(f"{self.name}: x must have shape (N, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        bad = invalid_samples(x)
        if bad.any() and invalid == "raise":
            raise DetectorError(f"{self.name}: {describe_invalid(x, bad)}; pass invalid='suspicious' to score them +inf instead")
        good = torch.from_numpy(np.flatnonzero(~bad))
        xs = x[good] if bad.any() else x
        out = np.full(len(x), np.inf)
        if len(xs):
            scored = [self._score(xs[i : i + self.batch_size].float().to(self.device)) for i in range(0, len(xs), self.batch_size)]
            out[good.numpy()] = np.concatenate(scored).astype(np.float64)
        return out

    def torch_score(self, x: torch.Tensor) -> torch.Tensor:
        """The suspicion score as a differentiable function of ``x`` (N×C×H×W on the detector's
        device), for adaptive attacks. Detectors whose score has no useful gradient do not
        define it: an attack on them needs a surrogate (:mod:`tamperbench.adaptive`)."""
        raise DetectorError(f"{self.name or type(self).__name__} has no differentiable score: attack it through a "
                            "surrogate or a gradient-free attack")

    def _fit(self, trained: models.Trained, clean_train: data.Dataset, **kwargs) -> None:
        raise NotImplementedError

    def _score(self, x: torch.Tensor) -> np.ndarray:
        raise NotImplementedError


def split(model: torch.nn.Sequential, layer: str) -> tuple[torch.nn.Sequential, torch.nn.Sequential]:
    """(the model up to and including ``layer``, the rest) for a classifier of named blocks."""
    from collections import OrderedDict

    names = [n for n, _ in model.named_children()]
    if layer not in names:
        raise DetectorError(f"unknown layer {layer!r}; valid layers: {', '.join(names)}")
    children = list(model.named_children())
    i = names.index(layer) + 1
    return torch.nn.Sequential(OrderedDict(children[:i])), torch.nn.Sequential(OrderedDict(children[i:]))


def hooked_batches(model: torch.nn.Module, x: torch.Tensor, layers, device, batch_size: int = 512):
    """Yield ``({layer: block output}, logits)`` for each batch of ``x``: one forward pass reads
    every named block in ``layers`` through forward hooks (removed when the loop ends)."""
    layers = list(layers)
    names = [n for n, _ in model.named_children()]
    for layer in layers:
        if layer not in names:
            raise DetectorError(f"unknown layer {layer!r}; valid layers: {', '.join(names)}")
    current: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(layer).register_forward_hook(lambda m, i, o, name=layer: current.__setitem__(name, o))
             for layer in layers]
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                logits = model(torch.as_tensor(x[i : i + batch_size]).float().to(device))
                yield {layer: current[layer] for layer in layers}, logits
    finally:
        for h in hooks:
            h.remove()


def layer_outputs(model: torch.nn.Module, x: torch.Tensor, layers: list[str], device, pool: bool = False,
                  batch_size: int = 512) -> dict[str, torch.Tensor]:
    """Outputs of the named blocks ``layers`` for ``x`` (N×D each: flattened, or spatially
    averaged when ``pool``), on the CPU."""
    out: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
    for outputs, _ in hooked_batches(model, x, layers, device, batch_size):
        for layer, o in outputs.items():
            out[layer].append((o.mean((-2, -1)) if pool and o.dim() == 4 else o.flatten(1)).cpu())
    return {layer: torch.cat(v) for layer, v in out.items()}


def noisy_copies(x_clean: np.ndarray, x_adv: np.ndarray, seed: int = 0) -> np.ndarray:
    """Each clean image plus Gaussian noise of the same L2 norm as its adversarial perturbation,
    clipped to [0, 1]: the papers' "noisy" negatives (Feinman et al. 2017; Ma et al. 2018)."""
    x_clean, x_adv = np.asarray(x_clean, dtype=np.float32), np.asarray(x_adv, dtype=np.float32)
    noise = np.random.default_rng(seed).standard_normal(x_clean.shape).astype(np.float32)
    flat = lambda a: a.reshape(len(a), -1)  # noqa: E731
    scale = np.linalg.norm(flat(x_adv - x_clean), axis=1) / np.maximum(np.linalg.norm(flat(noise), axis=1), 1e-12)
    return np.clip(x_clean + noise * scale.reshape(-1, *([1] * (x_clean.ndim - 1))), 0.0, 1.0)


class SupervisedDetector(Detector):
    """A detector whose final stage is a logistic regression on clean vs adversarial examples.

    ``fit(trained, clean_train, x_clean=…, x_adv=…)``: the features are built from the clean
    training data, the regression from the given clean/adversarial pairs (an attack split kept
    apart from the evaluation). As in the papers, the negatives are the clean images *and* noisy
    copies of them (Gaussian noise of the adversarial perturbation's L2 norm), so that the
    regression learns "adversarial", not merely "perturbed" (``noisy_negatives=False`` drops them).
    """

    supervised = True

    def __init__(self, noisy_negatives: bool = True, **kw):
        super().__init__(**kw)
        if not isinstance(noisy_negatives, bool):
            raise DetectorError(f"{self.name}: noisy_negatives must be true or false, got {noisy_negatives!r}")
        self.noisy_negatives = noisy_negatives

    def _features(self, x: torch.Tensor) -> np.ndarray:
        raise NotImplementedError

    def _fit_unsupervised(self, trained: models.Trained, clean_train: data.Dataset) -> None:
        raise NotImplementedError

    def _fit(self, trained, clean_train, x_clean=None, x_adv=None, **kwargs) -> None:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        if x_clean is None or x_adv is None or len(x_clean) == 0 or len(x_adv) == 0:
            raise DetectorError(f"{self.name} is supervised: fit(trained, clean_train, x_clean=..., x_adv=...) needs adversarial examples")
        self.trained = trained  # the feature functions below need the model
        self._fit_unsupervised(trained, clean_train)
        negatives = [np.asarray(x_clean)]
        if self.noisy_negatives:
            negatives.append(noisy_copies(x_clean, x_adv, self.seed))
        x_neg = np.concatenate(negatives)
        feats = np.concatenate([self._features(torch.as_tensor(x_neg)), self._features(torch.as_tensor(x_adv))])
        labels = np.r_[np.zeros(len(x_neg)), np.ones(len(x_adv))]
        self.regression = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(feats, labels)

    def _score(self, x: torch.Tensor) -> np.ndarray:
        return self.regression.decision_function(self._features(x))

    def torch_features(self, x: torch.Tensor) -> torch.Tensor:
        """The regression's features as a differentiable function of ``x`` (where defined)."""
        return Detector.torch_score(self, x)  # the base class's "no differentiable score" error

    def torch_score(self, x: torch.Tensor) -> torch.Tensor:
        """The regression's decision function (standardise, then linear) on :meth:`torch_features`."""
        feats = self.torch_features(x)
        scaler, logistic = self.regression[0], self.regression[-1]
        as_t = lambda a: torch.as_tensor(a, dtype=feats.dtype, device=feats.device)  # noqa: E731
        return ((feats - as_t(scaler.mean_)) / as_t(scaler.scale_)) @ as_t(logistic.coef_[0]) + float(logistic.intercept_[0])
