"""The per-sample detection benchmark (chapter 4), and the cached scores later chapters reuse.

Protocol: the clean set is the attack pool (test images the classifier gets right). For each
attack, its *successful* adversarial examples are split in two halves with a seed: the
evaluation half is scored against the clean originals of the same images; the other half is
only used to fit the supervised detectors. Unsupervised detectors fit on clean training data.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch

from . import cache, data, detectors, metrics, models
from .attacks import AttackRecord, array_digest, model_digest

SCORES_VERSION = 1


def split_halves(record: AttackRecord, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(fit indices, evaluation indices) among the successful attacks.

    Each *pool image* falls in the fit or the evaluation half by one seeded coin flip, the same
    for every attack (records are prefixes of the pool), so no clean image used to fit a
    supervised detector is ever evaluated, whichever attack it is tested on.
    """
    in_fit = np.random.default_rng(seed).random(len(record)) < 0.5
    return np.flatnonzero(record.success & in_fit), np.flatnonzero(record.success & ~in_fit)


def benchmark_params(name: str, seed: int, n_fit: int, detector_params: dict) -> dict:
    """The parameters chapter 4 runs detector ``name`` with, so that later chapters rebuild the
    same detector and hit its cached scores."""
    base = {"seed": seed}
    if name in detectors.ood.NAMES:
        base["n_fit"] = n_fit
    return {**base, **detector_params.get(name, {})}


def fitted(name: str, params: dict, trained: models.Trained, train: data.Dataset, device: str = "auto"):
    """(fitted detector, its score-cache key)."""
    det = detectors.detector(name, device=device, **params).fit(trained, train)
    return det, detector_key(name, params, trained)


def choose_on_fit_half(candidates: dict[str, dict], trained: models.Trained, train: data.Dataset,
                       record: AttackRecord, seed: int, device: str = "auto") -> tuple[str, pd.DataFrame]:
    """The candidate (name → parameters) with the best AUROC on ``record``'s *fit* half.

    The study's rule for every choice a later chapter makes (as PARTICUL's configuration and the
    squeezers): the evaluation half is never looked at. Ties go to the first candidate.
    """
    fit_idx, _ = split_halves(record, seed)
    if len(fit_idx) < 2:
        raise ValueError(f"{record.name} succeeded on {len(fit_idx)} fit-half images; need ≥ 2 to choose")
    rows = []
    for name, params in candidates.items():
        det, key = fitted(name, params, trained, train, device)
        clean = cached_scores(det, key, record.x_clean[fit_idx])
        adv = cached_scores(det, key, record.x_adv[fit_idx])
        rows.append({"detector": name, "auroc_fit_half": metrics.detection_metrics(clean, adv)["auroc"],
                     "n_fit_half": len(fit_idx)})
    table = pd.DataFrame(rows)
    best = table.loc[table.auroc_fit_half.idxmax(), "detector"]
    return best, table.assign(chosen=table.detector == best)


def fit_half_indices(record: AttackRecord, seed: int, indices: np.ndarray | None = None,
                     what: str = "selection") -> np.ndarray:
    """Positions in ``record`` a choice may look at: its fit half, or the part of it given as
    ``indices``. Any other position, an evaluation-half one above all, raises
    :class:`detectors.DetectorError`: no caller can hand evaluation data to a choice."""
    fit_idx, eval_idx = split_halves(record, seed)
    used = fit_idx if indices is None else np.asarray(indices)
    if used.ndim != 1 or not np.issubdtype(used.dtype, np.integer):
        raise detectors.DetectorError(f"{what}: indices must be a 1-D integer array, got {used.dtype} of shape {used.shape}")
    leaked = np.intersect1d(used, eval_idx)
    if len(leaked):
        raise detectors.DetectorError(
            f"{what}: {len(leaked)} of the {len(used)} indices lie in the evaluation half of {record.name} "
            f"(seed {seed}), e.g. {leaked[:5].tolist()}; choices are made on fit-half images only "
            "(benchmark.split_halves)")
    stray = np.setdiff1d(used, fit_idx)
    if len(stray):
        raise detectors.DetectorError(f"{what}: indices {stray[:5].tolist()} are not fit-half adversarial "
                                      f"examples of {record.name} (failed attacks, or outside the record)")
    if len(np.unique(used)) != len(used) or len(used) < 2:
        raise detectors.DetectorError(f"{what}: need ≥ 2 distinct fit-half indices, got {len(used)} "
                                      f"({len(np.unique(used))} distinct)")
    return used


