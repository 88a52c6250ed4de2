"""Combined detectors for the study (chapters 4, 5 and 7): which members, which tails, and the
clean images that calibrate them. The detector itself is :mod:`tamperbench.detectors.combined`.

The rules, fixed before any number (chapter 4 states them):

- **Calibration**: the members' conformal p-values come from ``n_calibration`` clean test images
  outside the attack pool, set apart before chapter 5's calibration and clean populations
  (:func:`tamperbench.batch.held_out_split`), so they are never evaluated, never a threshold's
  calibration point and never a clean batch.
- **Tails**: a member enters two-tailed when the *fit half* of some attack with at least
  ``min_fit`` fit-half examples shows that the attack makes it *less* suspicious than clean
  images: a one-sided Mann–Whitney test (``scipy.stats.mannwhitneyu(adversarial, clean,
  alternative="less")``) below 0.01, Bonferroni-corrected over the attacks, so that a member
  blind to an attack (AUROC ≈ 0.5 by chance below) stays upper-tailed.
- **The a-priori pair**: ``members`` (PARTICUL, the configuration chapter 3 chose, and MSP), fixed
  before the data as the two families whose blind spots mirror each other.
- **The best pair and triple**: among every pair and triple of ``candidates``, the one whose worst
  fit-half AUROC over the selection attacks is highest (ties: the higher mean, then the first
  in the candidates' order), combined by ``method``. **The best combination** is the better of the
  two by the same rule. The selection attacks default to every attack with at least ``min_fit``
  fit-half examples: the target is every attack, and the fit halves are never evaluated.

No evaluation-half image enters any of these choices: every index goes through
:func:`tamperbench.benchmark.fit_half_indices`, which raises on one.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from . import batch, benchmark, detectors
from .detectors.combined import METHODS, Combined, combined_log_pvalue, member_pvalues

#: the study's defaults (the config's shared ``combination`` block overrides them)
DEFAULTS = {
    "members": ["particul", "msp"],
    "candidates": ["particul", "msp", "odin", "mds", "rmds", "ebo", "mls", "gen", "react", "ash", "knn", "vim", "she",
                   "subset_scan", "feature_squeezing", "feature_response"],
    "method": "fisher",
    "sizes": [2, 3],
    "selection_attacks": None,
    "min_fit": 20,
    "n_calibration": 1000,
}


class CombinationError(ValueError):
    """A bad combination setting, named with the valid choices."""


def settings(given: dict | None) -> dict:
    """The defaults updated by ``given``, checked before any work."""
    given = dict(given or {})
    unknown = [k for k in given if k not in DEFAULTS]
    if unknown:
        raise CombinationError(f"combination: unknown setting(s) {unknown}; valid settings: {', '.join(DEFAULTS)}")
    out = {**DEFAULTS, **given}
    if out["method"] not in METHODS:
        raise CombinationError(f"combination: unknown method {out['method']!r}; valid methods: {', '.join(METHODS)}")
    for key in ("members", "candidates"):
        names = out[key]
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
            raise CombinationError(f"combination: {key} must be a list of distinct detector names, got {names!r}")
        bad = [n for n in names if n not in detectors.DETECTORS or n in detectors.SUPERVISED or n == "combined"]
        if bad:
            valid = [d for d in detectors.DETECTORS if d not in detectors.SUPERVISED and d != "combined"]
            raise CombinationError(f"combination: {key} {bad} are not unsupervised detectors; valid: {', '.join(valid)}")
    if len(out["members"]) < 2:
        raise CombinationError(f"combination: members must name at least two detectors, got {out['members']}")
    if not isinstance(out["sizes"], list) or not all(isinstance(k, int) and not isinstance(k, bool) and 2 <= k <= len(out["candidates"])
                                                    for k in out["sizes"]):
        raise CombinationError(f"combination: sizes must be a list of ints in [2, {len(out['candidates'])}], got {out['sizes']!r}")
    for key in ("min_fit", "n_calibration"):
        if isinstance(out[key], bool) or not isinstance(out[key], int) or out[key] < 2:
            raise CombinationError(f"combination: {key} must be an int ≥ 2, got {out[key]!r}")
    sel = out["selection_attacks"]
    if sel is not None and (not isinstance(sel, list) or not sel or not all(isinstance(a, str) for a in sel)):
        raise CombinationError(f"combination: selection_attacks must be null (every attack) or a list of attack names, got {sel!r}")
    return out


def label(names, method: str = "fisher") -> str:
    """The row name of a combination: its members joined by '+', the method unless Fisher."""
    return "+".join(names) + ("" if method == "fisher" else f" ({method})")


#: the tail rule's family-wise level (Bonferroni over the attacks it looks at)
TAIL_LEVEL = 0.01


def lower_pvalue(clean: np.ndarray, adversarial: np.ndarray) -> float:
    """One-sided Mann–Whitney p-value for "the attack lowers the member's score"."""
    from scipy import stats

    return float(stats.mannwhitneyu(adversarial, clean, alternative="less").pvalue)


@dataclass
class FitHalf:
    """One candidate's scores: calibration images, and per attack its fit half (clean originals, adversarial)."""

    calibration: np.ndarray
    attacks: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


