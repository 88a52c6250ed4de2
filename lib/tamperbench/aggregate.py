"""Tables of a sweep: every point's CSVs in one tidy table, and across-seed intervals.

A sweep (``python -m tamperbench sweep``, :mod:`tamperbench.sweep`) runs the study once per
grid point, each into ``data/results/<profile>/sweeps/<sweep>/<point>/``, with a
``point.json`` that records the point's values and whether it completed. This module reads
what the completed points wrote:

- :func:`collect`: per CSV the notebooks write (``<notebook>/<file>.csv``), the rows of all
  points, with a ``point`` column and one column per grid key (a dotted key keeps its name);
- :func:`intervals`: per group, the mean of a metric over seeds with a two-sided Student-t
  interval, :math:`\\bar x \\pm t_{0.975,\\,n-1}\\, s/\\sqrt{n}`, and the range. Two seeds give
  a wide interval: it says how little two seeds pin down, which is the honest answer. A group
  that only some seeds produced keeps the seeds it has, and says so (``n_seeds`` of
  ``sweep_seeds``, the ``seeds`` themselves); one seed gives no interval;
- :func:`headlines`: those intervals for the study's headline metrics (per-sample AUROC per
  detector and attack, batch power at the headline point, robust accuracy with detection);
- :func:`write` puts both under ``<sweep>/aggregate/`` and ``<sweep>/headlines.csv``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import atomic, paths

POINT_FILE = "point.json"
AGGREGATE_DIR = "aggregate"
HEADLINES_FILE = "headlines.csv"


def sweep_dir(profile: str, sweep: str) -> Path:
    """``data/results/<profile>/sweeps/<sweep>`` (never inside a variant)."""
    return paths.results_dir(profile, variant="") / "sweeps" / sweep


def read_point(point_dir: Path) -> dict | None:
    """A point's record, or None when it has none or it is unreadable (never ran to the end)."""
    try:
        return json.loads((Path(point_dir) / POINT_FILE).read_text())
    except (OSError, ValueError):
        return None


def completed_points(directory: Path) -> list[tuple[Path, dict]]:
    """The points of a sweep folder that completed, in name order."""
    out = []
    for sub in sorted(p for p in Path(directory).iterdir() if p.is_dir()) if Path(directory).is_dir() else []:
        record = read_point(sub)
        if record and record.get("status") == "done":
            out.append((sub, record))
    return out


def _cell(value):
    """A grid value as a table cell: lists and mappings as JSON text."""
    return value if not isinstance(value, (list, dict)) else json.dumps(value)


def collect(directory: Path) -> dict[str, pd.DataFrame]:
    """``"<notebook>/<file>.csv"`` → the rows of every completed point, grid columns added."""
    frames: dict[str, list[pd.DataFrame]] = {}
    for point_dir, record in completed_points(directory):
        for csv in sorted(point_dir.glob("[0-9][0-9]_*/*.csv")):
            try:
                df = pd.read_csv(csv)
            except (pd.errors.EmptyDataError, pd.errors.ParserError):
                continue
            for key, value in record["values"].items():
                df[key] = _cell(value)
            df.insert(0, "point", record["point"])
            frames.setdefault(f"{csv.parent.name}/{csv.name}", []).append(df)
    return {name: pd.concat(parts, ignore_index=True) for name, parts in frames.items()}


