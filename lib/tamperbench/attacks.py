"""The attack registry: nine ART evasion attacks behind one verb, with cached per-sample records.

    rec = attack("pgd", model, eps=0.1, max_iter=40).generate(x, y)

``model`` is a PyTorch classifier that outputs logits (or a :class:`models.Trained`). It is
wrapped in ART's ``PyTorchClassifier`` (float32 input, clip values [0, 1], the device set
explicitly) with counters of the model queries and gradient evaluations the attack makes.

Every budget is explicit: ART's defaults crawl on CPU (``batch_size=1`` for DeepFool and CW,
``max_eval=10000`` for HopSkipJump). Each run seeds Python's ``random``, NumPy's global RNG, the
fresh ``RandomState`` objects ART creates and torch, and restores every global random state
afterwards (:func:`contained_random_states`): same seed, same record, and no side effects.

What the record counts, in the papers' units:

- ``gradients``: class or loss gradients per image, never above the attack's
  ``gradient_bound`` (derived from what ART really calls; see each spec);
- ``queries``: *distinct* inputs the model was asked about, per image (a query, as the
  black-box papers count it); ``art_queries`` is ART's own count, which re-predicts inputs it
  already knows (Square predicts the whole batch at every iteration);
- ``iterations``: for Boundary, the iterations each image really ran (ART's step-size search
  may give up early; ``-1`` elsewhere).

A budget value that cannot bind (DeepFool's ``nb_grads`` at or above the number of classes,
HopSkipJump's ``max_eval`` above the peak of its schedule) raises an :class:`AttackWarning`; so
does a DeepFool ``nb_grads`` that the input makes moot (the union of its images' top classes is
every class), and the record keeps that message in ``warnings`` for the budget table.

``generate`` returns an :class:`AttackRecord` (clean and adversarial inputs, labels,
predictions, success, L∞/L2/L0 norms, wall time, queries). Records are cached under
``data/artifacts/attack/`` keyed by the model's weights, the inputs, the attack, its full budget
and the seed, so that later chapters (tampered datasets, detectors) reuse them.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import cache, models

RECORD_VERSION = 6
NORMS = {"inf": np.inf, "2": 2}
#: a pixel counts as changed (L0) when it moved by more than half a grey level: Carlini-Wagner's
#: tanh round trip leaves ~1e-7 noise on untouched pixels, which is not a change
L0_TOLERANCE = 0.5 / 255


class AttackError(ValueError):
    """A bad attack name, budget or input."""


class AttackWarning(UserWarning):
    """A budget value that cannot take effect, or a budget that was not spent."""


# --------------------------------------------------------------------------- budgets
def _positive(x):
    return x > 0


def _non_negative(x):
    return x >= 0


@dataclass(frozen=True)
class Param:
    default: Any
    kind: type  # int, float or str
    check: Callable[[Any], bool] | None = None
    rule: str = ""  # what ``check`` demands, for the error message
    optional: bool = False  # None is allowed and means "no cap"
    none_label: str = "null"  # what None means, for tables


@dataclass(frozen=True)
class AttackSpec:
    art_class: str
    box: str  # "white" or "black"
    budget: dict[str, Param]
    targeted: bool  # whether ART supports a targeted version
    #: gradient evaluations per image that ART can make under the budget, given the number of
    #: classes (white box only): ``bound(budget, nb_classes)``
    gradient_bound: Callable[[dict, int], float] | None = None
    #: True: fixed-budget attack (success is a measurement); False: minimal-perturbation attack
    #: that succeeds by construction and is judged by the size of its perturbation
    fixed_budget: bool = True
    note: str = ""  # how this implementation differs from the paper, for chapter 2's table
    #: fixed keyword arguments of the ART class (what distinguishes two registry names of one class)
    art_kwargs: dict = field(default_factory=dict)


EPS = Param(0.1, float, None, "in [0, clip_max]")  # checked against the clip range and norm
NORM_INF_2 = Param("inf", str, lambda v: v in NORMS, "one of: inf, 2")
STEPS = Param(20, int, _positive, "≥ 1")

def _apgd_spec(loss: str, note: str) -> AttackSpec:
    """APGD with one of ART's named losses: the same budget, bound and ART class."""
    return AttackSpec(
        "AutoProjectedGradientDescent", "white",
        {"eps": EPS, "norm": NORM_INF_2, "max_iter": Param(100, int, _positive, "≥ 1"),
         "eps_step": Param(None, float, _positive, "> 0, or null for eps (the paper's first step, 2·eps)", optional=True,
                           none_label="eps"),
         "nb_random_init": Param(1, int, _positive, "≥ 1")}, True,
        lambda b, k: b["max_iter"] * b["nb_random_init"],
        note=f"{note}; ART's first step is 2·eps_step",
        art_kwargs={"loss_type": loss},
    )


