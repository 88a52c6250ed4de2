"""Where PARTICUL attaches, with how many parts and which aggregation: the grid of chapter 3,
and the rule that picks the study's default configuration without looking at evaluation data.

The grid: every convolutional block of the classifier and the multi-layer combination (this
study's extension, :mod:`.detectors.particul_multi`), times each number of parts, times the
three aggregation modes. Every fit is cached, so later chapters get the same detectors back.

**The selection rule** (fixed before any result was seen): the configuration with the highest
AUROC on the *fit half* of one attack (``selection_attack``, FGSM by default: the cheapest
attack a defender can run on their own data), clean originals against their adversarial
examples. Ties go to the published configuration, then to fewer parts. The evaluation halves of
every attack, and every OOD set, are never looked at; the clean images the rule saw are left out
of the in-distribution reference of the OOD evaluation.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch

from . import data, metrics, models
from .attacks import ATTACKS, AttackRecord
from .benchmark import split_halves
from .detectors.base import DetectorError
from .detectors.particul import MODES, Particul, class_confidences, fit_many, image_confidence
from .detectors.particul_multi import ParticulMultiLayer

MULTI = "multi"  #: the layer label of the multi-layer combination
#: the authors' MNIST/LeNet budget: 200 epochs of 60,000 images in batches of 128
PUBLISHED_EPOCHS, PUBLISHED_BATCH, PUBLISHED_IMAGES = 200, 128, 60000
PUBLISHED_STEPS = PUBLISHED_EPOCHS * math.ceil(PUBLISHED_IMAGES / PUBLISHED_BATCH)
DEFAULT_SEARCH = {"layers": None, "num_parts": [4, 8], "multi_layer": True, "selection_attack": "fgsm"}


@dataclass(frozen=True)
class Config:
    layer: str  #: a block of the classifier, or ``multi``
    num_parts: int
    mode: str

    @property
    def label(self) -> str:
        where = "all blocks" if self.layer == MULTI else self.layer
        return f"{where}, P={self.num_parts}, {self.mode}"


def published(trained: models.Trained) -> Config:
    """The authors' configuration: their layer (LeNet's second block), 4 parts, categorical."""
    return Config(getattr(trained.model, "particul_layer", trained.model.feature_layer), 4, "categorical")


def check_search(search: dict) -> dict:
    """``search`` completed with the defaults, or a clear error."""
    unknown = set(search) - set(DEFAULT_SEARCH)
    if unknown:
        raise DetectorError(f"unknown particul_search keys {sorted(unknown)}; valid keys: {', '.join(DEFAULT_SEARCH)}")
    s = {**DEFAULT_SEARCH, **search}
    if s["layers"] is not None and (not isinstance(s["layers"], list) or not s["layers"] or not all(isinstance(x, str) for x in s["layers"])):
        raise DetectorError(f"particul_search.layers must be a list of layer names or null, got {s['layers']!r}")
    if not isinstance(s["num_parts"], list) or not s["num_parts"] or not all(isinstance(p, int) and not isinstance(p, bool) and p >= 1 for p in s["num_parts"]):
        raise DetectorError(f"particul_search.num_parts must be a list of ints ≥ 1, got {s['num_parts']!r}")
    if not isinstance(s["multi_layer"], bool):
        raise DetectorError(f"particul_search.multi_layer must be true or false, got {s['multi_layer']!r}")
    if not isinstance(s["selection_attack"], str):
        raise DetectorError(f"particul_search.selection_attack must be an attack name, got {s['selection_attack']!r}")
    return s


class Grid:
    """The fitted detectors of the grid: ``grid[(layer, num_parts)]`` (layer may be ``multi``)."""

    def __init__(self, trained: models.Trained, train: data.Dataset, particul: dict, search: dict,
                 seed: int = 0, device: str = "auto"):
        search = check_search(search)
        self.trained = trained
        self.layers = list(search["layers"] or trained.model.conv_layers)
        self.parts = list(search["num_parts"])
        pub = published(trained)
        #: the PARTICUL settings every configuration shares
        self.base = base = {**{k: v for k, v in particul.items() if k not in ("layer", "num_parts", "mode")}, "seed": seed}
        configs = [{**base, "layer": layer, "num_parts": p} for layer in self.layers for p in self.parts]
        if (pub.layer, pub.num_parts) not in {(c["layer"], c["num_parts"]) for c in configs}:
            configs.append({**base, "layer": pub.layer, "num_parts": pub.num_parts})  # always a row of its own
        dets = fit_many(trained, train, configs, device=device)
        self.detectors: dict[tuple[str, int], Particul | ParticulMultiLayer] = {
            (c["layer"], c["num_parts"]): d for c, d in zip(configs, dets)}
        if search["multi_layer"] and len(self.layers) > 1:
            for p in self.parts:
                self.detectors[(MULTI, p)] = ParticulMultiLayer.from_members([self.detectors[(layer, p)] for layer in self.layers])
        self.selection_attack = search["selection_attack"]

    def configs(self) -> list[Config]:
        return [Config(layer, p, mode) for (layer, p) in self.detectors for mode in MODES]

    def detector(self, config: Config):
        """The fitted detector of ``config``, scoring in its mode."""
        det = self.detectors[(config.layer, config.num_parts)]
        det.mode = config.mode
        return det

    def at_epoch(self, epoch: int) -> "Grid":
        """The grid as a training of ``epoch`` epochs would have left it (from the snapshots)."""
        twin = copy.copy(self)
        twin.detectors = {k: d.snapshot(epoch) for k, d in self.detectors.items() if k[0] != MULTI}
        for (layer, p) in self.detectors:
            if layer == MULTI:
                twin.detectors[(layer, p)] = ParticulMultiLayer.from_members([twin.detectors[(m, p)] for m in self.layers])
        return twin

    def steps(self, epoch: int | None = None) -> int:
        """Optimiser steps of each fit after ``epoch`` epochs (all of them by default)."""
        det = self.single()[0]
        return int((epoch or det.params["epochs"]) * math.ceil(len(det.fit_indices) / det.params["train_batch_size"]))

    def single(self) -> list[Particul]:
        return [d for (layer, _), d in self.detectors.items() if layer != MULTI]

    def confidences(self, x: torch.Tensor) -> dict[Config, np.ndarray]:
        """Every configuration's image confidence on ``x``, from one forward pass of the classifier."""
        singles = self.single()
        logits, per = class_confidences(singles, self.trained.model, torch.as_tensor(x), singles[0].device)
        class_conf = {(d.layer, d.params["num_parts"]): c for d, c in zip(singles, per)}
        for (layer, p), det in self.detectors.items():
            if layer == MULTI:
                class_conf[(layer, p)] = torch.stack([class_conf[(m.layer, p)] for m in det.members]).mean(0)
        return {Config(layer, p, mode): image_confidence(c, logits, mode).cpu().numpy()
                for (layer, p), c in class_conf.items() for mode in MODES}

    def evaluate(self, sets: dict[str, tuple]) -> pd.DataFrame:
        """Tidy AUROC / FPR@95 / FPR@80 of every configuration on every ``name: (reference, tampered)`` set."""
        memo: dict[int, dict[Config, np.ndarray]] = {}

        def conf(x):
            if id(x) not in memo:
                memo[id(x)] = self.confidences(x)
            return memo[id(x)]

        rows = []
        for name, (reference, tampered) in sets.items():
            ref, tam = conf(reference), conf(tampered)
            for config in ref:
                m = metrics.detection_metrics(1 - ref[config], 1 - tam[config])
                rows.append({**asdict(config), "set": name, "auroc": m["auroc"], "fpr95": m["fpr95"], "fpr80": m["fpr80"],
                             "n_reference": len(reference), "n_tampered": len(tampered)})
        return pd.DataFrame(rows)