def intervals(df: pd.DataFrame, keys: list[str], value: str, across: str = "seed", level: float = 0.95,
              scope: list[str] | None = None, planned: pd.DataFrame | None = None) -> pd.DataFrame:
    """Mean of ``value`` over ``across`` per ``keys``, with a Student-t interval at ``level``.

    One value per (keys, across) is expected; duplicates are averaged first. ``seeds`` lists the
    seeds that produced a finite value and ``sweep_seeds`` counts the seeds of the sweep (within
    the same values of the ``scope`` keys, e.g. the other grid keys), so a group that only some
    seeds produced (a tiny profile can leave an attack with too few examples for a detector in
    one seed) reads as such: ``n_seeds < sweep_seeds``. ``planned``: the completed points' grid
    values (a ``seed`` column and the ``scope`` columns); without it, the seeds are those that
    wrote any row of ``df``, blind to a seed that wrote none. With a single seed the interval is
    undefined (NaN), not zero."""
    from scipy import stats

    columns = [*keys, "n_seeds", "sweep_seeds", "seeds", "mean", "std", "low", "high", "min", "max"]
    if df.empty:
        return pd.DataFrame(columns=columns)
    scope = list(scope or [])
    source = planned if planned is not None and across in planned and set(scope) <= set(planned) else df

    def seeds_of(values: dict) -> int:
        rows = source
        for k in scope:
            rows = rows[rows[k].isna()] if pd.isna(values[k]) else rows[rows[k] == values[k]]
        return int(rows[across].nunique())

    per_seed = df.groupby([*keys, across], dropna=False)[value].mean().reset_index()
    rows = []
    for group, part in per_seed.groupby(keys, dropna=False, sort=True):
        values = dict(zip(keys, group if isinstance(group, tuple) else (group,)))
        x = part[value].astype(float).to_numpy()
        finite = np.isfinite(x)
        x, seeds = x[finite], part[across].to_numpy()[finite]
        n = len(x)
        mean = float(x.mean()) if n else float("nan")
        std = float(x.std(ddof=1)) if n > 1 else float("nan")
        half = float(stats.t.ppf(0.5 + level / 2, n - 1) * std / np.sqrt(n)) if n > 1 else float("nan")
        total = seeds_of(values)
        rows.append({**values, "n_seeds": n, "sweep_seeds": total, "seeds": " ".join(str(s) for s in sorted(seeds)),
                     "mean": mean, "std": std, "low": mean - half, "high": mean + half,
                     "min": float(x.min()) if n else float("nan"), "max": float(x.max()) if n else float("nan")})
    return pd.DataFrame(rows, columns=columns)


@dataclass(frozen=True)
class Headline:
    metric: str
    table: str  # "<notebook>/<file>.csv"
    keys: tuple[str, ...]
    value: str
    what: str


HEADLINES = (
    Headline("auroc", "04_detection/detection.csv", ("detector", "attack"), "auroc",
             "per-sample AUROC (chapter 4)"),
    Headline("batch_power", "05_tampered_datasets/batch_power.csv", ("test", "detector", "attack"), "power",
             "batch power at the headline point: the largest batch, 1 % tampered or the smallest fraction above (chapter 5)"),
    Headline("robust_accuracy", "07_adaptive/robust_at_headline.csv", ("detector",), "final",
             "robust accuracy with detection at the headline ε, after every adaptive attack (chapter 7)"),
)


def _headline_rows(h: Headline, df: pd.DataFrame) -> pd.DataFrame:
    if h.metric == "batch_power":
        n = df["n"].max()
        positive = np.sort(df.loc[df["p"] > 0, "p"].unique())
        at_least = positive[positive >= 0.01 - 1e-12]
        if not len(at_least):
            return df.iloc[0:0]
        df = df[(df["n"] == n) & np.isclose(df["p"], at_least[0])]
        df = df.assign(headline_point=f"n={int(n)}, p={at_least[0]:g}")
    return df


def headlines(tables: dict[str, pd.DataFrame], grid_keys: list[str], points: list[dict] | None = None) -> pd.DataFrame:
    """Across-seed intervals of the headline metrics, one row per metric and group. Grid keys
    other than ``seed`` become grouping columns, so a sweep over ε and seeds gives one interval
    per ε. ``points``: the grid values of the completed points, which say how many seeds each
    group should have (a seed that wrote no row of a metric still counts)."""
    others = [k for k in grid_keys if k != "seed"]
    planned = pd.DataFrame(points) if points else None
    parts = []
    for h in HEADLINES:
        df = tables.get(h.table)
        if df is None or "seed" not in df:
            continue
        df = _headline_rows(h, df)
        extra = ["headline_point"] if "headline_point" in df else []
        out = intervals(df, [*others, *extra, *h.keys], h.value, scope=others, planned=planned)
        out.insert(0, "metric", h.metric)
        parts.append(out)
    if not parts:
        return pd.DataFrame(columns=["metric", "n_seeds", "sweep_seeds", "seeds", "mean", "std", "low", "high", "min", "max"])
    return pd.concat(parts, ignore_index=True)


