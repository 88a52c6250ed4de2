"""The study's attack suite: one pool of clean images, every attack run on it, and its tables.

Chapter 2 runs the suite; later chapters call :func:`run_suite` with the same shared
parameters (``n_pool``, ``attack_suite``) and get the cached records back without attacking.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from . import attacks, data, metrics, models

#: The norm each attack's perturbation is measured and budgeted in.
ATTACK_NORM = {
    "fgsm": "inf", "bim": "inf", "pgd": "inf", "square": "inf", "apgd_ce": "inf", "apgd_dlr": "inf", "autoattack": "inf",
    "deepfool": "2", "cw_l2": "2", "hopskipjump": "2", "boundary": "2", "pixel": "0",
}


def attack_pool(trained: models.Trained, dataset: str, n: int, seed: int = 0, device: str = "auto") -> data.Dataset:
    """``n`` test images that the classifier gets right, drawn with ``seed`` (the protocol's clean set)."""
    test = data.load(dataset, "test", seed=seed)
    order = np.random.default_rng(seed).permutation(len(test))
    pred = models.evaluate(trained.model, test, device=device)
    keep = np.sort(order[pred[order] == test.y.numpy()[order]][:n])
    if len(keep) < n:
        raise ValueError(f"only {len(keep)} correctly classified test images, fewer than n_pool={n}")
    idx = torch.from_numpy(keep)
    prov = dict(test.provenance, pool="correct", pool_n=n, pool_seed=seed)
    return data.Dataset(test.name, "test", test.x[idx], test.y[idx], test.classes, prov, keep)


def norm_of(name: str, budget: dict) -> str:
    return str(budget.get("norm", ATTACK_NORM[name]))


def run_suite(
    trained: models.Trained,
    pool: data.Dataset,
    suite: dict,
    seed: int = 0,
    device: str = "auto",
    only: list[str] | None = None,
    log=print,
) -> dict[str, attacks.AttackRecord]:
    """Run (or load) every attack of ``suite`` on the first ``n`` images of ``pool``."""
    records = {}
    for name, entry in suite.items():
        if only is not None and name not in only:
            continue
        budget = {k: v for k, v in entry.items() if k != "n"}
        n = min(int(entry.get("n", len(pool))), len(pool))
        atk = attacks.attack(name, trained, seed=seed, device=device, **budget)
        records[name] = atk.generate(pool.x[:n], pool.y[:n])
        log(f"{name:12s} n={n:4d}  success {records[name].success_rate:6.1%}  {records[name].seconds:7.1f} s")
    return records


def budget_label(budget: dict, name: str | None = None) -> str:
    """``k=v`` pairs; with the attack's name, a None reads as what it means (``nb_grads=every class``)."""
    params = attacks.spec(name).budget if name else {}
    return ", ".join(f"{k}={params[k].none_label if v is None and k in params else v}" for k, v in budget.items())


def summary_row(record: attacks.AttackRecord) -> dict:
    """One row of ``attacks.csv``. Norm means are over the successful adversarial examples.

    ``kind`` separates fixed-budget attacks, whose success rate is a measurement, from
    minimal-perturbation attacks, which succeed by construction and are judged by their norms.
    Success rates come with a Wilson 95 % interval over the clean-correct images.
    """
    ok = record.success
    spec = attacks.spec(record.name)
    correct = int(record.clean_correct.sum())
    low, high = metrics.wilson_interval(int(ok.sum()), correct)
    counted = record.iterations >= 0
    row = {
        "attack": record.name,
        "kind": "fixed budget" if spec.fixed_budget else "minimal perturbation",
        "box": spec.box,
        "norm": norm_of(record.name, record.budget),
        "budget": budget_label(record.budget, record.name),
        "n": len(record),
        "n_success": int(ok.sum()),
        "success_rate": record.success_rate,
        "success_low": low,
        "success_high": high,
        "linf_mean": float(record.linf[ok].mean()) if ok.any() else np.nan,
        "l2_mean": float(record.l2[ok].mean()) if ok.any() else np.nan,
        "l2_median": float(np.median(record.l2[ok])) if ok.any() else np.nan,
        "l0_mean": float(record.l0[ok].mean()) if ok.any() else np.nan,
        "seconds": round(record.seconds, 3),
        "images_per_second": round(len(record) / record.seconds, 2) if record.seconds > 0 else np.nan,
        "queries_per_image": record.queries if spec.box == "black" else np.nan,
        "art_queries_per_image": record.art_queries if spec.box == "black" else np.nan,
        "gradients_per_image": record.gradients if spec.box == "white" else np.nan,
        "gradient_bound": record.gradient_bound,
        "grad_ms_per_image": round(1e3 * record.grad_seconds, 4),
        "cost_ratio": round(record.cost_ratio, 2),
        "iterations_mean": float(record.iterations[counted].mean()) if counted.any() else np.nan,
        "iterations_max": record.budget["max_iter"] if counted.any() else np.nan,
        "note": spec.note,
    }
    return row


def budget_checks(records: dict[str, attacks.AttackRecord], nb_classes: int) -> pd.DataFrame:
    """Was each budget spent as configured? One row per attack.

    - white box: gradients counted per image against the bound derived from ART's calls (above
      it for any attack, or below it for one that ART never stops early: a bound set too high);
    - Boundary: iterations each image really ran against ``max_iter``;
    - every attack: budget values that cannot bind (:func:`attacks.unbound_parameters`);
    - DeepFool: an ``nb_grads`` that the input makes moot (the record's ``warnings``).
    """
    rows = []
    for name, r in records.items():
        flags = attacks.unbound_parameters(name, r.budget, nb_classes)
        flags += [w for w in r.warnings if w not in flags]  # run-time warnings the record keeps (DeepFool's class union)
        white = np.isfinite(r.gradient_bound)
        within = bool(r.gradients <= r.gradient_bound) if white else None
        if within is False:
            flags.append(f"{name}: {r.gradients:g} gradients per image, above the bound {r.gradient_bound:g}")
        elif white and name in attacks.FULL_BUDGET and r.gradients < r.gradient_bound:
            flags.append(f"{name}: {r.gradients:g} gradients per image, below the bound {r.gradient_bound:g} that an "
                         "attack with no early stop reaches: the bound overstates the budget")
        counted = r.iterations >= 0
        no_start, short = attacks.iteration_shortfall(r.iterations, r.budget.get("max_iter", 0))
        if counted.any():
            flags += attacks.iteration_problems(name, r.budget, r.iterations)
        rows.append({
            "attack": name,
            "counted_per_image": r.gradients if white else r.queries,
            "unit": "gradients" if white else "distinct queries",
            "bound_per_image": r.gradient_bound,
            "within_bound": within,
            "iterations_run_mean": float(r.iterations[counted].mean()) if counted.any() else np.nan,
            "images_stopped_early": int(short.sum()) if counted.any() else np.nan,
            "images_without_start": int(no_start.sum()) if counted.any() else np.nan,
            "spent_as_configured": not flags,
            "problems": "; ".join(flags),
        })
    return pd.DataFrame(rows)


def success_curve(record: attacks.AttackRecord, thresholds) -> pd.DataFrame:
    """Success within a perturbation budget, from one run of a minimal-perturbation attack.

    An adversarial example counts at threshold ε if it succeeded with a perturbation ≤ ε in the
    attack's norm: the robust-accuracy curve read off the measured norms, without re-attacking.
    """
    norm = norm_of(record.name, record.budget)
    size = {"inf": record.linf, "2": record.l2, "0": record.l0}[norm]
    correct = record.clean_correct
    rows = [
        {"attack": record.name, "norm": norm, "budget": float(t),
         "success_rate": float((record.success & (size <= t + 1e-6))[correct].mean())}
        for t in thresholds
    ]
    return pd.DataFrame(rows)


def norms_table(records: dict[str, attacks.AttackRecord]) -> pd.DataFrame:
    """Tidy per-sample perturbation norms of the successful adversarial examples."""
    frames = []
    for name, r in records.items():
        ok = r.success
        frames.append(pd.DataFrame({"attack": name, "sample": np.flatnonzero(ok), "linf": r.linf[ok], "l2": r.l2[ok], "l0": r.l0[ok]}))
    return pd.concat(frames, ignore_index=True)


def robustness_metrics(trained: models.Trained, x: np.ndarray, y: np.ndarray, n_clever: int, seed: int = 0,
                       device: str = "auto", clever_batches: int = 10, clever_batch_size: int = 20) -> pd.DataFrame:
    """ART's robustness metrics for the classifier: empirical robustness (minimal FGSM),
    loss sensitivity, and untargeted CLEVER-L2 scores on ``n_clever`` samples."""
    from art.metrics import clever_u, empirical_robustness, loss_sensitivity

    clf = attacks.wrap(trained.model, trained.input_shape, trained.num_classes, device)
    # CLEVER samples around each input with the global RNGs: seeded here, and the caller's states
    # restored afterwards, as around every attack
    with attacks.contained_random_states(seed):
        emp = empirical_robustness(clf, x, "fgsm", attack_params={"eps_step": 0.01, "eps": 1.0, "minimal": True, "batch_size": 128})
        onehot = np.eye(trained.num_classes, dtype=np.float32)[y]
        sens = loss_sensitivity(clf, x, onehot)
        rows = [
            {"metric": "empirical_robustness_fgsm", "sample": -1, "value": float(emp), "n": len(x)},
            {"metric": "loss_sensitivity", "sample": -1, "value": float(sens), "n": len(x)},
        ]
        for i in range(min(n_clever, len(x))):
            score = clever_u(clf, x[i], nb_batches=clever_batches, batch_size=clever_batch_size, radius=2.0, norm=2, pool_factor=3)
            rows.append({"metric": "clever_u_l2", "sample": i, "value": float(score), "n": 1})
    return pd.DataFrame(rows)
