r"""Tampered batches: is this batch tampered, and which of its samples? (chapter 5)

An incoming batch holds n inputs, a fraction p of them adversarial. Two questions:

**(a) Is the batch tampered?** Every test returns a p-value for "this batch is clean":

- on one detector's scores, against clean *calibration* scores:

  - ``ks``: the one-sided two-sample Kolmogorov–Smirnov statistic
    :math:`D = \sup_s F_{cal}(s) - F_{batch}(s)` (the batch scores sit higher), as
    ``scipy.stats.ks_2samp(batch, cal, alternative="less")`` computes it;
  - ``mann_whitney``: the Mann–Whitney U of the batch against the calibration scores
    (``scipy.stats.mannwhitneyu``'s U of the first sample), divided by the product of the sample
    sizes so that references of different sizes compare;
  - ``tail_count``: the number of samples whose conformal p-value is ≤ γ (each would be flagged
    at a strict per-sample level), ties broken by the mean of 1 − u. Unlike KS and MMD it does
    not dilute: ten tampered samples among a thousand still add ten flags;
  - ``higher_criticism`` and ``berk_jones``: the subset-scan statistics of
    :mod:`~tamperbench.detectors.subset_scan`, run over the batch's conformal p-values (Donoho &
    Jin 2004): the most anomalous subset of *samples*;

- ``mmd``: the Gaussian-kernel maximum mean discrepancy between the batch's penultimate
  features and a clean reference (Gretton et al. 2012), detector-free; :func:`mmd_test` gives
  its permutation p-value :math:`(1 + b)/(1 + B)` for a single batch;
- ``group_scan``: group subset scanning over a layer's activations (nodes × samples), the
  subset-scanning papers' way to find a tampered *group* (:func:`group_scan_statistic`).

Every statistic is larger for more evidence of tampering, and every test is calibrated the same
way: its statistic on many clean **null batches** of the same n drawn from the calibration set,
computed once per (detector, n) (:class:`NullDistribution`); the p-value of a batch is
:math:`(1 + \#\{null \ge t\}) / (1 + B_{null})`, so the false-alarm rate is α by construction and
the chapter measures it.

**(b) Which samples?** Conformal p-values :math:`u = (1 + \#\{cal \ge s\}) / (1 + n_{cal})`
(never below :math:`1/(n_{cal}+1)`), then Benjamini–Hochberg at level q
(``scipy.stats.false_discovery_control``); conformal p-values are positively dependent, so BH
keeps the false discovery rate ≤ q (Bates et al. 2023).

**Populations**, disjoint by construction (:func:`held_out_split`): the detectors' *fit* data
(the training split); the *calibration* set and the *clean batch population*, two disjoint parts
of the test images outside the attack pool; and per attack the *adversarial population*, the
successful examples of chapter 4's evaluation half.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .detectors.combined import conformal_pvalues as _conformal_pvalues
from .detectors.subset_scan import scan_statistic

#: batch tests on one detector's scores
SCORE_TESTS = ("ks", "mann_whitney", "tail_count", "higher_criticism", "berk_jones")
#: batch tests on features or activations (no detector)
FEATURE_TESTS = ("mmd", "group_scan")
TESTS = SCORE_TESTS + FEATURE_TESTS


class BatchError(ValueError):
    """A bad population, batch or test parameter."""


# --------------------------------------------------------------------------- populations
@dataclass(frozen=True)
class HeldOut:
    """Indices, in the test split, of the clean held-out populations: ``calibration`` and
    ``clean`` (chapter 5), and ``combination``, the images that calibrate the combined
    detectors' member p-values (:mod:`tamperbench.combination`), set apart first."""

    calibration: np.ndarray
    clean: np.ndarray
    combination: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def held_out_split(n_test: int, pool_indices: np.ndarray, n_calibration: int, seed: int = 0,
                   n_combination: int = 0) -> HeldOut:
    """Split the test images outside the attack pool into the combination's calibration set
    (its first ``n_combination`` images, in a seeded order), the calibration set and the clean
    batch population (the rest).

    The attack pool (whose images the adversarial population comes from) is excluded, so no
    clean original of an adversarial example is ever a clean sample or a calibration point. The
    combination's set comes first in the order, so it is the same whatever ``n_calibration``.
    """
    if isinstance(n_calibration, bool) or not isinstance(n_calibration, int) or n_calibration < 1:
        raise BatchError(f"n_calibration must be an int ≥ 1, got {n_calibration!r}")
    if isinstance(n_combination, bool) or not isinstance(n_combination, int) or n_combination < 0:
        raise BatchError(f"n_combination must be an int ≥ 0, got {n_combination!r}")
    rest = np.setdiff1d(np.arange(n_test), np.asarray(pool_indices))
    if n_combination + n_calibration >= len(rest):
        raise BatchError(f"n_calibration={n_calibration} (+ n_combination={n_combination}) leaves no clean batch "
                         f"population: only {len(rest)} test images lie outside the attack pool")
    order = np.random.default_rng([seed, 5]).permutation(rest)
    k = n_combination
    return HeldOut(np.sort(order[k : k + n_calibration]), np.sort(order[k + n_calibration :]), np.sort(order[:k]))