def fit_half_scores(det, key: dict, pool, records: dict, attacks: list[str], seed: int, x_calibration,
                    indices: dict[str, np.ndarray] | None = None) -> FitHalf:
    """A candidate's scores on the calibration images and on the fit halves of ``attacks``
    (or the fit-half positions ``indices[attack]``: anything else raises)."""
    clean_all = benchmark.cached_scores(det, key, pool.x)
    out = FitHalf(benchmark.cached_scores(det, key, x_calibration))
    for attack in attacks:
        rec = records[attack]
        used = benchmark.fit_half_indices(rec, seed, None if indices is None else indices.get(attack), "combination choice")
        out.attacks[attack] = (clean_all[used], benchmark.cached_scores(det, key, rec.x_adv[used]))
    return out


def auroc(clean: np.ndarray, adversarial: np.ndarray) -> float:
    """AUROC as the Mann–Whitney U over the product of the sample sizes (ties count half), the
    value ``sklearn.metrics.roc_auc_score`` gives, without its overhead: the choice computes
    thousands."""
    from scipy.stats import rankdata

    ranks = rankdata(np.r_[clean, adversarial])
    n_c, n_a = len(clean), len(adversarial)
    return float((ranks[n_c:].sum() - n_a * (n_a + 1) / 2) / (n_a * n_c))


