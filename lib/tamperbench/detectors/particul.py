r"""PARTICUL: part detectors with a calibrated confidence (Xu-Darme et al., ICPR-W 2022; CODE,
SAFECOMP-W 2023), built as a CaBRNet model.

A frozen classifier gives a feature map :math:`F \in \mathbb{R}^{D\times H\times W}` at a chosen
layer. For each class :math:`c` there are :math:`P` detectors :math:`w_{c,p}\in\mathbb{R}^D`
(1×1 convolutions, no bias): :math:`A_{c,p} = \langle w_{c,p}, F(h,w)\rangle`, an H×W map.

**Training** (detectors only; the classifier stays frozen, in eval mode). With
:math:`S_{c,p} = \mathrm{softmax}_{h,w}(A_{c,p})` and the maps of each sample's own class
:math:`y`:

- locality: :math:`\mathcal{L}_l = -\frac1{NP}\sum_{n,p}\max_{h,w}(S_{y,p} * \mathbf{1}_{k\times k})`;
- unicity: :math:`\mathcal{L}_u = \frac1N\sum_n \mathrm{ReLU}(\max_{h,w}\sum_p S_{y,p} - 1)`;
- clustering (optional): :math:`\mathcal{L}_c = \frac1N\sum_n\mathrm{ReLU}(\max_{h,w} (U * K_{edge}))`
  with :math:`U=\sum_p S_{y,p}` and :math:`K_{edge}` the 3×3 kernel of −1 with +1 at its centre;
- :math:`\mathcal{L} = \mathcal{L}_l + \lambda_u\mathcal{L}_u + \lambda_c\mathcal{L}_c`, RMSprop.

**Calibration.** On the training images of class :math:`c`, the raw maxima
:math:`m_{c,p} = \max_{h,w}A_{c,p}` are fitted by a logistic distribution
:math:`(\mu_{c,p}, s_{c,p})`. A detector's confidence is the logistic CDF
:math:`\sigma((m_{c,p}-\mu_{c,p})/s_{c,p})`; a class's is the mean over its detectors.

**Image confidence** (``mode``): ``categorical`` :math:`\sum_c \mathrm{softmax}(z)_c\,\mathrm{conf}_c`
(default), ``argmax`` :math:`\mathrm{conf}_{\arg\max z}`, or ``mean`` over classes. The
suspicion score is :math:`1 - \mathrm{confidence}`: higher is more suspicious.

Defaults follow the published setup: P = 4, k = 3, λ_u = 1, λ_c = 0, lr 5·10⁻⁴, weight decay
10⁻⁵.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from cabrnet.archs.generic.decision import CaBRNetClassifier
from cabrnet.archs.generic.model import CaBRNet
from cabrnet.core.utils.similarities import SimilarityLayer

from .. import atomic, cache, data, models
from ..attacks import model_digest
from .base import Detector, DetectorError, split

MODES = ("categorical", "argmax", "mean")
VERSION = 1


# --------------------------------------------------------------------------- pure functions
def normalise(maps: torch.Tensor) -> torch.Tensor:
    """Softmax over the spatial positions of each map (…×H×W)."""
    return maps.flatten(-2).softmax(-1).view_as(maps)


def locality_loss(norm_maps: torch.Tensor, kernel_size: int = 3) -> torch.Tensor:
    """−mean over samples and detectors of the max of the k×k box-filtered normalised maps (N×P×H×W)."""
    p = norm_maps.shape[1]
    box = torch.ones(p, 1, kernel_size, kernel_size, dtype=norm_maps.dtype, device=norm_maps.device)
    boxed = F.conv2d(norm_maps, box, padding=kernel_size // 2, groups=p)
    return -boxed.flatten(2).max(-1).values.mean()


def unicity_loss(norm_maps: torch.Tensor) -> torch.Tensor:
    """Mean over samples of ReLU(max over positions of the summed maps − 1)."""
    return F.relu(norm_maps.sum(1).flatten(1).max(-1).values - 1).mean()


def clustering_loss(norm_maps: torch.Tensor) -> torch.Tensor:
    """Mean over samples of ReLU(max of the 3×3 edge-filtered summed map)."""
    edge = -torch.ones(1, 1, 3, 3, dtype=norm_maps.dtype, device=norm_maps.device)
    edge[..., 1, 1] = 1.0
    return F.relu(F.conv2d(norm_maps.sum(1, keepdim=True), edge, padding=1).flatten(1).max(-1).values).mean()


def fit_logistic(values: np.ndarray) -> tuple[float, float]:
    """Maximum-likelihood logistic fit (location μ, scale s) of a 1-D sample."""
    from scipy.stats import logistic

    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2 or np.ptp(values) == 0:
        return float(values.mean()) if len(values) else 0.0, 1.0
    loc, scale = logistic.fit(values)
    return float(loc), float(max(scale, 1e-6))


def logistic_confidence(maxima: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The logistic CDF σ((m − μ)/s), elementwise."""
    return torch.sigmoid((maxima - loc) / scale)