SQUEEZER_KEYS = ("bit_depth", "median_window", "nl_means")


def study_squeezers(trained: models.Trained, records: dict[str, AttackRecord], selection_attack: str, seed: int,
                    detector_params: dict, device: str = "auto", indices: np.ndarray | None = None
                    ) -> tuple[dict, list[dict], str]:
    """(feature squeezing's squeezers, the candidates' table, the rule that chose them).

    The authors chose squeezers per dataset: the profile's, when it names them; otherwise one bit
    depth and one median size chosen on the fit half of the selection attack (never evaluation
    data), as chapter 4 reports. ``indices`` (positions in the selection attack's record) chooses
    on part of that fit half; any other position, an evaluation-half one above all, raises
    :class:`detectors.DetectorError`: no caller can hand evaluation data to the choice.
    """
    given = {k: v for k, v in detector_params.get("feature_squeezing", {}).items() if k in SQUEEZER_KEYS}
    if given:
        return given, [], "set by the profile (the authors' squeezers for this dataset)"
    record = records[selection_attack]
    used = fit_half_indices(record, seed, indices, "squeezer selection")
    x_clean, x_adv = record.x_clean[used], record.x_adv[used]
    squeezers, candidates = detectors.feature_squeezing.select_squeezers(trained, x_clean, x_adv, device)
    return squeezers, candidates, (f"chosen on the fit half of {selection_attack} among every bit depth, median size and "
                                   "(bit depth, median) pair, by the joint detector's AUROC")


def detector_key(name: str, params: dict, trained: models.Trained) -> dict:
    return {"detector": name, "params": params, "model": model_digest(trained.model)}


def cached_scores(det: detectors.Detector, key: dict, x: np.ndarray | torch.Tensor) -> np.ndarray:
    """Scores of ``x`` by a fitted detector, cached by the detector's key and the inputs."""
    x_np = x.numpy() if isinstance(x, torch.Tensor) else x
    params = {"version": SCORES_VERSION, "code": cache.source_digest(), **key, "data": array_digest(x_np)}
    return cache.cached("scores", params, lambda: {"scores": det.score(torch.from_numpy(x_np))}, fmt="npz")["scores"]


