"""Tampered datasets: a clean set in which a fraction ``p`` of samples is adversarial.

``tamper(record, p, seed, policy)`` starts from the clean inputs of a cached
:class:`~tamperbench.attacks.AttackRecord`, picks round(p·n) of them with a seeded generator
and replaces each by its adversarial version. It never attacks: it only reads the record, so it
is cheap and deterministic.

Failed attacks (see ``shared/notes/tampering.md``):

- ``strict`` draws the tampered samples among the *successful* attacks only (a failure is
  replaced by another sample), so every tampered sample really fools the classifier;
- ``realistic`` draws among all samples and keeps whatever the attacker produced, failures
  included: the mask then marks inputs the attacker touched, fooling or not.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .attacks import AttackRecord

POLICIES = ("strict", "realistic")


@dataclass
class TamperedDataset:
    x: np.ndarray  # N×C×H×W float32, clean except where ``mask``
    y: np.ndarray  # the true labels (tampering does not change them)
    mask: np.ndarray  # True where the sample was replaced by its adversarial version
    fooled: np.ndarray  # True where the replaced sample fools the classifier
    provenance: dict

    def __len__(self) -> int:
        return len(self.y)

    @property
    def fraction(self) -> float:
        return float(self.mask.mean()) if len(self) else 0.0


def sweep(record: AttackRecord, ps, seed: int = 0, policies=POLICIES):
    """Yield ``(policy, p, tampered)`` over a grid, skipping strict points with too few successes."""
    for policy in policies:
        for p in ps:
            k_needed = int(round(p * len(record)))
            if policy == "strict" and k_needed > int(record.success.sum()):
                continue
            yield policy, p, tamper(record, p, seed, policy)


def tamper(record: AttackRecord, p: float, seed: int = 0, policy: str = "strict") -> TamperedDataset:
    """Replace round(p·n) clean samples of ``record`` by their adversarial versions."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; valid policies: {', '.join(POLICIES)}")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be a number in [0, 1], got {p!r}")
    n = len(record)
    k = int(round(p * n))
    candidates = np.flatnonzero(record.success) if policy == "strict" else np.arange(n)
    if k > len(candidates):
        raise ValueError(
            f"policy 'strict' needs {k} successful attacks for p={p} of n={n}, but {record.name} "
            f"succeeded on {len(candidates)}; lower p, raise the budget or use policy 'realistic'"
        )
    chosen = np.sort(np.random.default_rng(seed).choice(candidates, size=k, replace=False))
    mask = np.zeros(n, dtype=bool)
    mask[chosen] = True
    x = np.where(mask[:, None, None, None], record.x_adv, record.x_clean).astype(np.float32)
    provenance = {
        "attack": record.name, "budget": dict(record.budget), "record": record.key, "p": float(p),
        "n": n, "k": k, "seed": int(seed), "policy": policy, "tampered_indices": chosen.tolist(),
    }
    return TamperedDataset(x, record.y_true.copy(), mask, mask & record.success, provenance)