ATTACKS: dict[str, AttackSpec] = {
    "fgsm": AttackSpec(
        "FastGradientMethod", "white",
        {"eps": EPS, "norm": NORM_INF_2}, True, lambda b, k: 1,
    ),
    "bim": AttackSpec(
        "BasicIterativeMethod", "white",
        {"eps": EPS, "eps_step": Param(0.01, float, _positive, "> 0"), "max_iter": STEPS}, True,
        lambda b, k: b["max_iter"],
    ),
    "pgd": AttackSpec(
        "ProjectedGradientDescent", "white",
        {"eps": EPS, "eps_step": Param(0.01, float, _positive, "> 0"), "max_iter": Param(40, int, _positive, "≥ 1"),
         "norm": NORM_INF_2, "num_random_init": Param(1, int, _non_negative, "≥ 0")}, True,
        lambda b, k: b["max_iter"] * max(b["num_random_init"], 1),
    ),
    "deepfool": AttackSpec(
        "DeepFool", "white",
        {"max_iter": Param(10, int, _positive, "≥ 1"), "epsilon": Param(0.02, float, _non_negative, "≥ 0 (overshoot)"),
         "nb_grads": Param(None, int, _positive, "≥ 1, or null for every class", optional=True, none_label="every class")}, False,
        # ART differentiates each class it considers once before the loop and once after each
        # step; k is the number of classes considered: every class, or with a binding nb_grads
        # the union of every image's top nb_grads over the whole input (deepfool_classes)
        lambda b, k: (b["max_iter"] + 1) * k,
        fixed_budget=False,
        note="overshoot applied once, to the final perturbation (ART); the authors' code tests the overshot image at every step",
    ),
    "cw_l2": AttackSpec(
        "CarliniL2Method", "white",
        {"confidence": Param(0.0, float, _non_negative, "≥ 0"), "learning_rate": Param(0.05, float, _positive, "> 0"),
         "binary_search_steps": Param(4, int, _positive, "≥ 1"), "max_iter": Param(10, int, _positive, "≥ 1"),
         "initial_const": Param(1.0, float, _positive, "> 0"),
         # ART refuses 0 (its line search needs at least one halving and one doubling step)
         "max_halving": Param(2, int, _positive, "≥ 1 (ART needs one halving step)"),
         "max_doubling": Param(2, int, _positive, "≥ 1 (ART needs one doubling step)")}, True,
        # each step's loss gradient is the difference of two class gradients
        lambda b, k: 2 * b["binary_search_steps"] * b["max_iter"],
        fixed_budget=False,
        note="no norm limit: a binary search over the constant c, in tanh space",
    ),
    "hopskipjump": AttackSpec(
        "HopSkipJump", "black",
        {"norm": Param("2", str, lambda v: v in NORMS, "one of: inf, 2"), "max_iter": Param(10, int, _non_negative, "≥ 0"),
         "max_eval": Param(None, int, _positive, "≥ 1, or null for no cap", optional=True, none_label="uncapped"),
         "init_eval": Param(10, int, _positive, "≥ 1"), "init_size": Param(100, int, _positive, "≥ 1")}, True,
        fixed_budget=False,
        note="starts from an adversarial image and shrinks its distance to the clean one",
    ),
    "boundary": AttackSpec(
        "BoundaryAttack", "black",
        {"max_iter": Param(200, int, _non_negative, "≥ 0"), "delta": Param(0.01, float, _positive, "> 0"),
         "epsilon": Param(0.01, float, _positive, "> 0"), "num_trial": Param(25, int, _positive, "≥ 1"),
         "sample_size": Param(20, int, _positive, "≥ 1"), "init_size": Param(100, int, _positive, "≥ 1")}, True,
        fixed_budget=False,
        note="starts from an adversarial image and walks along the boundary towards the clean one",
    ),
    "pixel": AttackSpec(
        "PixelAttack", "black",
        {"th": Param(1, int, _positive, "≥ 1 (pixels changed)"), "max_iter": Param(100, int, _positive, "≥ 1"),
         "es": Param(1, int, lambda v: v in (0, 1), "0 (CMA-ES) or 1 (differential evolution)")}, True,
        note="differential evolution over th pixels (population 400); th > 1 is the few-pixel variant",
    ),
    # APGD (Croce & Hein, ICML 2020): PGD whose step size halves at checkpoints where the loss
    # stalls, with momentum; one gradient per iteration and restart
    "apgd_ce": _apgd_spec("cross_entropy", "cross-entropy loss"),
    "apgd_dlr": _apgd_spec("difference_logits_ratio", "difference-of-logits-ratio loss, invariant to the logits' scale"),
    # AutoAttack (Croce & Hein 2020): the standard list run in turn, each attack on the images the
    # previous ones left robust. ART's AutoAttack runs every listed attack untargeted first (so
    # APGD-T would become untargeted) and ART has no FAB: the sequence is composed here from ART's
    # APGD and Square. One gradient per APGD iteration, restart and target class
    "autoattack": AttackSpec(
        "AutoProjectedGradientDescent", "white",
        {"eps": EPS, "norm": NORM_INF_2, "max_iter": Param(100, int, _positive, "≥ 1 (APGD iterations)"),
         "nb_random_init": Param(1, int, _positive, "≥ 1"),
         "n_target_classes": Param(9, int, _positive, "≥ 1 (APGD-T's target classes, at most classes − 1)"),
         "square_queries": Param(5000, int, _positive, "≥ 1")}, False,
        lambda b, k: (1 + min(b["n_target_classes"], k - 1)) * b["max_iter"] * b["nb_random_init"],
        note="APGD-CE, then APGD-T (DLR, the top target classes), then Square, each on the images still robust; "
             "the standard list also has FAB-T, which ART lacks (it rarely adds a success)",
    ),
    "square": AttackSpec(
        "SquareAttack", "black",
        {"eps": EPS, "norm": NORM_INF_2, "max_iter": Param(100, int, _positive, "≥ 1"),
         "p_init": Param(0.8, float, lambda v: 0 < v <= 1, "in (0, 1]"), "nb_restarts": Param(1, int, _positive, "≥ 1")}, False,
    ),
}