def time_per_image(fn, x: torch.Tensor, repeats: int = 3) -> float:
    """Best-of-``repeats`` wall time of ``fn(x)``, per image."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - start)
    return best / len(x)


def forward_time(trained: models.Trained, x: torch.Tensor, device: str = "auto") -> float:
    dev = models.pick_device(device)
    model = trained.model.eval().to(dev)

    def fwd(batch):
        with torch.no_grad():
            for i in range(0, len(batch), 256):
                model(batch[i : i + 256].to(dev))

    return time_per_image(fwd, x)


def result_row(detector: str, attack: str, clean: np.ndarray, tampered: np.ndarray, n_boot: int, seed: int,
               supervised: bool) -> dict:
    m = metrics.detection_metrics(clean, tampered)
    lo, hi = metrics.bootstrap_ci(clean, tampered, "auroc", n_boot=n_boot, seed=seed) if n_boot else (np.nan, np.nan)
    return {"detector": detector, "attack": attack, "auroc": m["auroc"], "auroc_low": lo, "auroc_high": hi,
            "fpr95": m["fpr95"], "fpr80": m["fpr80"], "aupr_in": m["aupr_in"], "aupr_out": m["aupr_out"], "tpr_at_fpr5": m["tpr_at_fpr5"],
            "n_clean": len(clean), "n_tampered": len(tampered), "supervised": supervised}


def evaluation_scores(det: detectors.Detector, key: dict, pool: data.Dataset, records: dict[str, AttackRecord],
                      seed: int, min_n: int = 2):
    """Per attack with ≥ ``min_n`` successful evaluation-half examples: (attack, scores of their
    clean originals, scores of the examples), from the score cache."""
    clean_all = cached_scores(det, key, pool.x)
    for attack, rec in records.items():
        _, ev = split_halves(rec, seed)
        if len(ev) >= min_n:
            yield attack, clean_all[ev], cached_scores(det, key, rec.x_adv[ev])


def run_unsupervised(name: str, params: dict, trained: models.Trained, train: data.Dataset, pool: data.Dataset,
                     records: dict[str, AttackRecord], seed: int, n_boot: int, device: str = "auto",
                     label: str | None = None):
    """Fit one unsupervised detector and evaluate it on every attack; returns (rows, curves, seconds/img).

    ``label``: the detector's name in the rows (default ``name``), e.g. for two configurations
    of one method."""
    det, key = fitted(name, params, trained, train, device)
    rows, curves = [], {}
    for attack, clean, adv in evaluation_scores(det, key, pool, records, seed):
        rows.append(result_row(label or name, attack, clean, adv, n_boot, seed, False))
        curves[attack] = metrics.roc(clean, adv)
    seconds = time_per_image(det.score, pool.x[:256])
    return rows, curves, seconds


def run_supervised(name: str, params: dict, trained: models.Trained, train: data.Dataset, pool: data.Dataset,
                   records: dict[str, AttackRecord], seed: int, n_boot: int, device: str = "auto",
                   train_attacks: list[str] | None = None):
    """Fit on each attack's fit half; evaluate on every attack's evaluation half (transfer).

    Returns (rows of the matched attack, transfer rows, seconds per image).
    """
    rows, transfer, seconds = [], [], float("nan")
    for train_attack, rec in records.items():
        if train_attacks is not None and train_attack not in train_attacks:
            continue
        fit_idx, _ = split_halves(rec, seed)
        if len(fit_idx) < 10:  # too few examples to fit a regression
            continue
        det = detectors.detector(name, device=device, **params)
        det.fit(trained, train, x_clean=torch.from_numpy(rec.x_clean[fit_idx]), x_adv=torch.from_numpy(rec.x_adv[fit_idx]))
        key = {**detector_key(name, params, trained), "trained_on": rec.key}
        clean_all = cached_scores(det, key, pool.x)  # every attack's clean originals are pool images
        for test_attack, other in records.items():
            _, ev = split_halves(other, seed)
            if len(ev) < 2:
                continue
            clean = clean_all[ev]
            adv = cached_scores(det, key, other.x_adv[ev])
            row = result_row(name, test_attack, clean, adv, n_boot if test_attack == train_attack else 0, seed, True)
            transfer.append({"detector": name, "train_attack": train_attack, "test_attack": test_attack, "auroc": row["auroc"]})
            if test_attack == train_attack:
                rows.append(row)
        if np.isnan(seconds):
            seconds = time_per_image(det.score, torch.from_numpy(rec.x_clean[: min(256, len(rec))]))
    return rows, transfer, seconds


def subset_scan_layers(trained: models.Trained, train: data.Dataset, pool: data.Dataset,
                       records: dict[str, AttackRecord], layers: list[str], attacks: list[str],
                       seed: int, n_background: int = 1000, device: str = "auto",
                       tails: tuple[str, ...] = ("upper", "two")) -> pd.DataFrame:
    """AUROC of per-image subset scanning at each layer, per attack and per p-value tail (the
    seed paper's table, with the two-tailed scan beside the authors' one-tailed one), and what
    the attack does to the layer: the share of its activations that are exactly zero on the
    clean images and on their adversarial versions (``zero_clean``, ``zero_adversarial``)."""
    rows = []
    for layer in layers:
        zeros = {}  # attack -> (clean, adversarial) share of zero activations, once per layer
        for tail in tails:
            params = {"layer": layer, "n_background": n_background, "seed": seed, "tails": tail}
            det = detectors.detector("subset_scan", device=device, **params).fit(trained, train)
            key = detector_key("subset_scan", params, trained)
            clean_all = cached_scores(det, key, pool.x)
            for attack in attacks:
                if attack not in records:
                    continue
                _, ev = split_halves(records[attack], seed)
                if len(ev) < 2:
                    continue
                adv = cached_scores(det, key, records[attack].x_adv[ev])
                if attack not in zeros:
                    zeros[attack] = tuple(float((det._activations(torch.as_tensor(x)) == 0).mean())
                                          for x in (records[attack].x_clean[ev], records[attack].x_adv[ev]))
                rows.append({"layer": layer, "tails": tail, "attack": attack,
                             "auroc": metrics.detection_metrics(clean_all[ev], adv)["auroc"],
                             "zero_clean": zeros[attack][0], "zero_adversarial": zeros[attack][1]})
    return pd.DataFrame(rows)
