"""Execute the study's notebooks with Papermill.

``python -m tamperbench run [--profile P] [--only NB] [-p key=value ...] [--force]``

- injects the profile's parameters (plus overrides) into each notebook's ``parameters`` cell;
- writes the executed copy into ``book/`` (atomically, only on success);
- records wall time and peak memory (kernel process tree) in
  ``data/results/<profile>/run_log.csv``;
- stops at the first failing notebook, shows its error and removes that chapter's stale copy,
  so no partial or stale report is built;
- skips a notebook whose fingerprint (parameters, notebook source, ``tamperbench`` source) is
  that of its executed copy in ``book/``, unless ``force``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import nbformat
import pandas as pd

from . import atomic, cache, config, paths

BOOK_DIR = paths.REPO_ROOT / "book"
KERNEL_NAME = "tamperbench"


class NotebookFailed(RuntimeError):
    """A notebook raised during execution; the message carries its error and traceback."""


@dataclass
class RunRecord:
    notebook: str
    status: str  # "ran" or "skipped"
    wall_seconds: float
    peak_memory_mb: float
    finished_at: str
    fingerprint: str


def _notebook_digest(path: Path) -> str:
    # Hash the cells' sources only: metadata noise (kernel display name, widths) is not a change.
    nb = config.read_notebook(path)
    # Tags and figure captions live in cell metadata and change the page, so they count.
    cells = [(c.cell_type, c.source, {k: c.metadata[k] for k in ("tags", "mystnb") if k in c.metadata}) for c in nb.cells]
    return hashlib.sha256(json.dumps(cells, sort_keys=True).encode()).hexdigest()[:20]


def fingerprint(notebook: Path, params: Mapping[str, Any], lib_digest: str) -> str:
    return cache.content_key({"params": dict(params), "notebook": _notebook_digest(notebook), "lib": lib_digest})


def _stored_fingerprint(executed: Path) -> str | None:
    try:
        return nbformat.read(executed, as_version=4).metadata.get("tamperbench", {}).get("fingerprint")
    except Exception:  # missing or unreadable copy: run again
        return None


def ensure_kernel() -> str:
    """Register this interpreter as the ``tamperbench`` Jupyter kernel if it is not yet."""
    from jupyter_client.kernelspec import KernelSpecManager

    specs = KernelSpecManager().find_kernel_specs()
    if KERNEL_NAME not in specs:
        subprocess.run(
            [sys.executable, "-m", "ipykernel", "install", "--sys-prefix", "--name", KERNEL_NAME,
             "--display-name", "Python (tamperbench)"],
            check=True, capture_output=True,
        )
    return KERNEL_NAME


class PeakMemory:
    """Samples the resident memory of this process's children (the kernel) in a thread."""

    def __init__(self, interval: float = 0.1):
        import psutil

        self._me, self._interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self):
        import psutil

        while not self._stop.is_set():
            total = 0
            for child in self._me.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self._interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _hide_parameter_cells(nb) -> None:
    """Remove the parameter cells from the rendered page (each chapter shows its parameters as a
    readable table instead, through ``tamperbench.report.show_parameters``)."""
    for cell in nb.cells:
        tags = cell.metadata.setdefault("tags", [])
        if {"parameters", "injected-parameters"} & set(tags) and "remove-cell" not in tags:
            tags.append("remove-cell")


def _write_run_log(profile: str, records: list[RunRecord]) -> Path:
    """Upsert this run's rows (one row per notebook: its latest execution)."""
    path = paths.results_dir(profile) / "run_log.csv"
    new = pd.DataFrame([asdict(r) for r in records if r.status == "ran"])
    old = pd.read_csv(path) if path.exists() else pd.DataFrame(columns=list(RunRecord.__dataclass_fields__))
    if not new.empty:
        old = old[~old["notebook"].isin(new["notebook"])]
        old = pd.concat([old, new], ignore_index=True) if not old.empty else new
    with atomic.atomic_path(path) as tmp:
        old.sort_values("notebook").to_csv(tmp, index=False)
    return path