def available() -> list[str]:
    return list(ATTACKS)


def spec(name: str) -> AttackSpec:
    if name not in ATTACKS:
        raise AttackError(f"unknown attack {name!r}; valid attacks: {', '.join(ATTACKS)}")
    return ATTACKS[name]


def resolve_budget(name: str, budget: dict, input_dim: int, clip_max: float = 1.0) -> dict:
    """Merge ``budget`` over the attack's defaults and validate every value."""
    s = spec(name)
    for key in budget:
        if key not in s.budget:
            raise AttackError(f"unknown budget parameter {key!r} for {name}; valid parameters: {', '.join(s.budget)}")
    out = {}
    for key, p in s.budget.items():
        value = budget.get(key, p.default)
        if key == "norm":
            value = "inf" if value in (np.inf, "inf", "Linf") else str(value)
        if value is None and p.optional:
            out[key] = None
            continue
        if p.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, p.kind) or isinstance(value, bool):
            raise AttackError(f"{name}: {key} must be {p.kind.__name__}, got {value!r}")
        if p.check is not None and not p.check(value):
            raise AttackError(f"{name}: {key}={value!r} is invalid; it must be {p.rule}")
        out[key] = value
    if "eps" in out:
        # the largest meaningful perturbation: the clip range per element, or its L2 length
        limit = clip_max if out.get("norm", "inf") == "inf" else clip_max * math.sqrt(input_dim)
        if not 0 <= out["eps"] <= limit:
            raise AttackError(f"{name}: eps={out['eps']} is outside [0, {limit:g}] (clip range [0, {clip_max:g}], norm {out.get('norm', 'inf')})")
        if out.get("eps_step") is not None and out["eps_step"] > out["eps"] > 0:
            raise AttackError(f"{name}: eps_step={out['eps_step']} must not exceed eps={out['eps']}")
    if out.get("max_eval") is not None and out["init_eval"] > out["max_eval"]:
        raise AttackError(f"{name}: init_eval={out['init_eval']} must not exceed max_eval={out['max_eval']}")
    return out


def hopskipjump_peak_evaluations(budget: dict) -> int:
    """The most evaluations per gradient estimate HopSkipJump's schedule reaches uncapped.

    ART uses ``min(int(init_eval·√(t+1)), max_eval)`` at iteration t = 0 … max_iter − 1.
    """
    return int(budget["init_eval"] * math.sqrt(max(budget["max_iter"], 1)))


def iteration_shortfall(iterations: np.ndarray, max_iter: int) -> tuple[np.ndarray, np.ndarray]:
    """(no adversarial start, stopped early) masks over the images whose iterations were counted
    (``iterations`` ≥ 0): an image that never started iterates 0 times."""
    counted = iterations[iterations >= 0]
    return (counted == 0) & (max_iter > 0), (counted > 0) & (counted < max_iter)


def iteration_problems(name: str, budget: dict, iterations: np.ndarray) -> list[str]:
    """Why an attack whose iterations are counted (Boundary) did not spend its budget."""
    no_start, short = iteration_shortfall(iterations, budget["max_iter"])
    problems = []
    if no_start.any():
        problems.append(f"{name}: no adversarial starting image found for {int(no_start.sum())} of "
                        f"{len(no_start)} images; raise init_size={budget['init_size']}")
    if short.any():
        counted = iterations[iterations >= 0]
        problems.append(f"{name}: the step-size search gave up before max_iter={budget['max_iter']} on "
                        f"{int(short.sum())} of {len(short)} images (mean {counted[short].mean():.0f} iterations "
                        f"run); raise num_trial={budget['num_trial']} to spend the budget")
    return problems


#: white-box attacks that ART 1.20.1 never stops early (fgsm.py, projected_gradient_descent_pytorch.py,
#: carlini.py): they spend their gradient bound exactly, so a count below it means the bound is wrong
FULL_BUDGET = ("fgsm", "bim", "pgd", "cw_l2")


def deepfool_classes(logits: np.ndarray, nb_grads: int | None, nb_classes: int) -> np.ndarray:
    """The classes whose gradients ART's DeepFool computes for input ``logits``, sorted.

    ART 1.20.1 (``art/attacks/evasion/deepfool.py``, ``DeepFool.generate``) predicts the whole
    input, then, when ``nb_grads < nb_classes``, takes ``np.unique`` of every image's top
    ``nb_grads`` classes over *all* of ``x``, before it batches; every batch differentiates that
    same set. Otherwise it differentiates every class.
    """
    if nb_grads is None or nb_grads >= nb_classes:
        return np.arange(nb_classes)
    return np.unique(np.argsort(-logits, axis=1)[:, :nb_grads])


