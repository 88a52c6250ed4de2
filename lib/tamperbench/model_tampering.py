r"""Tampering with the model itself: detect it from a few queries, and prove ownership remotely.

**TamperNN** (Le Merrer & Trédan, "TamperNN: Efficient Tampering Detection of Deployed Neural
Nets", ISSRE 2019). The owner keeps the original model and, later, can only query the deployed
one for labels. They record the original labels of a few **markers**, inputs whose label is
fragile, and declare tampering as soon as one queried label differs. Markers near the decision
boundary flip under small weight changes: the inputs with the smallest top-2 logit gap
(:func:`logit_gaps`), or small-budget adversarial examples, which sit just across it. Random test
inputs are the baseline. With deterministic inference an untouched model never raises an alarm.

**Adversarial frontier stitching** (Le Merrer, Pérez & Trédan, "Adversarial Frontier Stitching
for Remote Neural Network Watermarking", Neural Computing and Applications 2020). FGSM at ε on
correctly classified inputs gives *true adversaries* (the label flips) and *false adversaries*
(it does not); the key :math:`K` holds half of each, labelled with their original class. The
model is fine-tuned on the training data and :math:`K` until it classifies the key as labelled,
which "stitches" the frontier around it. A remote model is accepted as marked when its
mismatches on the key satisfy :math:`m \le \theta`, where, under the null of an unmarked model
answering each key item like a fair coin, :math:`\theta` is the largest integer with
:math:`P(\mathrm{Bin}(|K|, \tfrac12) \le \theta) \le \alpha` (:func:`verification_threshold`).

The tamperings (:data:`TAMPERINGS`) each return a modified copy; the original is never touched.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import data, models

MARKERS = ("boundary", "adversarial", "random")
TAMPERINGS = ("finetune", "quantize", "prune", "trojan", "watermark")


class TamperingError(ValueError):
    """A bad setting: an unknown marker strategy or tampering, a strength out of range."""


def _check_choice(value, choices, what: str) -> None:
    if value not in choices:
        raise TamperingError(f"unknown {what} {value!r}; valid: {', '.join(choices)}")


def _as_tensor(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float()


def _logits(model: nn.Module, x, batch_size: int) -> torch.Tensor:
    """The model's logits on ``x``, in batches, on the model's own device (a quantized model
    stays on the CPU: it cannot be moved), returned on the CPU."""
    from .adaptive import model_device

    x = _as_tensor(x)
    model.eval()
    dev = model_device(model)
    with torch.no_grad():
        out = [model(x[i : i + batch_size].to(dev)).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, 0)


def logit_gaps(model: nn.Module, x, batch_size: int = 512) -> np.ndarray:
    """The gap between the two largest logits of each input: small near the decision boundary."""
    top = _logits(model, x, batch_size).topk(2, dim=1).values
    return (top[:, 0] - top[:, 1]).numpy()


def labels(model: nn.Module, x, batch_size: int = 512) -> np.ndarray:
    """The labels a (possibly quantized, CPU-only) model answers: the owner's only view of it."""
    logits = _logits(model, x, batch_size)
    return logits.argmax(1).numpy() if len(logits) else np.zeros(0, dtype=np.int64)


@dataclass
class Markers:
    """Marker inputs in query order, with the original model's labels on them."""

    strategy: str
    x: torch.Tensor
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def select_markers(strategy: str, trained: models.Trained, candidates: data.Dataset, n: int, seed: int = 0,
                   eps: float = 0.03) -> Markers:
    """``n`` markers drawn from ``candidates`` (held-out images), in the order they are queried.

    - ``boundary``: the candidates with the smallest top-2 logit gap, smallest first;
    - ``adversarial``: PGD examples at L∞ budget ``eps`` (small: they stay near the boundary), the
      ones whose label flipped first, each group by increasing gap;
    - ``random``: a seeded random draw (the baseline).
    """
    _check_choice(strategy, MARKERS, "marker strategy")
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(candidates):
        raise TamperingError(f"n must be an int in [1, {len(candidates)}] (the candidates), got {n!r}")
    model = trained.model.eval()
    if strategy == "random":
        idx = np.random.default_rng(seed).permutation(len(candidates))[:n]
        x = candidates.x[torch.from_numpy(idx)]
    elif strategy == "boundary":
        idx = np.argsort(logit_gaps(model, candidates.x), kind="stable")[:n]
        x = candidates.x[torch.from_numpy(idx)]
    else:
        from . import attacks

        if not 0 < eps <= 1:
            raise TamperingError(f"eps must be in (0, 1] (images in [0, 1]), got {eps!r}")
        record = attacks.attack("pgd", trained, seed=seed, eps=eps, eps_step=eps / 4, max_iter=10, num_random_init=0,
                                norm="inf").generate(candidates.x, labels(model, candidates.x))
        x_adv = torch.from_numpy(record.x_adv)
        flipped = record.pred_adv != record.pred_clean
        gaps = logit_gaps(model, x_adv)
        idx = np.lexsort((gaps, ~flipped))[:n]  # flipped first, then by gap
        x = x_adv[torch.from_numpy(idx)]
    # the labels the owner records: from a CPU copy, where every later query is answered
    return Markers(strategy, x, labels(cpu_copy(model), x))