def _pvalues(scores: dict[str, FitHalf], tails: dict[str, str], attack: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {n: tuple(member_pvalues(sc.calibration, s, tails[n]) for s in sc.attacks[attack]) for n, sc in scores.items()}


def fit_half_auroc(scores: dict[str, FitHalf], names, tails: dict[str, str], method: str, attack: str,
                   pvalues: dict | None = None) -> float:
    """AUROC, on ``attack``'s fit half, of the combination of ``names``."""
    pv = pvalues or _pvalues({n: scores[n] for n in names}, tails, attack)
    clean, adv = (-combined_log_pvalue(np.stack([pv[n][i] for n in names], axis=1), method) for i in (0, 1))
    return auroc(clean, adv)


@dataclass
class Choice:
    """What the rules chose, and the tables that show it."""

    tails: dict[str, str]
    tail_table: pd.DataFrame
    selection: pd.DataFrame  # every candidate combination's fit-half AUROCs, best first
    selection_attacks: list[str]
    a_priori: tuple[str, ...]
    best_by_size: dict[int, tuple[str, ...]]
    best: tuple[str, ...]


def choose(scores: dict[str, FitHalf], cfg: dict, tail_attacks: list[str], selection_attacks: list[str]) -> Choice:
    """Tails, the best combination of each size and the best overall, from fit-half scores only."""
    tail_rows, tails = [], {}
    for name, sc in scores.items():
        flips = []
        for attack in tail_attacks:
            clean, adv = sc.attacks[attack]
            p_lower = lower_pvalue(clean, adv)
            tail_rows.append({"detector": name, "attack": attack, "n_fit_half": len(adv),
                              "auroc_fit_half": auroc(clean, adv), "p_lower": p_lower,
                              # the smallest one-sided Mann–Whitney p-value these sample sizes allow
                              "smallest_possible_p": 1.0 / math.comb(len(clean) + len(adv), len(adv)),
                              "level": TAIL_LEVEL / len(tail_attacks)})
            flips.append(p_lower < TAIL_LEVEL / len(tail_attacks))
        tails[name] = "two" if any(flips) else "upper"
    tail_table = pd.DataFrame(tail_rows).assign(tail=lambda t: t.detector.map(tails))
    rows = []
    order = {n: i for i, n in enumerate(cfg["candidates"])}
    pvalues = {a: _pvalues({n: scores[n] for n in cfg["candidates"]}, tails, a) for a in selection_attacks}
    for k in cfg["sizes"]:
        for names in itertools.combinations(cfg["candidates"], k):
            aurocs = {a: fit_half_auroc(scores, names, tails, cfg["method"], a, pvalues[a]) for a in selection_attacks}
            rows.append({"combination": label(names, cfg["method"]), "size": k, "members": names,
                         "worst_fit_auroc": min(aurocs.values()), "mean_fit_auroc": float(np.mean(list(aurocs.values()))),
                         "rank_key": tuple(order[n] for n in names), **{f"auroc_fit_{a}": v for a, v in aurocs.items()}})
    selection = (pd.DataFrame(rows).sort_values(["worst_fit_auroc", "mean_fit_auroc", "rank_key"],
                                                ascending=[False, False, True], kind="mergesort").reset_index(drop=True))
    best_by_size = {k: tuple(selection[selection["size"] == k].iloc[0].members) for k in cfg["sizes"]}
    best = tuple(selection.iloc[0].members)
    selection = selection.assign(chosen=selection.members.map(lambda m: "best" if tuple(m) == best else
                                                              ("best of its size" if tuple(m) in best_by_size.values() else "")))
    return Choice(tails, tail_table, selection.drop(columns="rank_key"), selection_attacks, tuple(cfg["members"]),
                  best_by_size, best)


class _Lazy:
    """A candidate fitted only when a score is not in the cache (later chapters find every
    candidate's scores there, and fit only the chosen members)."""

    def __init__(self, name: str, params: dict, trained, train, device):
        self.args = (name, params, trained, train, device)
        self.key = benchmark.detector_key(name, params, trained)
        self._det = None

    def detector(self):
        if self._det is None:
            self._det = benchmark.fitted(*self.args)[0]
        return self._det

    def score(self, x):
        return self.detector().score(x)


@dataclass
class Study:
    """The study's combinations, fitted: ``detectors[label] = (Combined, score-cache key)``."""

    choice: Choice
    detectors: dict[str, tuple[Combined, dict]]
    members: dict[str, tuple[detectors.Detector, dict]]
    held: batch.HeldOut
    a_priori_label: str
    best_label: str


def study(trained, test, pool, records: dict, specs: dict[str, tuple[str, dict]], cfg: dict | None, seed: int,
          train, device: str = "auto", methods=("fisher",), indices: dict[str, np.ndarray] | None = None) -> Study:
    """Fit the candidates (``specs``: label → (registry name, parameters), as chapter 4 runs them;
    their fits and scores come from the cache), choose by the rules above, and build the
    a-priori pair (with each of ``methods``), the best combination of each size and the best."""
    cfg = settings(cfg)
    missing = [n for n in cfg["candidates"] + cfg["members"] if n not in specs]
    if missing:
        raise CombinationError(f"combination: no detector specification for {missing}; given: {', '.join(specs)}")
    held = batch.held_out_split(len(test), pool.indices, 1, seed, n_combination=cfg["n_calibration"])
    x_cal = test.x[torch.from_numpy(held.combination)]
    enough = [a for a, rec in records.items() if len(benchmark.split_halves(rec, seed)[0]) >= cfg["min_fit"]]
    selection_attacks = enough if cfg["selection_attacks"] is None else list(cfg["selection_attacks"])
    unknown = [a for a in selection_attacks if a not in enough]
    if unknown:
        raise CombinationError(f"combination: selection attacks {unknown} have fewer than {cfg['min_fit']} fit-half "
                               f"examples or did not run; usable: {', '.join(enough)}")
    if not selection_attacks:
        raise CombinationError(f"combination: no attack has {cfg['min_fit']} fit-half examples to choose on")
    names = list(dict.fromkeys(cfg["members"] + cfg["candidates"]))
    lazy = {n: _Lazy(*specs[n], trained, train, device) for n in names}
    scores = {n: fit_half_scores(d, d.key, pool, records, enough, seed, x_cal, indices) for n, d in lazy.items()}
    choice = choose(scores, cfg, enough, selection_attacks)

    def build(members, method):
        dets = [lazy[n].detector() for n in members]
        keys = [lazy[n].key for n in members]
        scorers = [lambda v, d=d, k=k: benchmark.cached_scores(d, k, v) for d, k in zip(dets, keys)]
        tails = [choice.tails[n] for n in members]
        comb = Combined.from_members(dets, [scores[n].calibration for n in members], method, tails, scorers, list(members))
        key = {"detector": "combined", "members": keys, "tails": tails, "method": method,
               "calibration": benchmark.array_digest(x_cal.numpy())}
        return comb, key

    methods = list(dict.fromkeys([cfg["method"], *methods]))
    built = {label(choice.a_priori, m): build(choice.a_priori, m) for m in methods}
    for members in list(choice.best_by_size.values()):
        built.setdefault(label(members, cfg["method"]), build(members, cfg["method"]))
    used = {n for comb, _ in built.values() for n in comb.member_names}
    return Study(choice, built, {n: (lazy[n].detector(), lazy[n].key) for n in names if n in used}, held, label(choice.a_priori, cfg["method"]), label(choice.best, cfg["method"]))


def candidate_specs(cfg: dict | None, particul_spec: tuple[str, dict], squeezers: dict, seed: int, n_fit: int,
                    detector_params: dict) -> dict[str, tuple[str, dict]]:
    """(registry name, parameters) of every member and candidate, as chapter 4 runs each one:
    PARTICUL is chapter 3's default configuration, feature squeezing uses chapter 4's squeezers."""
    cfg = settings(cfg)
    specs = {}
    for name in dict.fromkeys(cfg["members"] + cfg["candidates"]):
        if name == "particul":
            specs[name] = particul_spec
        elif name == "feature_squeezing":
            specs[name] = (name, {**detector_params.get(name, {}), **squeezers})
        else:
            specs[name] = (name, benchmark.benchmark_params(name, seed, n_fit, detector_params))
    return specs


def beside_members(rows: pd.DataFrame, study_: Study, min_evaluation: int) -> pd.DataFrame:
    """Per combination and attack (with ≥ ``min_evaluation`` evaluation examples): its AUROC and
    interval, its best member's on the same attack, and the gain. ``rows``: chapter 4's table,
    the single detectors' rows and the combinations' rows."""
    out = []
    auroc = rows.set_index(["detector", "attack"]).auroc
    for label_, (comb, _) in study_.detectors.items():
        for r in rows[(rows.detector == label_) & (rows.n_tampered >= min_evaluation)].itertuples():
            member = {m: auroc.get((m, r.attack), np.nan) for m in comb.member_names}
            best_member = max(member, key=lambda m: -np.inf if np.isnan(member[m]) else member[m])
            out.append({"combination": label_, "method": comb.method, "members": "+".join(comb.member_names),
                        "attack": r.attack, "auroc": r.auroc, "auroc_low": r.auroc_low, "auroc_high": r.auroc_high,
                        "n_tampered": r.n_tampered, "best_member": best_member, "best_member_auroc": member[best_member],
                        "gain_over_best_member": r.auroc - member[best_member]})
    return pd.DataFrame(out, columns=["combination", "method", "members", "attack", "auroc", "auroc_low", "auroc_high",
                                      "n_tampered", "best_member", "best_member_auroc", "gain_over_best_member"])


def summary(rows: pd.DataFrame, names: list[str], min_evaluation: int, targets=(0.95, 0.98)) -> pd.DataFrame:
    """Per detector (combinations and members): mean and worst AUROC over the attacks with
    ≥ ``min_evaluation`` evaluation examples, the worst attack, and how many reach each target."""
    powered = rows[(rows.n_tampered >= min_evaluation) & rows.detector.isin(names)]
    out = []
    for name in names:
        g = powered[powered.detector == name]
        if g.empty:
            continue
        worst = g.loc[g.auroc.idxmin()]
        out.append({"detector": name, "mean_auroc": g.auroc.mean(), "worst_auroc": worst.auroc, "worst_attack": worst.attack,
                    "n_attacks": len(g), **{f"n_at_{round(100 * t)}": int((g.auroc >= t).sum()) for t in targets}})
    return pd.DataFrame(out)