def selection_set(record: AttackRecord, seed: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """(clean originals, adversarial examples, their pool positions) of the attack's fit half."""
    fit_idx, _ = split_halves(record, seed)
    if len(fit_idx) < 2:
        raise DetectorError(f"the selection attack {record.name} succeeded on {len(fit_idx)} fit-half images; need ≥ 2")
    return torch.from_numpy(record.x_clean[fit_idx]), torch.from_numpy(record.x_adv[fit_idx]), fit_idx


def select(grid: Grid, records: dict[str, AttackRecord], seed: int) -> tuple[Config, pd.DataFrame]:
    """The study's default configuration by the selection rule, and every candidate's score."""
    if grid.selection_attack not in records:
        raise DetectorError(f"selection attack {grid.selection_attack!r} is not in the attack suite; "
                            f"valid: {', '.join(records)}")
    clean, adv, _ = selection_set(records[grid.selection_attack], seed)
    table = grid.evaluate({f"{grid.selection_attack} (fit half)": (clean, adv)})
    pub = published(grid.trained)
    table = table.assign(published=[(r.layer, r.num_parts, r.mode) == (pub.layer, pub.num_parts, pub.mode)
                                    for r in table.itertuples()])
    order = table.sort_values(["auroc", "published", "num_parts"], ascending=[False, False, True], kind="stable")
    best = order.iloc[0]
    table = table.assign(chosen=(table.layer == best.layer) & (table.num_parts == best.num_parts) & (table["mode"] == best["mode"]))
    return Config(best.layer, int(best.num_parts), best["mode"]), table


def id_reference(test: data.Dataset, pool: data.Dataset, records: dict[str, AttackRecord], selection_attack: str,
                 seed: int) -> data.Dataset:
    """The in-distribution test split, less the clean images the selection rule saw."""
    _, _, fit_idx = selection_set(records[selection_attack], seed)
    seen = set(pool.indices[fit_idx].tolist()) if pool.indices is not None else set()
    keep = np.array([i for i in range(len(test)) if i not in seen])
    idx = torch.from_numpy(keep)
    return data.Dataset(test.name, test.split, test.x[idx], test.y[idx], test.classes,
                        dict(test.provenance, minus=f"{selection_attack} selection half"), keep)


def study_detectors(trained: models.Trained, train: data.Dataset, particul: dict, search: dict,
                    records: dict[str, AttackRecord], seed: int, device: str = "auto"):
    """(grid, chosen config, selection table): what chapters 3 and later use."""
    grid = Grid(trained, train, particul, search, seed, device)
    chosen, table = select(grid, records, seed)
    return grid, chosen, table


def single_layer(config: Config, trained: models.Trained) -> Config:
    """The configuration whose parts explain ``config``: itself, or for the multi-layer variant
    its member at the published layer (part maps and confidences belong to one layer)."""
    return config if config.layer != MULTI else Config(published(trained).layer, config.num_parts, config.mode)


def detector_spec(config: Config, grid: Grid) -> tuple[str, dict]:
    """(registry name, parameters) that rebuild ``config``'s detector (its fits hit the cache)."""
    base = grid.base
    if config.layer == MULTI:
        return "particul_multi", {**base, "layers": grid.layers, "num_parts": config.num_parts, "mode": config.mode}
    return "particul", {**base, "layer": config.layer, "num_parts": config.num_parts, "mode": config.mode}


def part_survival(det: Particul, records: dict[str, AttackRecord], seed: int, min_n: int = 2,
                  level: float = 0.95, n_boot: int = 1000) -> pd.DataFrame:
    """Do the parts of the true class survive each attack? One row per attack with at least
    ``min_n`` successful evaluation-half examples (the fit half is the selection rule's).

    A class's confidence on an image is the mean of its parts' calibrated confidences (the
    quantity PARTICUL aggregates). Columns: ``true_clean`` (the true class on the clean
    originals), ``true_adversarial`` (the true class on their adversarial versions),
    ``predicted_adversarial`` (the class the classifier now predicts), each a mean over images
    with a percentile bootstrap interval (SciPy, ``n_boot`` resamples, seeded); ``true_wins``:
    the share of adversarial images on which the true class's parts are more confident than the
    predicted class's among the images where they differ (ties, e.g. both saturated at 1, are
    left out as in a sign test, and counted in ``ties``), with its Wilson interval. Chapter 3's
    rule reads ``true_wins`` alone: the parts survive an attack when its interval lies above one
    half, and are erased when it lies below.
    """
    from scipy.stats import bootstrap

    def mean_ci(values: np.ndarray) -> tuple[float, float, float]:
        if len(values) < 2 or np.ptp(values) == 0:
            return float(values.mean()), float(values.mean()), float(values.mean())
        ci = bootstrap((values,), np.mean, n_resamples=n_boot, confidence_level=level, method="percentile",
                       rng=np.random.default_rng(seed)).confidence_interval
        return float(values.mean()), float(ci.low), float(ci.high)

    columns = ["attack", "fixed_budget", "n"] + [f"{k}{s}" for k in ("true_clean", "true_adversarial", "predicted_adversarial",
                                                                   "true_wins") for s in ("", "_low", "_high")] + ["ties"]
    rows = []
    for name, rec in records.items():
        _, ev = split_halves(rec, seed)
        if len(ev) < min_n:
            continue
        x_clean, x_adv = torch.from_numpy(rec.x_clean[ev]), torch.from_numpy(rec.x_adv[ev])
        true, pred = rec.y_true[ev], rec.pred_adv[ev]
        conf = {"true_clean": det.part_confidences(x_clean, true).mean(1),
                "true_adversarial": det.part_confidences(x_adv, true).mean(1),
                "predicted_adversarial": det.part_confidences(x_adv, pred).mean(1)}
        row = {"attack": name, "fixed_budget": ATTACKS[name].fixed_budget, "n": len(ev)}
        for key, values in conf.items():
            row[key], row[f"{key}_low"], row[f"{key}_high"] = mean_ci(values)
        true_adv, pred_adv = conf["true_adversarial"], conf["predicted_adversarial"]
        wins, ties = int((true_adv > pred_adv).sum()), int((true_adv == pred_adv).sum())
        decided = len(ev) - ties
        low, high = metrics.wilson_interval(wins, decided, level)
        rows.append({**row, "true_wins": wins / decided if decided else np.nan, "true_wins_low": low, "true_wins_high": high,
                     "ties": ties})
    return pd.DataFrame(rows, columns=columns)