def _failure_message(nb_path: Path, exc: Exception, failed_copy: Path) -> str:
    from papermill.exceptions import PapermillExecutionError

    if isinstance(exc, PapermillExecutionError):
        detail = f"{exc.ename}: {exc.evalue}\n" + "\n".join(exc.traceback)
        detail = __import__("re").sub(r"\x1b\[[0-9;]*m", "", detail)  # strip ANSI colours
        where = f" (cell {exc.exec_count})"
    else:
        detail, where = f"{type(exc).__name__}: {exc}", ""
    return f"notebook {nb_path.name} failed{where}; executed copy kept at {failed_copy}\n{detail}"


def run(
    profile: str | None = None,
    only: list[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    force: bool = False,
    book_dir: Path = BOOK_DIR,
    notebooks_dir: Path = config.NOTEBOOKS_DIR,
    config_path: Path = config.CONFIG_PATH,
    log=print,
) -> list[RunRecord]:
    """Execute the study's notebooks; see the module docstring."""
    import papermill

    cfg = config.load(config_path, notebooks_dir)
    profile = cfg.check_profile(profile or cfg.default_profile)
    notebooks = config.list_notebooks(notebooks_dir)
    if only:
        names = {p.stem: p for p in notebooks}
        for o in only:
            if Path(o).stem not in names:
                raise config.ConfigError(f"unknown notebook {o!r}; valid notebooks: {', '.join(names)}")
        notebooks = [p for p in notebooks if p.stem in {Path(o).stem for o in only}]
    overrides = dict(overrides or {})
    cfg.check_overrides(overrides, [p.stem for p in notebooks])
    # Resolve every notebook's parameters before running any, so a bad value fails fast.
    plan = [(nb, cfg.parameters(profile, nb.stem, overrides)) for nb in notebooks]
    kernel = ensure_kernel()
    lib_digest = cache.source_digest()
    book_dir = Path(book_dir)
    records: list[RunRecord] = []
    for nb, params in plan:
        out = book_dir / f"{nb.stem}.ipynb"
        fp = fingerprint(nb, params, lib_digest)
        if not force and _stored_fingerprint(out) == fp and paths.results_dir(profile, nb.stem).exists():
            log(f"[{profile}] {nb.stem}: unchanged since its last run, skipped (use --force to rerun)")
            records.append(RunRecord(nb.stem, "skipped", 0.0, 0.0, "", fp))
            continue
        log(f"[{profile}] {nb.stem}: running with {params}")
        failed_copy = paths.results_dir(profile) / "failed" / out.name
        start = time.perf_counter()
        with atomic.atomic_path(out) as tmp, PeakMemory() as mem:
            try:
                papermill.execute_notebook(
                    config.read_notebook(nb), str(tmp), parameters=params, kernel_name=kernel,
                    cwd=str(paths.REPO_ROOT), progress_bar=False, language="python",
                )
            except Exception as exc:
                failed_copy.parent.mkdir(parents=True, exist_ok=True)
                if tmp.exists():
                    tmp.replace(failed_copy)
                out.unlink(missing_ok=True)  # never leave a stale chapter behind
                raise NotebookFailed(_failure_message(nb, exc, failed_copy)) from exc
            executed = nbformat.read(tmp, as_version=4)
            executed.metadata["tamperbench"] = {"fingerprint": fp, "profile": profile, "parameters": params}
            _hide_parameter_cells(executed)
            nbformat.write(executed, tmp)
        failed_copy.unlink(missing_ok=True)
        wall = time.perf_counter() - start
        rec = RunRecord(nb.stem, "ran", round(wall, 2), round(mem.peak / 2**20, 1),
                        dt.datetime.now().isoformat(timespec="seconds"), fp)
        records.append(rec)
        _write_run_log(profile, [rec])  # now, so that a later notebook (the reproduce chapter) reads it
        log(f"[{profile}] {nb.stem}: done in {rec.wall_seconds:.1f} s, peak memory {rec.peak_memory_mb:.0f} MB")
    return records