def unbound_parameters(name: str, budget: dict, nb_classes: int) -> list[str]:
    """Why values of a resolved budget cannot take effect (an empty list when all can)."""
    problems = []
    if name == "deepfool" and budget["nb_grads"] is not None and budget["nb_grads"] >= nb_classes:
        problems.append(f"deepfool: nb_grads={budget['nb_grads']} cannot bind: with {nb_classes} classes every class "
                        "gradient is computed anyway (use null for every class)")
    if name == "hopskipjump" and budget["max_eval"] is not None:
        peak = hopskipjump_peak_evaluations(budget)
        if budget["max_eval"] >= peak:
            problems.append(f"hopskipjump: max_eval={budget['max_eval']} cannot bind: evaluations per step are "
                            f"min(init_eval·√(t+1), max_eval), which peaks at {peak} with init_eval={budget['init_eval']} "
                            f"and max_iter={budget['max_iter']} (use null for no cap)")
    return problems


# --------------------------------------------------------------------------- ART wrapper
def _counting_classifier_class():
    from art.estimators.classification import PyTorchClassifier

    class CountingClassifier(PyTorchClassifier):
        """ART's PyTorchClassifier that counts the images it predicts and differentiates."""

        def reset_counts(self):
            self.n_predicted = 0  # ART's count: every prediction, repeats included
            self.n_gradients = 0
            self._seen: set[bytes] = set()  # digests of the distinct inputs queried

        @property
        def n_distinct(self) -> int:
            """Distinct inputs queried: the papers' unit (a repeat costs an attacker nothing)."""
            return len(self._seen)

        def predict(self, x, batch_size=128, training_mode=False, **kwargs):
            # HopSkipJump and Boundary pass float64 candidates; the model is float32
            x = np.asarray(x, dtype=np.float32)
            self.n_predicted += len(x)
            flat = np.ascontiguousarray(x.reshape(len(x), -1))
            self._seen.update(hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in flat)
            return self._sliced_predict(x, batch_size, training_mode)

        def _sliced_predict(self, x, batch_size, training_mode):
            """ART's ``predict`` with slices for its DataLoader, which collates sample by sample
            and dominated the decision-based attacks' many small calls. Same batches, same output."""
            self._model.train(mode=training_mode)
            x_pre, _ = self._apply_preprocessing(x, y=None, fit=False)
            x_pre = torch.from_numpy(np.ascontiguousarray(x_pre))
            outputs = []
            with torch.no_grad():
                for i in range(0, len(x_pre), batch_size):
                    out = self._model(x_pre[i:i + batch_size].to(self._device))[-1].detach().cpu().numpy().astype(np.float32)
                    outputs.append(out[:, None] if out.ndim == 1 else out)
            results = np.vstack(outputs) if outputs else np.zeros((0, self.nb_classes), np.float32)
            return self._apply_postprocessing(preds=results, fit=False)

        def loss_gradient(self, x, y, *args, **kwargs):
            self.n_gradients += len(x)
            return super().loss_gradient(x, y, *args, **kwargs)

        def class_gradient(self, x, label=None, training_mode=False, **kwargs):
            per_sample = label is not None and np.ndim(label) == 1 and len(label) == len(x)
            self.n_gradients += len(x) * (self.nb_classes if label is None else 1)
            if per_sample and self.all_framework_preprocessing and len(x):
                return self._per_sample_class_gradient(x, np.asarray(label), training_mode)
            return super().class_gradient(x, label, training_mode, **kwargs)

        def _per_sample_class_gradient(self, x, label, training_mode):
            """Gradient of each sample's own logit ``z[n, label[n]]`` in one backward pass.

            ART loops over the distinct labels of the batch (up to one backward pass per
            class; Carlini-Wagner calls this twice per step). Samples are independent in eval
            mode, so the gradient of the sum of the picked logits gives each sample's gradient.
            """
            self._model.train(mode=training_mode)
            xt = torch.from_numpy(np.asarray(x, dtype=np.float32)).to(self._device).requires_grad_(True)
            x_in, _ = self._apply_preprocessing(xt, y=None, fit=False, no_grad=False)
            logits = self._model(x_in)[-1]
            picked = logits.gather(1, torch.as_tensor(label, device=logits.device).long().view(-1, 1)).sum()
            (grad,) = torch.autograd.grad(picked, xt)
            return grad.cpu().numpy()[:, None]

    return CountingClassifier


@contextlib.contextmanager
def seeded_fresh_random_states(seed: int):
    """Make ``np.random.RandomState()`` (no seed) deterministic while the block runs.

    ART's HopSkipJump and Boundary draw their random starting points from a *fresh*
    ``np.random.RandomState()``, seeded from the OS: seeding the global RNG does not reach it.
    Inside this block, each such call gets the next seed of a sequence fixed by ``seed``.
    """
    original = np.random.RandomState
    counter = itertools.count()

    class SeededRandomState(original):
        def __init__(self, s=None):
            super().__init__(np.random.SeedSequence([seed, next(counter)]).generate_state(1)[0] if s is None else s)

    np.random.RandomState = SeededRandomState
    try:
        yield
    finally:
        np.random.RandomState = original


