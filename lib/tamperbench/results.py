"""Tables as data, figures as files.

Every table a notebook shows is written as a tidy CSV, and every figure as a PNG, under
``data/results/<profile>/<notebook>/``. Both writes are atomic.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from . import atomic, paths

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class Results:
    """The output folder of one notebook in one profile."""

    def __init__(self, profile: str, notebook: str):
        self.profile, self.notebook = profile, notebook
        self.dir: Path = paths.results_dir(profile, notebook)
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, name: str, suffix: str) -> Path:
        if not _NAME.match(name):
            raise ValueError(f"result name {name!r} must use only letters, digits, '_', '-' and '.'")
        return self.dir / (name if name.endswith(suffix) else name + suffix)

    def table(self, df: pd.DataFrame, name: str) -> pd.DataFrame:
        """Write ``df`` as ``<name>.csv`` and return it, so a cell can both save and show it."""
        with atomic.atomic_path(self._path(name, ".csv")) as tmp:
            df.to_csv(tmp, index=False)
        return df

    def figure(self, fig, name: str, dpi: int = 110):
        """Write a matplotlib figure as ``<name>.png`` and return it."""
        with atomic.atomic_path(self._path(name, ".png")) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
        return fig
