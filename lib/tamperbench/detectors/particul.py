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

**Training protocol** (the authors' code): detectors initialised Xavier-normal; a clean
validation split is held out of the training data, the loss is measured on it after every epoch
and the checkpoint with the lowest validation loss is the one kept and calibrated.

Defaults follow the published setup: P = 4, k = 3, λ_u = 1, λ_c = 0, RMSprop with lr 5·10⁻⁴
and weight decay 10⁻⁵, batch 128, on the model's ``particul_layer`` (LeNet's second block in the
authors' MNIST runs; ``block2`` of the study's SmallCNN).
"""

from __future__ import annotations

import copy
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
from .base import Detector, DetectorError, hooked_batches, split

MODES = ("categorical", "argmax", "mean")
VERSION = 4  # 2: Xavier-normal initialisation, best-validation checkpoint, snapshots; 3: faster losses;
# 4: Xavier-normal per detector (fan-out 1), as the authors


# --------------------------------------------------------------------------- pure functions
def normalise(maps: torch.Tensor) -> torch.Tensor:
    """Softmax over the spatial positions of each map (…×H×W)."""
    return maps.flatten(-2).softmax(-1).view_as(maps)


def locality_loss(norm_maps: torch.Tensor, kernel_size: int = 3) -> torch.Tensor:
    """−mean over samples and detectors of the max of the k×k box-filtered normalised maps (N×P×H×W)."""
    # the k×k box sum with zero padding, as k vertical then k horizontal shifted sums (on a CPU
    # several times faster than a grouped convolution or an average pool on maps this small)
    h, w, r = norm_maps.shape[-2], norm_maps.shape[-1], kernel_size // 2
    padded = F.pad(norm_maps, (r, r, r, r))
    rows = sum(padded[..., i : i + h, :] for i in range(kernel_size))
    boxed = sum(rows[..., j : j + w] for j in range(kernel_size))
    return -boxed.flatten(2).amax(-1).mean()


def unicity_loss(norm_maps: torch.Tensor) -> torch.Tensor:
    """Mean over samples of ReLU(max over positions of the summed maps − 1)."""
    return F.relu(norm_maps.sum(1).flatten(1).amax(-1) - 1).mean()


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


def confidence_in_mode(det: Detector, x, mode: str | None) -> np.ndarray:
    """1 − ``det``'s score of ``x`` with its aggregation ``mode`` set for this call only."""
    saved, det.mode = det.mode, mode or det.mode
    try:
        return 1.0 - det.score(x)
    finally:
        det.mode = saved


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
        # The authors' detectors are one Conv2d(D, 1, 1) each, Xavier-normal initialised one by one:
        # fan-in D, fan-out 1, std √(2/(D+1)). One xavier_normal_ on the whole (C·P)×D tensor would
        # count C·P as the fan-out and start 0.7-0.9× as wide; each row is initialised on its own.
        protos = torch.empty(num_classes * num_parts, num_features, 1, 1)
        for row in protos:
            nn.init.xavier_normal_(row.unsqueeze(0))
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
        maxima = maps.flatten(-2).amax(-1)
        return logistic_confidence(maxima, self.calibration_loc, self.calibration_scale).mean(-1)

    def confidence_maps(self, maps: torch.Tensor) -> torch.Tensor:
        """The logistic CDF at every position (N×C×P×H×W, in [0, 1]): one calibrated scale for
        every map, whose peak is the detector's confidence."""
        return logistic_confidence(maps, self.calibration_loc[..., None, None], self.calibration_scale[..., None, None])


def build_cabrnet(trained: models.Trained, layer: str, num_parts: int) -> CaBRNet:
    # a copy: freezing must not touch the study's classifier, which other chapters train against
    trunk, head = split(copy.deepcopy(trained.model), layer)
    with torch.no_grad():
        d = trunk(torch.zeros(1, *trained.input_shape, device=next(trunk.parameters()).device)).shape[1]
    for p in list(trunk.parameters()) + list(head.parameters()):
        p.requires_grad_(False)  # frozen: CaBRNet's train() then keeps their BatchNorms in eval mode
    net = CaBRNet(Trunk(trunk), ParticulDecision(trained.num_classes, d, num_parts, head))
    return net.eval()