# --------------------------------------------------------------------------- per-sample quantities
def conformal_pvalues(calibration: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """:math:`(1 + \\#\\{cal \\ge s\\}) / (1 + n_{cal})` for each score (higher score = more suspicious)."""
    return _conformal_pvalues(calibration, scores, "upper")


@dataclass
class SampleStats:
    """What every score test needs of each sample, relative to the calibration scores.

    ``u``: conformal p-value; ``below``: :math:`\\#\\{cal < s\\} / n_{cal}` (KS);
    ``rank``: :math:`\\#\\{cal < s\\} + \\tfrac12 \\#\\{cal = s\\}` (Mann–Whitney's U).
    """

    u: np.ndarray
    below: np.ndarray
    rank: np.ndarray


def sample_stats(calibration: np.ndarray, scores: np.ndarray) -> SampleStats:
    """Per-sample statistics of ``scores`` against ``calibration``."""
    cal = np.sort(np.asarray(calibration, dtype=np.float64))
    s = np.asarray(scores, dtype=np.float64)
    less = np.searchsorted(cal, s, side="left").astype(np.float64)
    equal = np.searchsorted(cal, s, side="right") - less
    n = len(cal)
    return SampleStats(u=(1.0 + n - less) / (1.0 + n), below=less / n, rank=(less + 0.5 * equal) / n)


def score_statistics(stats: SampleStats, idx: np.ndarray, gamma: float = 0.001,
                     tests=SCORE_TESTS, alpha_max: float = 0.5) -> dict[str, np.ndarray]:
    """Each score test's statistic for the batches ``idx`` (B×n indices into ``stats``)."""
    idx = np.atleast_2d(idx)
    n = idx.shape[1]
    u = stats.u[idx]
    out = {}
    if "ks" in tests:
        below = np.sort(stats.below[idx], axis=1)
        steps = np.arange(n, dtype=np.float64) / n  # F_batch just left of the i-th smallest score
        out["ks"] = np.maximum(0.0, (below - steps[None, :]).max(axis=1))
    if "mann_whitney" in tests:
        out["mann_whitney"] = stats.rank[idx].mean(axis=1)
    if "tail_count" in tests:
        out["tail_count"] = (u <= gamma).sum(axis=1).astype(np.float64)
    if "higher_criticism" in tests:
        out["higher_criticism"] = scan_statistic(u, "higher_criticism", alpha_max)
    if "berk_jones" in tests:
        out["berk_jones"] = scan_statistic(u, "berk_jones", alpha_max)
    # The count, and the scans dominated by the smallest p-value, take few distinct values: a
    # Monte-Carlo test on them rejects far less often than α. The batch's mean of 1 − u, scaled
    # far below any gap between distinct values, breaks their ties without reordering the rest.
    tiebreak = 1e-6 * (1.0 - u).mean(axis=1)
    return {t: v + tiebreak if t in ("tail_count", "higher_criticism", "berk_jones") else v for t, v in out.items()}


# --------------------------------------------------------------------------- batches
@dataclass
class Batches:
    """B batches of n: ``clean`` (B×(n−k)) and ``adversarial`` (B×k) indices into their
    populations, and whether adversarial examples had to be drawn more than once."""

    clean: np.ndarray
    adversarial: np.ndarray
    n: int
    k: int
    repeats_adversarial: bool

    @property
    def mask(self) -> np.ndarray:
        """Ground truth, aligned with :meth:`join`: True for the adversarial columns."""
        return np.r_[np.zeros(self.n - self.k, bool), np.ones(self.k, bool)]


def tampered_count(n: int, p: float) -> int:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise BatchError(f"p must be a number in [0, 1], got {p!r}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise BatchError(f"n must be an int ≥ 1, got {n!r}")
    return int(round(p * n))


def _without_replacement(rng: np.random.Generator, population: int, size: int, batches: int) -> np.ndarray:
    """``batches`` rows of ``size`` distinct indices in [0, population) (random keys, argpartition)."""
    if size == 0:
        return np.zeros((batches, 0), dtype=np.int64)
    keys = rng.random((batches, population))
    return np.argpartition(keys, size - 1, axis=1)[:, :size].astype(np.int64)


def draw_batches(n_clean: int, n_adversarial: int, n: int, p: float, batches: int, seed) -> Batches:
    """Seeded batches of n with round(p·n) adversarial samples, the rest clean.

    Within a batch, samples are distinct. Adversarial examples are drawn with replacement only
    when the population is smaller than round(p·n) (``repeats_adversarial`` says so).
    """
    k = tampered_count(n, p)
    if n - k > n_clean:
        raise BatchError(f"a batch of n={n} at p={p} needs {n - k} clean samples; the clean population has {n_clean}")
    if k and n_adversarial == 0:
        raise BatchError(f"p={p} needs {k} adversarial samples per batch; the adversarial population is empty")
    rng = np.random.default_rng(seed)
    clean = _without_replacement(rng, n_clean, n - k, batches)
    repeats = k > n_adversarial
    adv = (rng.integers(0, n_adversarial, (batches, k)) if repeats
           else _without_replacement(rng, n_adversarial, k, batches))
    return Batches(clean, adv, n, k, repeats)


# --------------------------------------------------------------------------- calibration
@dataclass
class NullDistribution:
    """A test's statistic on clean null batches of one size: the reference of every p-value."""

    statistics: np.ndarray

    def __post_init__(self):
        self.statistics = np.sort(np.asarray(self.statistics, dtype=np.float64))

    def pvalues(self, observed: np.ndarray) -> np.ndarray:
        """Monte-Carlo p-values :math:`(1 + \\#\\{null \\ge t\\}) / (1 + B)`, never 0."""
        at_least = len(self.statistics) - np.searchsorted(self.statistics, np.asarray(observed, float), side="left")
        return (1.0 + at_least) / (1.0 + len(self.statistics))


def _held_out_stats(calibration: np.ndarray, idx: np.ndarray) -> SampleStats:
    """Per-sample statistics of null batches ``idx`` (B×n rows of the calibration set), each
    against the *rest* of the calibration set (n_cal − n points), as an independent clean batch
    would be against a reference: the batch never sits in its own reference."""
    from scipy.stats import rankdata

    cal = np.asarray(calibration, dtype=np.float64)
    s = cal[idx]  # B×n
    ordered = np.sort(cal)
    less_cal = np.searchsorted(ordered, s, side="left").astype(np.float64)
    equal_cal = np.searchsorted(ordered, s, side="right") - less_cal
    less_batch = rankdata(s, method="min", axis=1) - 1.0  # batch points strictly below
    equal_batch = rankdata(s, method="max", axis=1) - less_batch  # batch points equal, itself included
    less, equal = less_cal - less_batch, equal_cal - equal_batch
    n_ref = len(cal) - idx.shape[1]
    return SampleStats(u=(1.0 + n_ref - less) / (1.0 + n_ref), below=less / n_ref, rank=(less + 0.5 * equal) / n_ref)


def reference_for(calibration_scores: np.ndarray, n: int, seed) -> np.ndarray:
    """The reference a batch of n is scored against: the calibration set less n seeded points.

    Null batches are n calibration points against the other n_cal − n, so an incoming batch is
    compared with a reference of the same size: rank statistics (and the conformal p-values'
    granularity) then have exactly the null's distribution.
    """
    if n >= len(calibration_scores):
        raise BatchError(f"batches of n={n} need more than {n} calibration scores, got {len(calibration_scores)}")
    keep = np.random.default_rng([seed, n]).permutation(len(calibration_scores))[n:]
    return np.asarray(calibration_scores)[np.sort(keep)]


def score_nulls(calibration_scores: np.ndarray, n: int, batches: int, seed, gamma: float = 0.001,
                tests=SCORE_TESTS) -> dict[str, NullDistribution]:
    """Null distributions of the score tests for batches of n: each null batch is n calibration
    points scored against the other n_cal − n."""
    if n >= len(calibration_scores):
        raise BatchError(f"null batches of n={n} need more than {n} calibration scores, got {len(calibration_scores)}")
    idx = _without_replacement(np.random.default_rng(seed), len(calibration_scores), n, batches)
    stats = _held_out_stats(calibration_scores, idx)
    cols = np.arange(idx.size).reshape(idx.shape)
    flat = SampleStats(stats.u.ravel(), stats.below.ravel(), stats.rank.ravel())
    return {t: NullDistribution(v) for t, v in score_statistics(flat, cols, gamma, tests).items()}


# --------------------------------------------------------------------------- which samples
def benjamini_hochberg(pvalues: np.ndarray, q: float) -> np.ndarray:
    """Flags (same shape) of BH at level q on each row of conformal p-values (SciPy's BH)."""
    from scipy.stats import false_discovery_control

    if not 0 < q < 1:
        raise BatchError(f"q must lie in (0, 1), got {q!r}")
    p = np.atleast_2d(pvalues)
    return false_discovery_control(p, axis=1, method="bh") <= q


def flag_quality(flags: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per batch: false discovery proportion (0 when nothing is flagged) and recall (NaN at k=0)."""
    flags = np.atleast_2d(flags)
    n_flags = flags.sum(axis=1)
    false = (flags & ~mask[None, :]).sum(axis=1)
    fdp = np.where(n_flags > 0, false / np.maximum(n_flags, 1), 0.0)
    k = int(mask.sum())
    recall = (flags & mask[None, :]).sum(axis=1) / k if k else np.full(len(flags), np.nan)
    return fdp, recall


# --------------------------------------------------------------------------- MMD
def median_bandwidth(features: torch.Tensor, max_points: int = 1000, seed: int = 0) -> float:
    """The median heuristic: the median pairwise distance of (a subsample of) ``features``."""
    g = torch.Generator().manual_seed(seed)
    f = features[torch.randperm(len(features), generator=g)[:max_points]].double()
    d = torch.cdist(f, f)
    return float(d[torch.triu(torch.ones_like(d, dtype=torch.bool), 1)].median())


def gaussian_kernel(a: torch.Tensor, b: torch.Tensor, bandwidth: float) -> torch.Tensor:
    return torch.exp(-torch.cdist(a, b).pow(2) / (2.0 * bandwidth**2))


def mmd2(x: torch.Tensor, y: torch.Tensor, bandwidth: float) -> float:
    """Biased squared MMD between samples ``x`` and ``y`` with a Gaussian kernel."""
    return float(gaussian_kernel(x, x, bandwidth).mean() + gaussian_kernel(y, y, bandwidth).mean()
                 - 2 * gaussian_kernel(x, y, bandwidth).mean())


def mmd_test(x: torch.Tensor, y: torch.Tensor, bandwidth: float | None = None, permutations: int = 1000,
             seed: int = 0) -> tuple[float, float]:
    """(MMD², permutation p-value) of "``x`` and ``y`` come from one distribution".

    The pooled sample's labels are permuted ``permutations`` times; the p-value is
    :math:`(1 + b)/(1 + B)` with b the permuted statistics ≥ the observed one: never 0.
    """
    if isinstance(permutations, bool) or not isinstance(permutations, int) or permutations < 1:
        raise BatchError(f"permutations must be an int ≥ 1, got {permutations!r}")
    x, y = torch.as_tensor(x).double().flatten(1), torch.as_tensor(y).double().flatten(1)
    z = torch.cat([x, y])
    bw = bandwidth or median_bandwidth(z, seed=seed)
    k = gaussian_kernel(z, z, bw)
    n, m = len(x), len(y)
    g = torch.Generator().manual_seed(seed)
    # each column of w is a labelling: +1/n on the "x" side, −1/m on the other; MMD² = wᵀKw
    perms = torch.stack([torch.randperm(n + m, generator=g) for _ in range(permutations)], dim=1)
    w_obs = torch.cat([torch.full((n,), 1.0 / n), torch.full((m,), -1.0 / m)]).double()
    observed = float(w_obs @ k @ w_obs)
    w = w_obs[perms.argsort(dim=0)]  # the observed weights, permuted
    stats = ((k @ w) * w).sum(dim=0)
    b = int((stats >= observed - 1e-12).sum())
    return observed, (1.0 + b) / (1.0 + permutations)


class MMDBatches:
    """MMD² of many batches against one clean reference, from one precomputed kernel matrix.

    ``features``: every sample a batch may contain (rows), ``reference``: the clean reference.
    The batch–batch term is a sum over a submatrix of the kernel; the batch–reference term a sum
    of precomputed row sums.
    """

    def __init__(self, features: torch.Tensor, reference: torch.Tensor, bandwidth: float, chunk: int = 16):
        f, r = features.float(), reference.float()
        self.kernel = gaussian_kernel(f, f, bandwidth)
        self.to_reference = gaussian_kernel(f, r, bandwidth).mean(dim=1)
        self.reference_term = float(gaussian_kernel(r, r, bandwidth).mean())
        self.chunk = chunk

    def statistics(self, idx: np.ndarray) -> np.ndarray:
        idx = torch.as_tensor(np.atleast_2d(idx))
        out = []
        for i in range(0, len(idx), self.chunk):
            rows = idx[i:i + self.chunk]
            sub = self.kernel[rows[:, :, None], rows[:, None, :]]  # B×n×n
            out.append(sub.mean(dim=(1, 2)) + self.reference_term - 2 * self.to_reference[rows].mean(dim=1))
        return torch.cat(out).double().numpy()


# --------------------------------------------------------------------------- group subset scanning
#: the α thresholds of the group scan (the paper's α ranges over (0, α_max]; a coarse grid keeps the
#: alternating search affordable on a CPU)
GROUP_ALPHAS = (0.01, 0.05, 0.1, 0.2, 0.5)


def pvalue_levels(pvalues: np.ndarray, alphas=GROUP_ALPHAS) -> np.ndarray:
    """For each node p-value, the index of the smallest α it is ≤ to (len(alphas) if none): one
    byte per (sample, node) instead of one float, so that whole populations fit in memory."""
    return np.searchsorted(np.asarray(alphas), pvalues, side="left").astype(np.uint8)


def _bj(n_alpha: np.ndarray, n: np.ndarray, alpha: float) -> np.ndarray:
    r"""Berk–Jones :math:`N\,KL(N_\alpha/N \| \alpha)`, counted only where :math:`N_\alpha/N > \alpha`."""
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.clip(n_alpha / np.maximum(n, 1), 1e-12, 1 - 1e-12)
        kl = frac * np.log(frac / alpha) + (1 - frac) * np.log((1 - frac) / (1 - alpha))
    return np.where(frac > alpha, n * kl, 0.0)


def _best_prefix(counts: np.ndarray, per_item: float, alpha: float) -> tuple[np.ndarray, float]:
    """Linear-time subset scanning: the best subset is a prefix of the items sorted by count."""
    order = np.argsort(-counts, kind="stable")
    scores = _bj(np.cumsum(counts[order]), np.arange(1, len(counts) + 1) * per_item, alpha)
    chosen = np.zeros(len(counts), bool)
    chosen[order[: int(scores.argmax()) + 1]] = True
    return chosen, float(scores.max())


def group_scan_statistic(levels: np.ndarray, alphas=GROUP_ALPHAS, iterations: int = 4, restarts: int = 2,
                         seed: int = 0) -> float:
    """Group subset scan of one batch: the best Berk–Jones score over subsets of samples × nodes.

    ``levels`` (n×J) from :func:`pvalue_levels`. For each α, alternate: for fixed samples, the
    best node subset is a prefix of the nodes sorted by their count of p ≤ α (linear-time subset
    scanning); for fixed nodes, the best sample subset likewise; from every sample, then from
    random halves (McFowland et al. 2013; Cintas et al. 2020).
    """
    n, _ = levels.shape
    rng = np.random.default_rng(seed)
    best = 0.0
    for a_idx, alpha in enumerate(alphas):
        hit = (levels <= a_idx).astype(np.float32)  # n×J: p ≤ α
        for r in range(restarts):
            samples = np.ones(n, bool) if r == 0 else rng.random(n) < 0.5
            if not samples.any():
                samples[rng.integers(n)] = True
            for _ in range(iterations):
                nodes, _ = _best_prefix(samples.astype(np.float32) @ hit, float(samples.sum()), alpha)
                new, score = _best_prefix(hit @ nodes.astype(np.float32), float(nodes.sum()), alpha)
                best = max(best, score)
                if np.array_equal(new, samples):
                    break
                samples = new
    return best


def group_scan_statistics(levels: np.ndarray, idx: np.ndarray, seed: int = 0, **kw) -> np.ndarray:
    """:func:`group_scan_statistic` of each batch ``idx`` (B×n rows of ``levels``)."""
    return np.array([group_scan_statistic(levels[row], seed=seed + b, **kw) for b, row in enumerate(np.atleast_2d(idx))])


# --------------------------------------------------------------------------- power
def power(pvalues: np.ndarray, alpha: float = 0.05) -> float:
    """The fraction of batches rejected at level α."""
    return float((np.asarray(pvalues) <= alpha).mean())


def wilson_rows(rejections: np.ndarray) -> tuple[float, float, float]:
    """(rate, low, high) of a boolean array of rejections, with the Wilson 95 % interval."""
    from .metrics import wilson_interval

    rej = np.asarray(rejections, bool)
    low, high = wilson_interval(int(rej.sum()), len(rej))
    return float(rej.mean()), low, high


# --------------------------------------------------------------------------- for one incoming batch
def _finite_scores(scores, what: str) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64).ravel()
    bad = np.flatnonzero(~np.isfinite(s))
    if len(bad):
        raise BatchError(f"{what}: {len(bad)} of {len(s)} scores are not finite (samples {bad[:5].tolist()}"
                         + (" …" if len(bad) > 5 else "") + "); score with invalid='suspicious' to count such inputs "
                         "as tampered, or drop them")
    if len(s) == 0:
        raise BatchError(f"{what}: no scores")
    return s


def batch_pvalue(batch_scores, calibration_scores, test: str = "tail_count", null_batches: int = 1000,
                 gamma: float = 0.001, seed: int = 0) -> float:
    """The p-value of "this batch is clean" by one score test, calibrated as in chapter 5.

    ``batch_scores``: a detector's scores of the incoming batch; ``calibration_scores``: its
    scores of clean held-out data (never the data it was fitted on), many more than the batch.
    """
    if test not in SCORE_TESTS:
        raise BatchError(f"unknown batch test {test!r}; valid score tests: {', '.join(SCORE_TESTS)} "
                         "(mmd and group_scan work on features: see MMDBatches and group_scan_statistic)")
    b = _finite_scores(batch_scores, "batch")
    cal = _finite_scores(calibration_scores, "calibration")
    null = score_nulls(cal, len(b), null_batches, seed, gamma, tests=(test,))[test]
    stats = sample_stats(reference_for(cal, len(b), seed), b)
    return float(null.pvalues(score_statistics(stats, np.arange(len(b))[None, :], gamma, tests=(test,))[test])[0])


def flag_samples(batch_scores, calibration_scores, q: float = 0.1) -> np.ndarray:
    """Which samples of the batch look tampered: BH at level q on their conformal p-values."""
    b = _finite_scores(batch_scores, "batch")
    u = conformal_pvalues(_finite_scores(calibration_scores, "calibration"), b)
    return benjamini_hochberg(u[None, :], q)[0]


# --------------------------------------------------------------------------- the simulation
@dataclass
class Simulation:
    """The grid of chapter 5: batch sizes ``ns`` × tampered fractions ``ps``, ``batches`` batches a
    point, tests at level ``alpha``, BH flags at each ``q``; nulls of ``null_batches`` batches."""

    ns: tuple[int, ...]
    ps: tuple[float, ...]
    batches: int
    null_batches: int
    alpha: float = 0.05
    gamma: float = 0.001
    qs: tuple[float, ...] = (0.05, 0.1)
    seed: int = 0

    def __post_init__(self):
        for n in self.ns:
            tampered_count(n, 0.0)
        for p in self.ps:
            tampered_count(1, p)
        for name in ("batches", "null_batches"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise BatchError(f"{name} must be an int ≥ 1, got {v!r}")
        if not 0 < self.alpha < 1 or not 0 < self.gamma < 1:
            raise BatchError(f"alpha and gamma must lie in (0, 1), got {self.alpha!r} and {self.gamma!r}")

    def draws(self, n: int, p: float, n_clean: int, n_adv: int, stream: int, batches: int | None = None) -> Batches:
        """The batches of one grid point. p = 0 batches do not depend on the attack (same stream)."""
        p_key = int(round(p * 1e6))
        return draw_batches(n_clean, n_adv, n, p, batches or self.batches, [self.seed, n, p_key, stream if p > 0 else 0])


def score_power(sim: Simulation, detector: str, calibration: np.ndarray, clean: np.ndarray,
                adversarial: dict[str, np.ndarray]) -> tuple[list[dict], list[dict]]:
    """Power of every score test, and BH flag quality, over the grid, for one detector.

    ``calibration``, ``clean``: the detector's scores of the two clean held-out populations;
    ``adversarial``: per attack, its scores of the adversarial population.
    Returns (power rows, flag rows), tidy.
    """
    power_rows, flag_rows = [], []
    both = {attack: np.r_[clean, adv] for attack, adv in adversarial.items()}
    u_flags = {attack: conformal_pvalues(calibration, b) for attack, b in both.items()}  # the whole calibration set
    for n in sim.ns:
        reference = reference_for(calibration, n, sim.seed)
        nulls = score_nulls(calibration, n, sim.null_batches, [sim.seed, n, 7], sim.gamma)
        for a_idx, (attack, adv) in enumerate(adversarial.items()):
            stats = sample_stats(reference, both[attack])
            for p in sim.ps:
                b = sim.draws(n, p, len(clean), len(adv), a_idx + 1)
                idx = np.c_[b.clean, len(clean) + b.adversarial]
                observed = score_statistics(stats, idx, sim.gamma)
                for test, values in observed.items():
                    rate, low, high = wilson_rows(nulls[test].pvalues(values) <= sim.alpha)
                    power_rows.append({"test": test, "detector": detector, "attack": attack, "n": n, "p": p,
                                       "k": b.k, "batches": sim.batches, "power": rate, "power_low": low,
                                       "power_high": high, "adversarial_population": len(adv),
                                       "repeats_adversarial": b.repeats_adversarial})
                for q in sim.qs:
                    flagged = benjamini_hochberg(u_flags[attack][idx], q)
                    fdp, recall = flag_quality(flagged, b.mask)
                    flag_rows.append({"detector": detector, "attack": attack, "n": n, "p": p, "q": q,
                                      "fdr": float(fdp.mean()), "recall": float(np.nanmean(recall)) if b.k else np.nan,
                                      "flags_mean": float(flagged.sum(axis=1).mean()), "batches": sim.batches})
    return power_rows, flag_rows


def feature_power(sim: Simulation, test: str, statistic, null_population: int, clean_offset: int, n_clean: int,
                  adversarial: dict[str, tuple[int, int]], batches: int | None = None) -> list[dict]:
    """Power of a feature test (MMD, group scan) over the grid.

    ``statistic(idx)`` gives the statistic of each batch (B×n rows of one index space holding the
    null population at [0, null_population), the clean population at
    [clean_offset, clean_offset + n_clean) and each attack's examples at its (offset, size)).
    Clean batches (p = 0) do not depend on the attack: they are scored once per n.
    """
    rows = []
    batches = batches or sim.batches
    for n in sim.ns:
        null_idx = _without_replacement(np.random.default_rng([sim.seed, n, 11]), null_population, n, sim.null_batches)
        null = NullDistribution(statistic(null_idx))
        at_zero = None
        for a_idx, (attack, (offset, size)) in enumerate(adversarial.items()):
            for p in sim.ps:
                b = sim.draws(n, p, n_clean, size, a_idx + 1, batches)
                if b.k == 0 and at_zero is not None:
                    rejected = at_zero
                else:
                    idx = np.c_[clean_offset + b.clean, offset + b.adversarial]
                    rejected = null.pvalues(statistic(idx)) <= sim.alpha
                    if b.k == 0:
                        at_zero = rejected
                rate, low, high = wilson_rows(rejected)
                rows.append({"test": test, "detector": "(features)", "attack": attack, "n": n, "p": p, "k": b.k,
                             "batches": batches, "power": rate, "power_low": low, "power_high": high,
                             "adversarial_population": size, "repeats_adversarial": b.repeats_adversarial})
    return rows


def smallest_detected_fraction(power_table, target: float = 0.9) -> "pd.DataFrame":
    """Per (test, detector, attack, n): the smallest p > 0 whose power is ≥ ``target`` (NaN: none)."""
    import pandas as pd

    rows = []
    for key, g in power_table[power_table.p > 0].groupby(["test", "detector", "attack", "n"], sort=False):
        ok = g[g.power >= target].p
        rows.append(dict(zip(["test", "detector", "attack", "n"], key), smallest_p=float(ok.min()) if len(ok) else np.nan))
    return pd.DataFrame(rows)


def conditional_false_alarms(n_calibration: int, n: int, calibration_sets: int, batches: int, null_batches: int,
                             seed: int = 0, alpha: float = 0.05, gamma: float = 0.001) -> list[dict]:
    """The false-alarm rate of each score test *given* one calibration set, over many sets.

    Every score test is a rank test: for continuous scores its behaviour does not depend on the
    score distribution, so Gaussian scores stand for any detector. For each of
    ``calibration_sets`` fresh calibration sets of ``n_calibration``, the test is calibrated as
    in the study and applied to ``batches`` fresh clean batches of n. The mean over sets is the
    guaranteed α; the spread is what one user, with one calibration set, can see.
    """
    rows = []
    for r in range(calibration_sets):
        rng = np.random.default_rng([seed, 23, n, r])
        cal = rng.normal(size=n_calibration)
        nulls = score_nulls(cal, n, null_batches, [seed, 29, n, r], gamma)
        stats = sample_stats(reference_for(cal, n, [seed, r]), rng.normal(size=batches * n))
        observed = score_statistics(stats, np.arange(batches * n).reshape(batches, n), gamma)
        for test, values in observed.items():
            rows.append({"calibration_set": r, "n": n, "n_calibration": n_calibration, "test": test,
                         "false_alarm_rate": power(nulls[test].pvalues(values), alpha)})
    return rows