def image_confidence(class_conf: torch.Tensor, logits: torch.Tensor, mode: str = "categorical") -> torch.Tensor:
    """Combine per-class confidences (N×C) into one per image, weighted by the classifier."""
    if mode == "categorical":
        return (logits.softmax(1) * class_conf).sum(1)
    if mode == "argmax":
        return class_conf.gather(1, logits.argmax(1, keepdim=True)).squeeze(1)
    if mode == "mean":
        return class_conf.mean(1)
    raise DetectorError(f"unknown PARTICUL mode {mode!r}; valid modes: {', '.join(MODES)}")


# --------------------------------------------------------------------------- CaBRNet model
class DotProductSimilarity(SimilarityLayer):
    """PARTICUL's similarity: the 1×1 convolution ⟨w_p, F(h, w)⟩ (distance = its negative)."""

    def similarities(self, features, prototypes, **kwargs):
        return F.conv2d(features, prototypes)

    def distances(self, features, prototypes, **kwargs):
        return -self.similarities(features, prototypes)

    def distances_to_similarities(self, distances, **kwargs):
        return -distances


class Trunk(nn.Module):
    """The frozen classifier up to the feature layer, as a CaBRNet extractor (which receives kwargs)."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x, **kwargs):
        return self.body(x)


class ParticulDecision(CaBRNetClassifier):
    """CaBRNet decision module of PARTICUL: C×P detectors are the prototypes (C·P × D × 1 × 1).

    It also holds the frozen rest of the classifier (``head``): PARTICUL weighs each class's
    confidence by the classifier's own probabilities, so scoring needs the logits too.
    ``forward`` returns ``(logits, raw part maps N×C×P×H×W)``.
    """

    def __init__(self, num_classes: int, num_features: int, num_parts: int, head: nn.Module):
        super().__init__(num_classes=num_classes, num_features=num_features)
        self.num_parts = num_parts
        protos = torch.empty(num_classes * num_parts, num_features, 1, 1)
        nn.init.kaiming_uniform_(protos, a=math.sqrt(5))  # a 1×1 Conv2d's default initialisation
        self.prototypes = nn.Parameter(protos)
        self.similarity_layer = DotProductSimilarity()
        self.head = head
        self.register_buffer("calibration_loc", torch.zeros(num_classes, num_parts))
        self.register_buffer("calibration_scale", torch.ones(num_classes, num_parts))

    @property
    def prototype_class_mapping(self) -> np.ndarray:
        mapping = np.zeros((self.num_prototypes, self.num_classes))
        mapping[np.arange(self.num_prototypes), np.arange(self.num_prototypes) // self.num_parts] = 1
        return mapping

    def part_maps(self, features: torch.Tensor) -> torch.Tensor:
        a = self.similarities(features)
        return a.view(len(a), self.num_classes, self.num_parts, *a.shape[-2:])

    def forward(self, features, **kwargs):
        return self.head(features), self.part_maps(features)

    def class_confidence(self, maps: torch.Tensor) -> torch.Tensor:
        """Per-class confidence (N×C): mean over the class's detectors of the logistic CDF."""
        maxima = maps.flatten(-2).max(-1).values
        return logistic_confidence(maxima, self.calibration_loc, self.calibration_scale).mean(-1)


def build_cabrnet(trained: models.Trained, layer: str, num_parts: int) -> CaBRNet:
    # a copy: freezing must not touch the study's classifier, which other chapters train against
    trunk, head = split(copy.deepcopy(trained.model), layer)
    with torch.no_grad():
        d = trunk(torch.zeros(1, *trained.input_shape, device=next(trunk.parameters()).device)).shape[1]
    for p in list(trunk.parameters()) + list(head.parameters()):
        p.requires_grad_(False)  # frozen: CaBRNet's train() then keeps their BatchNorms in eval mode
    net = CaBRNet(Trunk(trunk), ParticulDecision(trained.num_classes, d, num_parts, head))
    return net.eval()