class StandardAutoAttack:
    """AutoAttack's standard sequence on one counting classifier, with ART's ``generate`` verb:
    APGD-CE (untargeted), APGD-T (DLR loss, towards each of the top ``n_target_classes`` other
    classes by the clean logits), Square; each attack runs only on the images still classified
    correctly, and an image keeps the first perturbation that fools the classifier."""

    def __init__(self, clf, budget: dict, nb_classes: int, batch_size: int, count_through):
        self.clf, self.budget, self.nb_classes, self.batch_size = clf, budget, nb_classes, batch_size
        self._count_through = count_through

    def _apgd(self, loss: str, targeted: bool):
        import art.attacks.evasion as evasion

        b = self.budget
        attack = evasion.AutoProjectedGradientDescent(
            self.clf, norm=NORMS[b["norm"]], eps=b["eps"], eps_step=b["eps"], max_iter=b["max_iter"], targeted=targeted,
            nb_random_init=b["nb_random_init"], batch_size=self.batch_size, loss_type=loss, verbose=False)
        return self._count_through(attack, self.clf)

    def generate(self, x: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
        import art.attacks.evasion as evasion

        b, clf = self.budget, self.clf
        labels = y.argmax(1)
        x_adv = x.copy()
        robust = clf.predict(x, batch_size=512).argmax(1) == labels

        def run(attack, y_attack):
            idx = np.flatnonzero(robust)
            if len(idx) == 0:
                return
            out = attack.generate(x_adv[idx], y=y_attack[idx]).astype(np.float32)
            fooled = clf.predict(out, batch_size=512).argmax(1) != labels[idx]
            x_adv[idx[fooled]] = out[fooled]
            robust[idx[fooled]] = False

        run(self._apgd("cross_entropy", False), y)
        logits = clf.predict(x, batch_size=512)
        logits[np.arange(len(x)), labels] = -np.inf
        order = np.argsort(-logits, axis=1)  # the other classes, most likely first
        apgd_t = self._apgd("difference_logits_ratio", True)
        for t in range(min(b["n_target_classes"], self.nb_classes - 1)):
            run(apgd_t, np.eye(self.nb_classes, dtype=np.float32)[order[:, t]])
        square = evasion.SquareAttack(clf, norm=NORMS[b["norm"]], eps=b["eps"], max_iter=b["square_queries"],
                                      nb_restarts=1, batch_size=self.batch_size, verbose=False)
        run(square, y)
        return x_adv


def seed_everything(seed: int) -> None:
    """Seed Python's ``random`` (Square with ``norm=2``), NumPy's global RNG (the black-box
    attacks, PGD's random start) and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def seeded_random_states(seed: int):
    """Seed every random source an ART attack draws from, ART's fresh ``RandomState()`` too."""
    seed_everything(seed)
    with seeded_fresh_random_states(seed):
        yield


@contextlib.contextmanager
def contained_random_states(seed: int):
    """Seed every random source while the block runs, and restore the caller's states after it."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):
        try:
            with seeded_random_states(seed):
                yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


@contextlib.contextmanager
def counted_boundary_iterations(art_attack):
    """Count the iterations ART's BoundaryAttack completes on each image, in image order.

    ART gives up on an image when its step-size search fails ``num_trial`` times, without
    saying so; the budget that was really spent is only visible by counting. Each image's
    ``_perturb`` opens a counter; the iteration loop's ``trange`` advances it after each
    completed iteration. Images with no adversarial start never iterate and count 0.
    """
    import art.attacks.evasion.boundary as boundary_module

    counts: list[int] = []
    original_perturb, original_trange = art_attack._perturb, boundary_module.trange

    def perturb(*args, **kwargs):
        counts.append(0)
        return original_perturb(*args, **kwargs)

    def counting_trange(n, *args, **kwargs):
        for i in range(n):
            yield i
            counts[-1] += 1  # reached only when the loop asks for the next iteration

    art_attack._perturb, boundary_module.trange = perturb, counting_trange
    try:
        yield counts
    finally:
        boundary_module.trange = original_trange
        del art_attack._perturb  # back to the class's method


def wrap(model: nn.Module, input_shape: tuple[int, ...], nb_classes: int, device: str = "auto"):
    """ART's PyTorchClassifier over a logits model: float32 inputs in [0, 1], explicit device."""
    dev = models.pick_device(device)
    clf = _counting_classifier_class()(
        model=model.eval(), loss=nn.CrossEntropyLoss(), input_shape=tuple(input_shape), nb_classes=nb_classes,
        clip_values=(0.0, 1.0), channels_first=True, device_type="gpu" if dev.type == "cuda" else "cpu",
    )
    clf.reset_counts()
    return clf


array_digest = cache.array_digest
model_digest = cache.model_digest


# --------------------------------------------------------------------------- records
@dataclass
class AttackRecord:
    """Per-sample outcome of one attack run (arrays aligned on the attacked samples)."""

    name: str
    budget: dict
    x_clean: np.ndarray
    x_adv: np.ndarray
    y_true: np.ndarray
    pred_clean: np.ndarray
    pred_adv: np.ndarray
    target: np.ndarray  # the target class, or -1 when untargeted
    success: np.ndarray  # on a clean-correct sample: the prediction left y (or reached the target)
    linf: np.ndarray
    l2: np.ndarray
    l0: np.ndarray  # pixels (spatial positions) changed by more than L0_TOLERANCE
    seconds: float
    queries: float  # distinct inputs queried per image (the black-box papers' unit)
    gradients: float  # gradient evaluations per image (class or loss gradients)
    grad_seconds: float  # one forward+backward pass per image, timed just before the attack
    key: str = ""
    iterations: np.ndarray | None = None  # iterations run per image (Boundary), -1 where not counted
    art_queries: float = float("nan")  # ART's predictions per image, repeats included
    gradient_bound: float = float("nan")  # the most gradients per image ART can make (NaN: black box)
    #: the run's AttackWarnings that the arrays cannot reproduce (DeepFool's nb_grads made moot by
    #: the input's class union); Boundary's early stops follow from ``iterations`` instead
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.iterations is None:
            self.iterations = np.full(len(self.y_true), -1, dtype=np.int64)
        self.warnings = [str(w) for w in self.warnings]

    _SCALARS = ("seconds", "queries", "art_queries", "gradients", "gradient_bound", "grad_seconds")
    _ARRAYS = ("x_clean", "x_adv", "y_true", "pred_clean", "pred_adv", "target", "success", "linf", "l2", "l0", "iterations")

    def __len__(self) -> int:
        return len(self.y_true)

    @property
    def cost_ratio(self) -> float:
        """Time per image over the time of the budget's gradient evaluations (white box)."""
        if not np.isfinite(self.gradient_bound) or self.grad_seconds <= 0:
            return float("nan")
        return self.seconds / len(self) / (self.gradient_bound * self.grad_seconds)

    @property
    def clean_correct(self) -> np.ndarray:
        return self.pred_clean == self.y_true

    @property
    def success_rate(self) -> float:
        """Success rate on the samples the classifier got right before the attack."""
        ok = self.clean_correct
        return float(self.success[ok].mean()) if ok.any() else float("nan")

    def to_arrays(self) -> dict:
        arrays = {k: getattr(self, k) for k in self._ARRAYS}
        arrays.update({k: np.float64(getattr(self, k)) for k in self._SCALARS})
        arrays["warnings"] = np.array(self.warnings, dtype=str)
        return arrays

    @classmethod
    def from_arrays(cls, name: str, budget: dict, arrays: dict, key: str = "") -> "AttackRecord":
        scalars = {k: float(arrays[k]) for k in cls._SCALARS}
        # records cached before the field existed have no warnings
        warns = [str(w) for w in arrays.get("warnings", ())]
        rest = {k: v for k, v in arrays.items() if k not in scalars and k != "warnings"}
        return cls(name, budget, **rest, **scalars, key=key, warnings=warns)


def perturbation_norms(x_clean: np.ndarray, x_adv: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = (x_adv - x_clean).reshape(len(x_clean), x_clean.shape[1], -1)
    linf = np.abs(d).max(axis=(1, 2))
    l2 = np.sqrt((d.astype(np.float64) ** 2).sum(axis=(1, 2)))
    l0 = (np.abs(d) > L0_TOLERANCE).any(axis=1).sum(axis=1)  # a pixel counts once, whatever its channels
    return linf.astype(np.float32), l2.astype(np.float32), l0.astype(np.int64)


# --------------------------------------------------------------------------- the verb
class Attack:
    """One configured attack on one model; ``generate(x, y)`` runs it (or loads its record)."""

    def __init__(self, name: str, model: nn.Module, input_shape: tuple[int, ...], nb_classes: int,
                 budget: dict, targeted: bool, seed: int, batch_size: int, device: str):
        self.name, self.spec = name, spec(name)
        self.model, self.input_shape, self.nb_classes = model, tuple(input_shape), nb_classes
        self.budget = resolve_budget(name, budget, int(np.prod(input_shape)))
        if targeted and not self.spec.targeted:
            supported = [n for n, s in ATTACKS.items() if s.targeted]
            raise AttackError(f"{name} has no targeted version in ART; targeted attacks: {', '.join(supported)}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise AttackError(f"batch_size must be an int ≥ 1, got {batch_size!r}")
        self.targeted, self.seed, self.batch_size, self.device = targeted, int(seed), batch_size, device
        for problem in unbound_parameters(name, self.budget, nb_classes):
            warnings.warn(problem, AttackWarning, stacklevel=3)

    @property
    def gradient_bound(self) -> float | None:
        """Gradient evaluations per image that ART can make under the budget, on any input (None
        for black box). A record's bound follows its input where ART's calls do: DeepFool with a
        binding ``nb_grads`` differentiates only the input's class union (:meth:`_deepfool_bound`)."""
        return self.spec.gradient_bound(self.budget, self.nb_classes) if self.spec.gradient_bound else None

    def _check_input(self, x, y):
        if not isinstance(x, np.ndarray) or x.dtype != np.float32:
            raise AttackError(f"x must be a float32 numpy array, got {type(x).__name__} of {getattr(x, 'dtype', '?')}")
        if x.ndim != 1 + len(self.input_shape) or tuple(x.shape[1:]) != self.input_shape:
            raise AttackError(f"x must have shape (N, {', '.join(map(str, self.input_shape))}), got {x.shape}")
        if len(x) == 0:
            raise AttackError("x is empty: nothing to attack")
        if x.min() < 0 or x.max() > 1:
            raise AttackError(f"x must lie in the clip range [0, 1], got [{x.min():.3g}, {x.max():.3g}]")
        if not isinstance(y, np.ndarray) or y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
            raise AttackError(f"y must be an integer numpy array of shape ({len(x)},), got {getattr(y, 'shape', type(y).__name__)}")
        if y.min() < 0 or y.max() >= self.nb_classes:
            raise AttackError(f"labels must lie in [0, {self.nb_classes - 1}]")

    def cache_params(self, x: np.ndarray, y: np.ndarray) -> dict:
        params = {
            "version": RECORD_VERSION, "attack": self.name, "budget": self.budget, "targeted": self.targeted,
            "seed": self.seed, "batch_size": self.batch_size, "model": model_digest(self.model), "data": array_digest(x, y),
        }
        if self._deepfool_subset():
            # records made before the bound and the warning followed ART's whole-input union carry
            # neither: a new key for these runs alone (every other record stays valid)
            params["deepfool_classes"] = "whole-input union"
        return params

    def _deepfool_subset(self) -> bool:
        """Whether ART's DeepFool differentiates a subset of the classes (``nb_grads`` < classes)."""
        nb_grads = self.budget.get("nb_grads") if self.name == "deepfool" else None
        return nb_grads is not None and nb_grads < self.nb_classes

    def targets(self, y: np.ndarray) -> np.ndarray:
        """Seeded random target classes, each different from the true label (or -1s)."""
        if not self.targeted:
            return np.full(len(y), -1, dtype=np.int64)
        shift = np.random.default_rng(self.seed).integers(1, self.nb_classes, len(y))
        return ((y + shift) % self.nb_classes).astype(np.int64)

    @staticmethod
    def _count_through(art_attack, clf):
        """APGD with a named loss builds a fresh ART classifier around the same model: give its
        loss to ours and point the attack back at ours, so that its gradients are counted."""
        own = art_attack.estimator
        if own is not clf:
            clf._loss = own._loss
            for flag in ("_reduce_labels", "_int_labels", "_probability_labels"):
                if hasattr(own, flag):
                    setattr(clf, flag, getattr(own, flag))
            art_attack._estimator = clf
        return art_attack

    def _autoattack(self, clf):
        return StandardAutoAttack(clf, self.budget, self.nb_classes, self.batch_size, self._count_through)

    def _art_attack(self, clf):
        import art.attacks.evasion as evasion

        if self.name == "autoattack":
            return self._autoattack(clf)
        kwargs = dict(self.budget)
        if self.name == "deepfool" and kwargs["nb_grads"] is None:
            kwargs["nb_grads"] = self.nb_classes
        if self.name == "hopskipjump" and kwargs["max_eval"] is None:  # no cap: the schedule's own peak
            kwargs["max_eval"] = max(hopskipjump_peak_evaluations(kwargs), kwargs["init_eval"])
        if "norm" in kwargs:
            kwargs["norm"] = NORMS[kwargs["norm"]]
        if self.spec.targeted:
            kwargs["targeted"] = self.targeted
        if self.name != "pixel":  # ART's PixelAttack takes no batch size
            kwargs["batch_size"] = self.batch_size
        if self.name == "fgsm" or ("eps_step" in kwargs and kwargs["eps_step"] is None):
            kwargs["eps_step"] = kwargs["eps"]
        if self.name != "fgsm":  # FGSM alone takes no verbose flag
            kwargs["verbose"] = False
        return self._count_through(getattr(evasion, self.spec.art_class)(clf, **{**kwargs, **self.spec.art_kwargs}), clf)

    def _run(self, x: np.ndarray, y: np.ndarray) -> dict:
        # the whole run, predictions included: ART's predict draws a DataLoader seed from torch
        with contained_random_states(self.seed):
            return self._run_seeded(x, y)

    def _run_seeded(self, x: np.ndarray, y: np.ndarray) -> dict:
        clf = wrap(self.model, self.input_shape, self.nb_classes, self.device)
        logits_clean = clf.predict(x, batch_size=512)
        pred_clean = logits_clean.argmax(1)
        bound, problems = self.gradient_bound, []
        if self._deepfool_subset():
            bound, problems = self._deepfool_bound(clf, x)
        target = self.targets(y)
        art_attack = self._art_attack(clf)
        grad_seconds = self._time_gradient(x)
        clf.reset_counts()
        if self.targeted:
            labels = np.eye(self.nb_classes, dtype=np.float32)[target]
        elif self.spec.box == "black" or self.name in ("deepfool",):
            labels = None  # these attack the model's own prediction
        else:
            labels = np.eye(self.nb_classes, dtype=np.float32)[y]
        iterations = np.full(len(x), -1, dtype=np.int64)
        counting = counted_boundary_iterations(art_attack) if self.name == "boundary" else contextlib.nullcontext()
        start = time.perf_counter()
        with seeded_random_states(self.seed), counting as counts:
            x_adv = art_attack.generate(x.copy(), y=labels).astype(np.float32)
        seconds = time.perf_counter() - start
        if counts is not None:
            iterations = np.asarray(counts, dtype=np.int64)
            self._warn_if_boundary_stopped_early(iterations)
        queries, art_queries, gradients = clf.n_distinct / len(x), clf.n_predicted / len(x), clf.n_gradients / len(x)
        x_adv = np.clip(x_adv, 0.0, 1.0)
        pred_adv = clf.predict(x_adv, batch_size=512).argmax(1)
        success = (pred_clean == y) & ((pred_adv == target) if self.targeted else (pred_adv != y))
        linf, l2, l0 = perturbation_norms(x, x_adv)
        return dict(
            x_clean=x, x_adv=x_adv, y_true=y.astype(np.int64), pred_clean=pred_clean.astype(np.int64),
            pred_adv=pred_adv.astype(np.int64), target=target, success=success, linf=linf, l2=l2, l0=l0,
            iterations=iterations, seconds=np.float64(seconds), queries=np.float64(queries),
            art_queries=np.float64(art_queries), gradients=np.float64(gradients),
            gradient_bound=np.float64(np.nan if bound is None else bound), grad_seconds=np.float64(grad_seconds),
            warnings=np.array(problems, dtype=str),
        )

    def _deepfool_bound(self, clf, x: np.ndarray) -> tuple[float, list[str]]:
        """(the gradient bound for this input, the warning when ``nb_grads`` is moot here).

        ART's DeepFool takes the union of every image's top ``nb_grads`` classes over the whole
        input (:func:`deepfool_classes`) and differentiates each class of it at every step, so the
        bound is ``(max_iter + 1) · |union|``; when the union is every class, ``nb_grads`` saves
        nothing. The logits come from the same call as ART's (``predict(x, batch_size)``).
        """
        nb_grads = self.budget["nb_grads"]
        considered = deepfool_classes(clf.predict(x, batch_size=self.batch_size), nb_grads, self.nb_classes)
        problems = []
        if len(considered) >= self.nb_classes:
            problems.append(f"deepfool: nb_grads={nb_grads} does not bind here: ART takes the union of the top "
                            f"{nb_grads} classes over the whole input ({len(x)} images), which covers all "
                            f"{self.nb_classes} classes")
            warnings.warn(problems[-1], AttackWarning, stacklevel=4)
        return self.spec.gradient_bound(self.budget, len(considered)), problems

    def _warn_if_boundary_stopped_early(self, iterations: np.ndarray) -> None:
        for problem in iteration_problems(self.name, self.budget, iterations):
            warnings.warn(problem, AttackWarning, stacklevel=4)

    def _time_gradient(self, x: np.ndarray, repeats: int = 5) -> float:
        """Seconds per image of one forward+backward pass on a batch of ``x`` (median, warm)."""
        dev = models.pick_device(self.device)
        xb = torch.from_numpy(x[: self.batch_size]).to(dev).requires_grad_(True)
        yb = torch.zeros(len(xb), dtype=torch.long, device=dev)
        timings = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            torch.autograd.grad(F.cross_entropy(self.model(xb), yb), xb)
            timings.append(time.perf_counter() - start)
        return float(np.median(timings[1:])) / len(xb)

    def generate(self, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> AttackRecord:
        """Attack ``x`` (labels ``y``), or load the cached record of the same run."""
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        if isinstance(y, torch.Tensor):
            y = y.detach().cpu().numpy()
        self._check_input(x, y)
        params = self.cache_params(x, y)
        arrays = cache.cached("attack", params, lambda: self._run(x, y), fmt="npz")
        return AttackRecord.from_arrays(self.name, self.budget, arrays, cache.content_key(params))


def attack(
    name: str,
    model: nn.Module | models.Trained,
    *,
    targeted: bool = False,
    seed: int = 0,
    batch_size: int = 128,
    device: str = "auto",
    input_shape: tuple[int, ...] | None = None,
    nb_classes: int | None = None,
    **budget,
) -> Attack:
    """Configure attack ``name`` against ``model``; see the module docstring.

    ``input_shape`` and ``nb_classes`` default to what a :class:`models.Trained` recorded.
    """
    spec(name)  # unknown names fail first
    if isinstance(model, models.Trained):
        input_shape = input_shape or model.input_shape
        nb_classes = nb_classes or model.num_classes
        model = model.model
    if input_shape is None or nb_classes is None:
        raise AttackError("pass input_shape and nb_classes with a bare nn.Module (a models.Trained knows them)")
    return Attack(name, model, input_shape, nb_classes, budget, targeted, seed, batch_size, device)
