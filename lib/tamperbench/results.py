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

    def __init__(self, profile: str, notebook: str, seed: int | None = None):
        self.profile, self.notebook, self.seed = profile, notebook, seed
        self.variant = paths.current_variant()
        self.dir: Path = paths.results_dir(profile, notebook)
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, name: str, suffix: str) -> Path:
        if not _NAME.match(name):
            raise ValueError(f"result name {name!r} must use only letters, digits, '_', '-' and '.'")
        return self.dir / (name if name.endswith(suffix) else name + suffix)

    def provenance(self) -> dict:
        """The columns every written table carries: what produced it (profile, seed, variant)."""
        out = {"profile": self.profile}
        if self.seed is not None:
            out["seed"] = self.seed
        if self.variant:
            out["variant"] = self.variant
        return out

    def table(self, df: pd.DataFrame, name: str) -> pd.DataFrame:
        """Write ``df`` as ``<name>.csv``, with provenance columns appended, and return ``df``
        as given, so a cell can both save and show it."""
        written = df.assign(**{k: v for k, v in self.provenance().items() if k not in df.columns})
        with atomic.atomic_path(self._path(name, ".csv")) as tmp:
            written.to_csv(tmp, index=False)
        return df

    def figure(self, fig, name: str, dpi: int = 110):
        """Write a matplotlib figure as ``<name>.png`` and return it."""
        with atomic.atomic_path(self._path(name, ".png")) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
        return fig