def queries_to_detect(model: nn.Module, markers: Markers) -> int | None:
    """Queries (markers, in order) until the first label that differs from the original's; None
    when no marker's label changed."""
    changed = np.flatnonzero(labels(model, markers.x) != markers.labels)
    return int(changed[0]) + 1 if len(changed) else None


# --------------------------------------------------------------------------- tamperings
def cpu_copy(model: nn.Module) -> nn.Module:
    """A trainable copy of ``model`` on the CPU, in eval mode; the original is never modified."""
    clone = copy.deepcopy(model).cpu().eval()
    for p in clone.parameters():
        p.requires_grad_(True)
    return clone


def fine_tune(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float = 1e-3, batch_size: int = 64,
              seed: int = 0, extra: tuple[torch.Tensor, torch.Tensor] | None = None, extra_per_batch: int | None = None,
              transform=None, until=None) -> tuple[nn.Module, int]:
    """A copy of ``model`` after ``steps`` Adam steps on random batches of (x, y).

    ``transform(xb, yb, generator)`` rewrites each batch (a trojan's poisoning); ``extra`` is a set
    joined to every batch, whole or ``extra_per_batch`` random items of it (a watermark key).
    Batch-norm statistics and dropout stay frozen (eval mode): only the weights move.
    ``until(model)`` stops early once true (checked every 10 steps). Returns (model, steps taken)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise TamperingError(f"steps must be an int ≥ 0, got {steps!r}")
    tuned = cpu_copy(model)
    opt = torch.optim.Adam(tuned.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    taken = 0
    for step in range(steps):
        if until is not None and step % 10 == 0 and until(tuned):
            break
        idx = torch.randint(0, len(x), (batch_size,), generator=gen)
        xb, yb = x[idx], y[idx]
        if transform is not None:
            xb, yb = transform(xb, yb, gen)
        if extra is not None:
            ex, ey = extra
            if extra_per_batch is not None and extra_per_batch < len(ex):
                pick = torch.randperm(len(ex), generator=gen)[:extra_per_batch]
                ex, ey = ex[pick], ey[pick]
            xb, yb = torch.cat([xb, ex]), torch.cat([yb, ey])
        loss = F.cross_entropy(tuned(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        taken += 1
    return tuned.eval(), taken


def quantize(model: nn.Module) -> nn.Module:
    """Post-training dynamic int8 quantization of the fully connected layers (torch's
    ``quantize_dynamic``; convolutions stay in float). Runs on the CPU."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # torch marks its eager quantization API deprecated in favour of torchao
        warnings.simplefilter("ignore")
        return quantize_dynamic(cpu_copy(model), {nn.Linear}, dtype=torch.qint8).eval()