# --------------------------------------------------------------------------- data helpers
def split_fit_validation(n: int, n_fit: int | None, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit indices, validation indices) into a training set of ``n`` images, disjoint.

    The validation split is ``val_fraction`` of the images PARTICUL uses (fit + validation),
    at least one: with ``n_fit=None`` every image is used. Both come from one seeded permutation.
    """
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(val_fraction * n))
    if n_fit is not None:  # a fraction of fit + validation, never more than of the whole set
        n_val = min(n_val, int(round(val_fraction / (1 - val_fraction) * n_fit)))
    n_val = max(1, n_val)
    if n_val >= n:
        raise DetectorError(f"particul: val_fraction {val_fraction} leaves no image to fit on ({n} images)")
    rest = perm[n_val:]
    fit = rest if n_fit is None else rest[:n_fit]
    return np.sort(fit), np.sort(perm[:n_val])


def receptive_box(extractor: nn.Module, input_shape: tuple, h: int, w: int, device="cpu", probes: int = 8):
    """(top, left, bottom, right) of the input pixels that feature position (h, w) depends on:
    where the gradient of that position is non-zero, on a few random probe images."""
    x = torch.rand(probes, *input_shape, generator=torch.Generator().manual_seed(0)).to(device).requires_grad_(True)
    extractor(x)[:, :, h, w].sum().backward()
    rows, cols = torch.nonzero(x.grad.abs().sum((0, 1)) > 0, as_tuple=True)
    if len(rows) == 0:
        return (0, 0, input_shape[-2], input_shape[-1])
    return (int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1)


def backbone_outputs(model: nn.Module, x: torch.Tensor, layers, device, batch_size: int = 512):
    """(``{layer: N×D×H×W}`` block outputs, N×C logits) of ``model`` on ``x``, in one pass, on ``device``."""
    out: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
    logits = []
    for outputs, batch_logits in hooked_batches(model, x, layers, device, batch_size):
        logits.append(batch_logits)
        for layer, o in outputs.items():
            out[layer].append(o)
    return {layer: torch.cat(v) for layer, v in out.items()}, torch.cat(logits)


# --------------------------------------------------------------------------- the detector
class Particul(Detector):
    """PARTICUL on the frozen classifier; ``score`` = 1 − image confidence.

    ``snapshot_epochs``: epochs after which the best-validation checkpoint so far is also
    calibrated and kept (``snapshot(e)``): what a training of ``e`` epochs gives, for free.
    """

    name = "particul"

    def __init__(self, num_parts: int = 4, kernel_size: int = 3, unicity_weight: float = 1.0,
                 clustering_weight: float = 0.0, lr: float = 5e-4, weight_decay: float = 1e-5,
                 epochs: int = 30, train_batch_size: int = 128, n_fit: int | None = None,
                 val_fraction: float = 0.1, snapshot_epochs=(), layer: str | None = None,
                 mode: str = "categorical", seed: int = 0, **kw):
        super().__init__(**kw)
        for key, value in (("num_parts", num_parts), ("kernel_size", kernel_size), ("epochs", epochs), ("train_batch_size", train_batch_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise DetectorError(f"particul: {key} must be an int ≥ 1, got {value!r}")
        if kernel_size % 2 == 0:
            raise DetectorError(f"particul: kernel_size must be odd, got {kernel_size}")
        if mode not in MODES:
            raise DetectorError(f"unknown PARTICUL mode {mode!r}; valid modes: {', '.join(MODES)}")
        if not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
            raise DetectorError(f"particul: val_fraction must be a number in (0, 1), got {val_fraction!r}")
        if n_fit is not None and (not isinstance(n_fit, int) or n_fit < 1):
            raise DetectorError(f"particul: n_fit must be an int ≥ 1 or None, got {n_fit!r}")
        if not isinstance(snapshot_epochs, (list, tuple)) or not all(isinstance(e, int) and 1 <= e <= epochs for e in snapshot_epochs):
            raise DetectorError(f"particul: snapshot_epochs must be a list of epochs in 1..{epochs}, got {snapshot_epochs!r}")
        snapshot_epochs = sorted({e for e in snapshot_epochs if e < epochs})  # the last epoch is the detector itself
        self.params = dict(num_parts=num_parts, kernel_size=kernel_size, unicity_weight=float(unicity_weight),
                           clustering_weight=float(clustering_weight), lr=float(lr), weight_decay=float(weight_decay),
                           epochs=epochs, train_batch_size=train_batch_size, n_fit=n_fit,
                           val_fraction=float(val_fraction), snapshot_epochs=snapshot_epochs, layer=layer, seed=seed)
        self.mode = mode
        self.net: CaBRNet | None = None
        self.history: list[dict] = []
        self.best_epoch = 0
        self.snapshots: dict[int, dict] = {}
        self.fit_seconds = 0.0
        self.from_cache = False
        self.fit_indices = self.val_indices = np.zeros(0, dtype=int)

    @property
    def decision(self) -> ParticulDecision:
        return self.net.classifier

    @property
    def layer(self) -> str:
        return self.params["layer"]

    # ---- fitting
    def _features(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([self.net.extractor(x[i : i + 512].to(self.device)) for i in range(0, len(x), 512)])

    def cache_key(self, trained: models.Trained, clean_train: data.Dataset) -> dict:
        layer = self.params["layer"] or getattr(trained.model, "particul_layer", trained.model.feature_layer)
        return {"detector": self.name, "version": VERSION, **self.params, "layer": layer,
                "model": model_digest(trained.model),
                "data": cache.content_key(clean_train.provenance) + f"/{len(clean_train)}"}

    def is_cached(self, trained: models.Trained, clean_train: data.Dataset) -> bool:
        return cache.cache_path("detector", self.cache_key(trained, clean_train)).exists()

    def used_indices(self, n: int) -> np.ndarray:
        """The training images this detector reads (fit and validation), sorted."""
        fit, val = split_fit_validation(n, self.params["n_fit"], self.params["val_fraction"], self.params["seed"])
        return np.union1d(fit, val)

    def _fit(self, trained: models.Trained, clean_train: data.Dataset, features: tuple | None = None,
             **kwargs) -> None:
        """Fit on ``clean_train``. ``features``: (sorted training indices, their block outputs at
        the layer), when already computed; they must cover ``used_indices``."""
        key = self.cache_key(trained, clean_train)
        self.params["layer"] = key["layer"]
        p = self.params
        self.fit_indices, self.val_indices = split_fit_validation(len(clean_train), p["n_fit"], p["val_fraction"], p["seed"])
        with torch.random.fork_rng(devices=[]):  # the detectors' initialisation leaves the global RNG alone
            torch.manual_seed(p["seed"])
            self.net = build_cabrnet(trained, p["layer"], p["num_parts"]).to(self.device)
        hit = cache.load("detector", key)
        if hit is not None:
            self.decision.load_state_dict(hit["decision"])
            self.history, self.fit_seconds, self.from_cache = hit["history"], hit["fit_seconds"], True
            self.best_epoch, self.snapshots = hit["best_epoch"], {int(k): v for k, v in hit["snapshots"].items()}
            return
        start = time.perf_counter()
        # the backbone is frozen: its features are computed once
        if features is None:
            used = np.union1d(self.fit_indices, self.val_indices)
            features = (used, self._features(clean_train.x[torch.from_numpy(used)]))
        used, feats = features
        fit_pos, val_pos = (torch.from_numpy(np.searchsorted(used, i)) for i in (self.fit_indices, self.val_indices))
        y = clean_train.y
        fit_feats, fit_y = feats[fit_pos].to(self.device), y[self.fit_indices].to(self.device)
        val_feats, val_y = feats[val_pos].to(self.device), y[self.val_indices].to(self.device)
        self.snapshots = self._train_detectors(fit_feats, fit_y, val_feats, val_y)
        self._calibrate(fit_feats, fit_y)
        self.fit_seconds = time.perf_counter() - start
        self.from_cache = False
        state = {k: v.detach().cpu() for k, v in self.decision.state_dict().items()}
        cache.save("detector", key, {"decision": state, "history": self.history, "fit_seconds": self.fit_seconds,
                                     "best_epoch": self.best_epoch, "snapshots": {str(k): v for k, v in self.snapshots.items()}})

    def own_class_maps(self, feats: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Raw maps of each sample's own class's detectors only (N×P×H×W)."""
        dec = self.decision
        w = dec.prototypes.view(dec.num_classes, dec.num_parts, -1)[y]  # N×P×D
        return torch.einsum("ndhw,npd->nphw", feats, w)

    def losses(self, feats: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss terms on features ``feats`` of samples of classes ``y``."""
        p = self.params
        norm_maps = normalise(self.own_class_maps(feats, y))
        terms = {"locality": locality_loss(norm_maps, p["kernel_size"]), "unicity": unicity_loss(norm_maps)}
        terms["clustering"] = clustering_loss(norm_maps) if p["clustering_weight"] else torch.zeros((), device=feats.device)
        terms["total"] = terms["locality"] + p["unicity_weight"] * terms["unicity"] + p["clustering_weight"] * terms["clustering"]
        return terms

    def _mean_losses(self, feats: torch.Tensor, y: torch.Tensor, batch: int = 1024) -> dict[str, float]:
        sums: dict[str, float] = {}
        with torch.no_grad():
            for i in range(0, len(y), batch):
                for k, v in self.losses(feats[i : i + batch], y[i : i + batch]).items():
                    sums[k] = sums.get(k, 0.0) + float(v) * len(y[i : i + batch])
        return {k: v / len(y) for k, v in sums.items()}

    def _train_detectors(self, feats, y, val_feats, val_y) -> dict[int, dict]:
        """RMSprop on the detectors; keeps the lowest-validation-loss checkpoint (and, at each
        snapshot epoch, the best one so far, calibrated later). Returns the snapshots."""
        p = self.params
        protos = self.decision.prototypes
        opt = torch.optim.RMSprop([protos], lr=p["lr"], weight_decay=p["weight_decay"])
        gen = torch.Generator().manual_seed(p["seed"])
        self.history, best_loss, best_state, steps, kept = [], float("inf"), protos.detach().clone(), 0, {}
        for epoch in range(1, p["epochs"] + 1):
            order = torch.randperm(len(y), generator=gen).to(y.device)
            sums, n = {}, 0
            for i in range(0, len(y), p["train_batch_size"]):
                idx = order[i : i + p["train_batch_size"]]
                terms = self.losses(feats[idx], y[idx])
                opt.zero_grad(set_to_none=True)
                terms["total"].backward()
                opt.step()
                steps += 1
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) * len(idx)
                n += len(idx)
            val = self._mean_losses(val_feats, val_y)
            if val["total"] < best_loss:  # strictly better: ties keep the earlier checkpoint
                best_loss, best_state, self.best_epoch = val["total"], protos.detach().clone(), epoch
            self.history.append({"epoch": epoch, "steps": steps, **{k: v / n for k, v in sums.items()},
                                 **{f"val_{k}": v for k, v in val.items()}, "best_epoch": self.best_epoch})
            if epoch in p["snapshot_epochs"]:
                kept[epoch] = {"prototypes": best_state.clone(), "best_epoch": self.best_epoch}
        with torch.no_grad():
            snapshots = {}
            for epoch, snap in kept.items():  # calibrate each snapshot on the fit set, as the final one
                protos.copy_(snap["prototypes"])
                self._calibrate(feats, y)
                snapshots[epoch] = {"decision": {k: v.detach().cpu().clone() for k, v in self.decision.state_dict().items()
                                                 if k in ("prototypes", "calibration_loc", "calibration_scale")},
                                    "best_epoch": snap["best_epoch"]}
            protos.copy_(best_state)
        return snapshots

    def _calibrate(self, feats: torch.Tensor, y: torch.Tensor) -> None:
        """Fit a logistic to each (class, detector)'s raw maxima over that class's training images."""
        dec = self.decision
        with torch.no_grad():  # only each image's own class's maps are fitted: compute only those
            maxima = torch.cat([self.own_class_maps(feats[i : i + 1024], y[i : i + 1024]).flatten(-2).amax(-1)
                                for i in range(0, len(feats), 1024)]).cpu()
        y = y.cpu()
        loc, scale = torch.zeros(dec.num_classes, dec.num_parts), torch.ones(dec.num_classes, dec.num_parts)
        for c in range(dec.num_classes):
            for j in range(dec.num_parts):
                loc[c, j], scale[c, j] = fit_logistic(maxima[y == c, j].numpy())
        dec.calibration_loc.copy_(loc)
        dec.calibration_scale.copy_(scale)

    def snapshot(self, epoch: int) -> "Particul":
        """This detector as a training of ``epoch`` epochs would have left it (same seed)."""
        if epoch == self.params["epochs"]:
            return self
        if epoch not in self.snapshots:
            raise DetectorError(f"particul: no snapshot at epoch {epoch}; snapshots: {sorted(self.snapshots)}")
        twin = Particul(**{**self.params, "epochs": epoch, "snapshot_epochs": ()}, mode=self.mode,
                        device=str(self.device), batch_size=self.batch_size)
        twin.net = build_cabrnet(self.trained, self.params["layer"], self.params["num_parts"]).to(twin.device)
        twin.decision.load_state_dict({**twin.decision.state_dict(), **self.snapshots[epoch]["decision"]})
        twin.history, twin.best_epoch, twin.trained = self.history[:epoch], self.snapshots[epoch]["best_epoch"], self.trained
        twin.fit_indices, twin.val_indices, twin.from_cache = self.fit_indices, self.val_indices, True
        return twin

    # ---- scoring
    def confidence(self, x: torch.Tensor, mode: str | None = None) -> np.ndarray:
        """Image-level in-distribution confidence in [0, 1] (1 − the suspicion score)."""
        return confidence_in_mode(self, x, mode)

    def torch_score(self, x: torch.Tensor) -> torch.Tensor:
        """1 − the image-level confidence, differentiable in ``x`` (the max over positions has a
        subgradient, the logistic CDF and the softmax weights are smooth)."""
        if not self.is_fitted:
            raise DetectorError(f"{self.name}: call fit(trained, clean_train) before torch_score(x)")
        logits, maps = self.net(x)
        return 1.0 - image_confidence(self.decision.class_confidence(maps), logits, self.mode)

    def _score(self, x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return self.torch_score(x).cpu().numpy()

    def maxima(self, x: torch.Tensor) -> np.ndarray:
        """Raw maxima of every detector's map (N×C×P), the values calibration fits."""
        out = []
        with torch.no_grad():
            for i in range(0, len(x), self.batch_size):
                _, maps = self.net(torch.as_tensor(x[i : i + self.batch_size]).float().to(self.device))
                out.append(maps.flatten(-2).max(-1).values.cpu())
        return torch.cat(out).numpy()

    def part_maps(self, x: torch.Tensor, upsample: bool = True, calibrated: bool = False,
                  classes=None) -> tuple[np.ndarray, np.ndarray]:
        """(part maps of the predicted class, or of ``classes`` when given, P×H×W per image,
        bilinear-upsampled to the image size when ``upsample``; the predicted classes).

        ``calibrated``: each map on the shared [0, 1] scale of its logistic CDF, so a part that
        is absent looks absent, and the map's peak is the part's confidence. Otherwise the raw
        activations."""
        with torch.no_grad():
            logits, maps = self.net(torch.as_tensor(x).float().to(self.device))
            if calibrated:
                maps = self.decision.confidence_maps(maps)
            pred = logits.argmax(1)
            shown = pred if classes is None else torch.as_tensor(classes, device=pred.device).long()
            own = maps[torch.arange(len(pred)), shown]
            if upsample:
                own = F.interpolate(own, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
        return own.cpu().numpy(), pred.cpu().numpy()

    def part_confidences(self, x: torch.Tensor, classes=None) -> np.ndarray:
        """Each part's confidence (N×P), for the predicted class or ``classes``."""
        with torch.no_grad():
            logits, maps = self.net(torch.as_tensor(x).float().to(self.device))
            shown = logits.argmax(1) if classes is None else torch.as_tensor(classes, device=logits.device).long()
            conf = logistic_confidence(maps.flatten(-2).max(-1).values, self.decision.calibration_loc,
                                       self.decision.calibration_scale)
        return conf[torch.arange(len(shown)), shown].cpu().numpy()

    def reference_patches(self, train: data.Dataset, k: int = 3, n_search: int | None = None) -> list[dict]:
        """CODE's reference patches: for each detector (c, p), the ``k`` training images of class
        c on which it fires most (one patch per image), with the feature position of the peak and
        the image box it sees (its receptive field). Searched over the fit set, or over the
        first ``n_search`` images of it (a seeded random subset: the fit set is shuffled)."""
        searched = self.fit_indices if n_search is None else self.fit_indices[
            np.sort(np.random.default_rng(self.params["seed"]).permutation(len(self.fit_indices))[:n_search])]
        x, y = train.x[searched], train.y[searched]
        feats = self._features(x)
        dec = self.decision
        with torch.no_grad():
            maps = torch.cat([dec.part_maps(feats[i : i + 512]) for i in range(0, len(feats), 512)])
        h_f, w_f = maps.shape[-2:]
        boxes: dict[tuple[int, int], tuple] = {}  # a position's receptive field, computed once
        rows = []
        for c in range(dec.num_classes):
            own = torch.nonzero(y == c).flatten()
            if len(own) == 0:
                continue
            flat = maps[own, c].flatten(-2)  # n_c × P × HW
            peak, where = flat.max(-1)
            for p in range(dec.num_parts):
                top = torch.argsort(peak[:, p], descending=True)[:k]
                for rank, j in enumerate(top.tolist()):
                    pos = int(where[j, p])
                    h, w = divmod(pos, w_f)
                    if (h, w) not in boxes:
                        boxes[(h, w)] = receptive_box(self.net.extractor, tuple(x.shape[1:]), h, w, self.device)
                    rows.append({"class": c, "part": p, "rank": rank, "index": int(searched[int(own[j])]),
                                 "h": h, "w": w, "activation": float(peak[j, p]), "box": boxes[(h, w)]})
        return rows

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


# --------------------------------------------------------------------------- several at once
def fit_many(trained: models.Trained, clean_train: data.Dataset, configs: list[dict], device: str = "auto",
             batch_size: int = 256, max_feature_bytes: float = 8e9) -> list[Particul]:
    """Fit one PARTICUL per parameter set in ``configs`` on the same training data, computing the
    frozen backbone's features once for all the layers whose fits are not cached yet."""
    dets = [Particul(device=device, batch_size=batch_size, **cfg) for cfg in configs]
    trained.model.eval().to(dets[0].device)
    missing = sorted({d.cache_key(trained, clean_train)["layer"] for d in dets if not d.is_cached(trained, clean_train)})
    # group the missing layers so the features held at once stay under max_feature_bytes
    groups, group, size = [], [], 0.0
    for layer in missing:
        shape = split(copy.deepcopy(trained.model).cpu(), layer)[0](torch.zeros(1, *trained.input_shape)).shape
        need = float(np.prod(shape[1:])) * 4 * len(dets[0].used_indices(len(clean_train)))
        if group and size + need > max_feature_bytes:
            groups.append(group)
            group, size = [], 0.0
        group, size = group + [layer], size + need
    groups += [group] if group else []
    used = np.unique(np.concatenate([d.used_indices(len(clean_train)) for d in dets]))
    for group in groups:
        feats, _ = backbone_outputs(trained.model, clean_train.x[torch.from_numpy(used)], group, dets[0].device)
        for d in dets:
            if not d.is_fitted and d.cache_key(trained, clean_train)["layer"] in group:
                d.fit(trained, clean_train, features=(used, feats[d.cache_key(trained, clean_train)["layer"]]))
        del feats
    for d in dets:
        if not d.is_fitted:
            d.fit(trained, clean_train)  # cached
    return dets


def class_confidences(dets: list[Particul], model: nn.Module, x, device, batch_size: int = 512):
    """(logits N×C, [per-class confidences N×C of each detector]) with one forward pass of the
    classifier per batch, whichever layers the detectors read."""
    layers = sorted({d.layer for d in dets})
    logits, confs = [], [[] for _ in dets]
    for feats, out in hooked_batches(model, x, layers, device, batch_size):
        logits.append(out)
        with torch.no_grad():
            for j, d in enumerate(dets):
                confs[j].append(d.decision.class_confidence(d.decision.part_maps(feats[d.layer])))
    return torch.cat(logits), [torch.cat(c) for c in confs]