# --------------------------------------------------------------------------- the detector
class Particul(Detector):
    """PARTICUL on the frozen classifier; ``score`` = 1 − image confidence."""

    name = "particul"

    def __init__(self, num_parts: int = 4, kernel_size: int = 3, unicity_weight: float = 1.0,
                 clustering_weight: float = 0.0, lr: float = 5e-4, weight_decay: float = 1e-5,
                 epochs: int = 30, train_batch_size: int = 64, n_fit: int | None = None,
                 layer: str | None = None, mode: str = "categorical", seed: int = 0, **kw):
        super().__init__(**kw)
        for key, value in (("num_parts", num_parts), ("kernel_size", kernel_size), ("epochs", epochs), ("train_batch_size", train_batch_size)):
            if not isinstance(value, int) or value < 1:
                raise DetectorError(f"particul: {key} must be an int ≥ 1, got {value!r}")
        if kernel_size % 2 == 0:
            raise DetectorError(f"particul: kernel_size must be odd, got {kernel_size}")
        if mode not in MODES:
            raise DetectorError(f"unknown PARTICUL mode {mode!r}; valid modes: {', '.join(MODES)}")
        self.params = dict(num_parts=num_parts, kernel_size=kernel_size, unicity_weight=float(unicity_weight),
                           clustering_weight=float(clustering_weight), lr=float(lr), weight_decay=float(weight_decay),
                           epochs=epochs, train_batch_size=train_batch_size, n_fit=n_fit, layer=layer, seed=seed)
        self.mode = mode
        self.net: CaBRNet | None = None
        self.history: list[dict] = []
        self.fit_seconds = 0.0
        self.from_cache = False

    @property
    def decision(self) -> ParticulDecision:
        return self.net.classifier

    # ---- fitting
    def _features(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([self.net.extractor(x[i : i + 512].to(self.device)) for i in range(0, len(x), 512)])

    def _fit(self, trained: models.Trained, clean_train: data.Dataset, **kwargs) -> None:
        layer = self.params["layer"] or trained.model.feature_layer
        self.params["layer"] = layer
        train = clean_train.take(self.params["n_fit"], self.params["seed"])
        torch.manual_seed(self.params["seed"])
        self.net = build_cabrnet(trained, layer, self.params["num_parts"]).to(self.device)
        key = {"detector": self.name, "version": VERSION, **self.params, "model": model_digest(trained.model),
               "data": cache.content_key(train.provenance) + f"/{len(train)}"}
        hit = cache.load("detector", key)
        if hit is not None:
            self.decision.load_state_dict(hit["decision"])
            self.history, self.fit_seconds, self.from_cache = hit["history"], hit["fit_seconds"], True
            return
        start = time.perf_counter()
        feats = self._features(train.x)  # the backbone is frozen: compute its features once
        self._train_detectors(feats, train.y.to(self.device))
        self._calibrate(feats, train.y.to(self.device))
        self.fit_seconds = time.perf_counter() - start
        self.from_cache = False
        state = {k: v.detach().cpu() for k, v in self.decision.state_dict().items()}
        cache.save("detector", key, {"decision": state, "history": self.history, "fit_seconds": self.fit_seconds})

    def losses(self, feats: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss terms on features ``feats`` of samples of classes ``y``."""
        dec, p = self.decision, self.params
        w = dec.prototypes.view(dec.num_classes, dec.num_parts, -1)[y]  # each sample's own class (N×P×D)
        norm_maps = normalise(torch.einsum("ndhw,npd->nphw", feats, w))
        terms = {"locality": locality_loss(norm_maps, p["kernel_size"]), "unicity": unicity_loss(norm_maps)}
        terms["clustering"] = clustering_loss(norm_maps) if p["clustering_weight"] else torch.zeros((), device=feats.device)
        terms["total"] = terms["locality"] + p["unicity_weight"] * terms["unicity"] + p["clustering_weight"] * terms["clustering"]
        return terms

    def _train_detectors(self, feats: torch.Tensor, y: torch.Tensor) -> None:
        p = self.params
        opt = torch.optim.RMSprop([self.decision.prototypes], lr=p["lr"], weight_decay=p["weight_decay"])
        gen = torch.Generator().manual_seed(p["seed"])
        self.history = []
        for epoch in range(p["epochs"]):
            order = torch.randperm(len(y), generator=gen).to(y.device)
            sums, n = {}, 0
            for i in range(0, len(y), p["train_batch_size"]):
                idx = order[i : i + p["train_batch_size"]]
                terms = self.losses(feats[idx], y[idx])
                opt.zero_grad(set_to_none=True)
                terms["total"].backward()
                opt.step()
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * len(idx)
                n += len(idx)
            self.history.append({"epoch": epoch + 1, **{k: v / n for k, v in sums.items()}})

    def _calibrate(self, feats: torch.Tensor, y: torch.Tensor) -> None:
        """Fit a logistic to each (class, detector)'s raw maxima over that class's training images."""
        dec = self.decision
        with torch.no_grad():
            maxima = torch.cat([dec.part_maps(feats[i : i + 512]).flatten(-2).max(-1).values for i in range(0, len(feats), 512)])
        loc, scale = torch.zeros(dec.num_classes, dec.num_parts), torch.ones(dec.num_classes, dec.num_parts)
        for c in range(dec.num_classes):
            for j in range(dec.num_parts):
                loc[c, j], scale[c, j] = fit_logistic(maxima[y == c, c, j].cpu().numpy())
        dec.calibration_loc.copy_(loc)
        dec.calibration_scale.copy_(scale)

    # ---- scoring
    def confidence(self, x: torch.Tensor, mode: str | None = None) -> np.ndarray:
        """Image-level in-distribution confidence in [0, 1] (1 − the suspicion score)."""
        return 1.0 - self._with_mode(mode, x)

    def _with_mode(self, mode, x):
        saved, self.mode = self.mode, mode or self.mode
        try:
            return self.score(x)
        finally:
            self.mode = saved

    def _score(self, x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            logits, maps = self.net(x)
            conf = image_confidence(self.decision.class_confidence(maps), logits, self.mode)
        return (1.0 - conf).cpu().numpy()

    def maxima(self, x: torch.Tensor) -> np.ndarray:
        """Raw maxima of every detector's map (N×C×P), the values calibration fits."""
        out = []
        with torch.no_grad():
            for i in range(0, len(x), self.batch_size):
                _, maps = self.net(torch.as_tensor(x[i : i + self.batch_size]).float().to(self.device))
                out.append(maps.flatten(-2).max(-1).values.cpu())
        return torch.cat(out).numpy()

    def part_maps(self, x: torch.Tensor, upsample: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(raw part maps of the predicted class, P×H×W per image, bilinear-upsampled to the
        image size when ``upsample``; the predicted classes)."""
        with torch.no_grad():
            logits, maps = self.net(torch.as_tensor(x).float().to(self.device))
            pred = logits.argmax(1)
            own = maps[torch.arange(len(pred)), pred]
            if upsample:
                own = F.interpolate(own, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
        return own.cpu().numpy(), pred.cpu().numpy()

    # ---- CaBRNet checkpoint layout
    def save(self, folder: str | Path) -> Path:
        """Write ``model_arch.yml`` and ``model_state.pth`` (CaBRNet's file names) atomically."""
        if not self.is_fitted:
            raise DetectorError("particul: fit before save")
        folder = Path(folder)
        dec = self.decision
        # CaBRNet's own build_from_config only builds torchvision backbones; ours is the study's
        # classifier trunk, so the arch file names it and our load() rebuilds it.
        arch = {
            "extractor": {"backbone": {"arch": self.trained.params.get("model", type(self.trained.model).__name__),
                                       "layer": self.params["layer"], "frozen": True,
                                       "classifier_params": dict(self.trained.params)}},
            "classifier": {"module": __name__, "name": "ParticulDecision",
                           "params": {"num_classes": dec.num_classes, "num_features": dec.num_features,
                                      "num_parts": dec.num_parts},
                           "similarity": {"module": __name__, "name": "DotProductSimilarity"}},
            "particul": {**self.params, "mode": self.mode},
        }
        atomic.write_text(folder / CaBRNet.DEFAULT_MODEL_CONFIG, yaml.safe_dump(arch, sort_keys=False))
        with atomic.atomic_path(folder / CaBRNet.DEFAULT_MODEL_STATE) as tmp:
            torch.save({k: v.detach().cpu() for k, v in self.net.state_dict().items()}, tmp)
        return folder

    @classmethod
    def load(cls, folder: str | Path, trained: models.Trained, device: str = "auto") -> "Particul":
        """Rebuild a saved PARTICUL on ``trained`` (whose weights the checkpoint must match)."""
        folder = Path(folder)
        arch = yaml.safe_load((folder / CaBRNet.DEFAULT_MODEL_CONFIG).read_text())
        params = dict(arch["particul"])
        mode = params.pop("mode")
        det = cls(mode=mode, device=device, **params)
        det.net = build_cabrnet(trained, params["layer"], params["num_parts"]).to(det.device)
        state = torch.load(folder / CaBRNet.DEFAULT_MODEL_STATE, map_location=det.device, weights_only=True)
        det.net.load_state_dict(state)
        det.trained = trained
        return det
