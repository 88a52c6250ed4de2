"""Where things live. Everything under ``data/`` is git-ignored (see ``data/README.md``).

``TAMPERBENCH_DATA`` moves the data root (tests use it to simulate a missing dataset);
``TAMPERBENCH_VARIANT`` (set by the runner's ``--variant``) moves a run's results to their own folder.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The repository root: ``lib/tamperbench/paths.py`` → two levels up from ``lib``.
REPO_ROOT = Path(__file__).resolve().parents[2]


def data_root() -> Path:
    """The root of datasets, artifacts and results (``$TAMPERBENCH_DATA`` or ``<repo>/data``)."""
    return Path(os.environ.get("TAMPERBENCH_DATA", REPO_ROOT / "data")).resolve()


def datasets_dir() -> Path:
    return data_root() / "datasets"


def artifacts_dir() -> Path:
    return data_root() / "artifacts"


def current_variant() -> str | None:
    """The variant being run (``$TAMPERBENCH_VARIANT``, set by the runner), or None for the main one."""
    return os.environ.get("TAMPERBENCH_VARIANT") or None


def results_dir(profile: str, notebook: str | None = None, variant: str | None = None) -> Path:
    """``results/<profile>/[<notebook>]``, or for a variant ``results/<profile>/variants/<name>/...``
    (for a sweep's point ``results/<profile>/sweeps/<sweep>/<point>/...``)
    (``variant`` defaults to the one being run), so that a variant never overwrites the main run."""
    variant = variant if variant is not None else current_variant()
    base = data_root() / "results" / profile
    if variant:
        # a sweep's point is a variant named by its path, "sweeps/<sweep>/<point>"
        base = base / variant if variant.startswith("sweeps/") else base / "variants" / variant
    return base / notebook if notebook else base
