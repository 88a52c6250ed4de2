"""Where things live. Everything under ``data/`` is git-ignored (see ``data/README.md``).

``TAMPERBENCH_DATA`` moves the data root (tests use it to simulate a missing dataset).
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


def results_dir(profile: str, notebook: str | None = None) -> Path:
    base = data_root() / "results" / profile
    return base / notebook if notebook else base