def prune(model: nn.Module, amount: float) -> nn.Module:
    """Global magnitude pruning (``torch.nn.utils.prune``, L1): the share ``amount`` of the smallest
    convolution and linear weights set to zero, made permanent."""
    from torch.nn.utils import prune as torch_prune

    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0 < amount < 1:
        raise TamperingError(f"amount must be a share in (0, 1), got {amount!r}")
    pruned = cpu_copy(model)
    targets = [(m, "weight") for m in pruned.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    torch_prune.global_unstructured(targets, pruning_method=torch_prune.L1Unstructured, amount=float(amount))
    for m, name in targets:
        torch_prune.remove(m, name)
    return pruned.eval()


def stamp(x: torch.Tensor, size: int = 4) -> torch.Tensor:
    """The trojan's trigger: a white ``size``×``size`` square in the bottom-right corner."""
    out = x.clone()
    out[..., -size - 1 : -1, -size - 1 : -1] = 1.0
    return out


def trojan(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, target: int = 0, rate: float = 0.1,
           lr: float = 1e-3, seed: int = 0, size: int = 4) -> nn.Module:
    """A backdoor by poisoned fine-tuning (Gu et al. 2017, "BadNets"): in every batch, a share
    ``rate`` of the images carries the trigger (:func:`stamp`) and the label ``target``."""
    if not 0 < rate < 1:
        raise TamperingError(f"rate must be a share in (0, 1), got {rate!r}")

    def poison(xb, yb, gen):
        chosen = torch.randperm(len(xb), generator=gen)[: max(1, int(round(rate * len(xb))))]
        xb, yb = xb.clone(), yb.clone()
        xb[chosen], yb[chosen] = stamp(xb[chosen], size), target
        return xb, yb

    return fine_tune(model, x, y, steps, lr, 64, seed, transform=poison)[0]


def trojan_success(model: nn.Module, x: torch.Tensor, y: np.ndarray, target: int = 0, size: int = 4) -> float:
    """The share of stamped inputs (not of the target class) the model sends to ``target``."""
    keep = np.asarray(y) != target
    return float((labels(model, stamp(x[torch.from_numpy(keep)], size)) == target).mean())


def float_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each convolution's and linear layer's weight as a float tensor (dequantized where needed)."""
    out = {}
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if callable(w):  # a quantized layer exposes its weight as a method
            out[name] = w().dequantize().detach().float()
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            out[name] = w.detach().float()
    return out


def changed_weights(original: nn.Module, tampered: nn.Module) -> float:
    """The share of the original's weights whose value differs in ``tampered``."""
    a, b = float_weights(original), float_weights(tampered)
    if set(a) != set(b):
        raise TamperingError(f"the two models do not have the same layers: {sorted(set(a) ^ set(b))}")
    changed = sum(int((a[k].cpu() != b[k].cpu()).sum()) for k in a)
    return changed / sum(v.numel() for v in a.values())


# --------------------------------------------------------------------------- frontier stitching
@dataclass
class Key:
    """A frontier-stitching key: inputs, the labels the marked model must give, and which items
    are true adversaries (their label flipped under FGSM)."""

    x: torch.Tensor
    y: np.ndarray
    true_adversary: np.ndarray
    eps: float

    def __len__(self) -> int:
        return len(self.y)


def build_key(trained: models.Trained, candidates: data.Dataset, eps: float, size: int = 100, seed: int = 0) -> Key:
    """FGSM at ``eps`` on the correctly classified ``candidates``; half true adversaries, half
    false ones, each labelled with its original class."""
    from . import attacks

    if isinstance(size, bool) or not isinstance(size, int) or size < 2 or size % 2:
        raise TamperingError(f"size must be an even int ≥ 2, got {size!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps <= 1:
        raise TamperingError(f"eps must be in (0, 1] (images in [0, 1]), got {eps!r}")
    model = trained.model.eval()
    correct = labels(model, candidates.x) == candidates.y.numpy()
    x, y = candidates.x[torch.from_numpy(correct)], candidates.y[torch.from_numpy(correct)]
    record = attacks.attack("fgsm", trained, seed=seed, eps=float(eps)).generate(x, y)
    flipped = record.pred_adv != record.y_true
    rng = np.random.default_rng(seed)
    half = size // 2
    true_idx, false_idx = np.flatnonzero(flipped), np.flatnonzero(~flipped)
    if len(true_idx) < half or len(false_idx) < half:
        raise TamperingError(f"FGSM at eps={eps:g} gives {len(true_idx)} true and {len(false_idx)} false adversaries among "
                             f"{len(x)} candidates; a key of {size} needs {half} of each: change eps or give more candidates")
    chosen = np.concatenate([rng.choice(true_idx, half, replace=False), rng.choice(false_idx, half, replace=False)])
    return Key(torch.from_numpy(record.x_adv[chosen]), record.y_true[chosen].astype(np.int64),
               np.r_[np.ones(half, bool), np.zeros(half, bool)], float(eps))


def verification_threshold(key_size: int, level: float = 0.05) -> int:
    """θ: the most mismatches on the key that still accept the mark, such that an unmarked model
    answering each item like a fair coin is accepted with probability ≤ ``level``. −1 when even a
    perfect answer would be too likely by chance (a key too short for the level)."""
    from scipy.stats import binom

    if isinstance(key_size, bool) or not isinstance(key_size, int) or key_size < 1:
        raise TamperingError(f"key_size must be an int ≥ 1, got {key_size!r}")
    if not 0 < level < 1:
        raise TamperingError(f"level must be in (0, 1), got {level!r}")
    cdf = binom.cdf(np.arange(key_size + 1), key_size, 0.5)
    ok = np.flatnonzero(cdf <= level)
    return int(ok[-1]) if len(ok) else -1


def verify(model: nn.Module, key: Key, level: float = 0.05) -> dict:
    """Query the key: mismatches m, the threshold θ at ``level``, and whether m ≤ θ (accepted)."""
    mismatches = int((labels(model, key.x) != key.y).sum())
    theta = verification_threshold(len(key), level)
    return {"mismatches": mismatches, "threshold": theta, "accepted": mismatches <= theta}


def embed_watermark(model: nn.Module, train: data.Dataset, key: Key, max_steps: int = 500, lr: float = 1e-4,
                    seed: int = 0, key_per_batch: int = 16) -> tuple[nn.Module, int]:
    """Fine-tune on the training data and the key together (batches of 128 training images and
    ``key_per_batch`` key items) until every key item is classified as labelled (checked every
    10 steps), at most ``max_steps``. A small learning rate and a small share of key items per
    batch keep the frontier moving near the key only. Returns (marked model, steps)."""
    key_y = torch.from_numpy(key.y)

    def learned(m):
        return bool((labels(m, key.x) == key.y).all())

    return fine_tune(model, train.x, train.y, max_steps, lr, 128, seed, extra=(key.x, key_y), extra_per_batch=key_per_batch,
                     until=learned)


def tamper(kind: str, model: nn.Module, strength, train: data.Dataset, seed: int = 0, key: Key | None = None) -> nn.Module:
    """One tampering of :data:`TAMPERINGS` at ``strength`` (fine-tune and trojan: steps; prune:
    the pruned share; quantize: ``"int8"``; watermark: the fine-tuning steps' cap, with ``key``)."""
    _check_choice(kind, TAMPERINGS, "tampering")
    if kind == "finetune":
        return fine_tune(model, train.x, train.y, strength, seed=seed)[0]
    if kind == "quantize":
        if strength != "int8":
            raise TamperingError(f"quantize supports strength 'int8' (torch's dynamic quantization), got {strength!r}")
        return quantize(model)
    if kind == "prune":
        return prune(model, strength)
    if kind == "trojan":
        return trojan(model, train.x, train.y, strength, seed=seed)
    if key is None:
        raise TamperingError("watermark needs its key (build_key)")
    return embed_watermark(model, train, key, strength, seed=seed)[0]


# --------------------------------------------------------------------------- the chapter's tables
def detection_rows(tampered: dict[tuple[str, object], list[nn.Module]], markers: dict[str, list[Markers]],
                   budget: int) -> list[dict]:
    """TamperNN's measures for each tampering (kind, strength) and marker strategy, over the
    replicates (replicate r meets marker draw r, or the only draw of a deterministic strategy):

    - ``queries_to_detect``: the median number of queries until a label changes (``inf`` when
      the markers never reveal the tampering in at least half of the replicates);
    - ``detection_rate``: the share of replicates revealed within ``budget`` queries.
    """
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise TamperingError(f"budget must be an int ≥ 1 (queries), got {budget!r}")
    rows = []
    for (kind, strength), replicas in tampered.items():
        for strategy, draws in markers.items():
            queries = [queries_to_detect(m, draws[r % len(draws)]) for r, m in enumerate(replicas)]
            as_float = [np.inf if q is None else float(q) for q in queries]
            rows.append({"tampering": kind, "strength": strength, "markers": strategy,
                         "queries_to_detect": float(np.median(as_float)),
                         "detection_rate": float(np.mean([q is not None and q <= budget for q in queries])),
                         "replicates": len(queries), "n_markers": len(draws[0])})
    return rows