def write(directory: Path, grid_keys: list[str]) -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    """Write every collected table under ``aggregate/`` and the headline intervals beside them."""
    directory = Path(directory)
    tables = collect(directory)
    for name, df in tables.items():
        with atomic.atomic_path(directory / AGGREGATE_DIR / name) as tmp:
            df.to_csv(tmp, index=False)
    heads = headlines(tables, grid_keys, [{k: _cell(v) for k, v in record["values"].items()} for _, record in completed_points(directory)])
    with atomic.atomic_path(directory / HEADLINES_FILE) as tmp:
        heads.to_csv(tmp, index=False)
    return tables, heads


def split_partial(rows: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the rows every seed of the sweep produced, the rows only some seeds produced). A partial
    row has a spread of 0 and no interval from one seed: averaged in, it would make the seeds
    look closer than they are, so summaries use the first and list the second apart. A table
    written before ``sweep_seeds`` existed counts the most seeds any row has."""
    total = rows["sweep_seeds"] if "sweep_seeds" in rows else rows["n_seeds"].max()
    complete = rows["n_seeds"] >= total
    return rows[complete], rows[~complete]


@dataclass(frozen=True)
class SeedSummary:
    """What the reproduce chapter says of a seed sweep's headline intervals."""

    n_seeds: int  #: seeds of the sweep
    auroc: pd.DataFrame  #: AUROC pairs every seed produced, with ``half_width`` and ``spread`` (highest less lowest)
    partial: pd.DataFrame  #: AUROC pairs only some seeds produced
    per_detector: pd.DataFrame  #: per detector, over the complete pairs: mean, median and largest spread, half-width
    robust: pd.DataFrame  #: robust accuracy with detection (chapter 7), if the sweep ran it
    power: pd.DataFrame  #: batch power at the headline point (chapter 5), if the sweep ran it

    @property
    def robust_spread(self) -> float:
        """The largest spread of robust accuracy between seeds (NaN without chapter 7)."""
        return float((self.robust["max"] - self.robust["min"]).max()) if len(self.robust) else float("nan")


def seed_summary(heads: pd.DataFrame | None) -> SeedSummary | None:
    """The summary of a sweep's ``headlines.csv``, or None when no sweep of at least two seeds
    completed. Pairs that only some seeds produced are split off (:func:`split_partial`)."""
    if heads is None or heads.empty:
        return None
    if "sweep_seeds" not in heads:  # a headlines.csv written before the column existed
        heads = heads.assign(sweep_seeds=heads["n_seeds"].max(), seeds="")
    n_seeds = int(heads["sweep_seeds"].max())
    if n_seeds < 2:
        return None
    rows = heads[heads["metric"] == "auroc"].assign(half_width=lambda d: (d["high"] - d["low"]) / 2,
                                                    spread=lambda d: d["max"] - d["min"])
    auroc, partial = split_partial(rows)
    per_detector = (auroc.groupby("detector").agg(mean_auroc=("mean", "mean"), median_spread=("spread", "median"),
                                                  max_spread=("spread", "max"), median_half_width=("half_width", "median"),
                                                  attacks=("attack", "nunique"))
                    .sort_values("mean_auroc", ascending=False).reset_index())
    pick = lambda metric: heads[heads["metric"] == metric].reset_index(drop=True)  # noqa: E731
    return SeedSummary(n_seeds, auroc.reset_index(drop=True), partial.reset_index(drop=True), per_detector,
                       pick("robust_accuracy"), pick("batch_power"))


def load_headlines(profile: str, sweep: str) -> pd.DataFrame | None:
    """The headline intervals of a sweep that has run for ``profile``, or None."""
    path = sweep_dir(profile, sweep) / HEADLINES_FILE
    if not path.exists():
        return None
    try:
        return pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError):
        return None
