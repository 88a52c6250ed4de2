"""Execute the study's notebooks with Papermill.

``python -m tamperbench run [--profile P] [--only NB] [-p key=value ...] [--force] [--variant NAME]``

- injects the profile's parameters (plus overrides, dotted keys reaching nested values) into
  each notebook's ``parameters`` cell, after validating every value;
- executes in a temporary folder outside ``book/`` and moves the executed copy into ``book/``
  atomically, only on success: a failure or a signal never leaves a stray file there;
- records wall time and peak memory (kernel process tree) in
  ``data/results/<profile>/run_log.csv``;
- stops at the first failing notebook, shows its error, keeps the chapter's last good copy
  and marks the failure in the run log, so ``build`` refuses to publish the book;
- refuses an ``--only`` run whose shared parameters (seed, data, model, training, attack
  suite…) would differ from those of the other chapters in the book, naming them;
- with ``variant``, writes executed notebooks, tables and figures to their own folders
  (``data/results/<profile>/variants/<name>/``) and builds their own book there;
- skips a notebook whose fingerprint (parameters, notebook source, ``tamperbench`` source) is
  that of its executed copy, unless ``force``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
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
    status: str  # "ran", "skipped" or "failed"
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
    new = pd.DataFrame([asdict(r) for r in records if r.status != "skipped"])
    old = pd.read_csv(path) if path.exists() else pd.DataFrame(columns=list(RunRecord.__dataclass_fields__))
    if not new.empty:
        old = old[~old["notebook"].isin(new["notebook"])]
        old = pd.concat([old, new], ignore_index=True) if not old.empty else new
    with atomic.atomic_path(path) as tmp:
        old.sort_values("notebook").to_csv(tmp, index=False)
    return path


def _failure_message(nb_path: Path, exc: Exception, failed_copy: Path, kept: Path) -> str:
    from papermill.exceptions import PapermillExecutionError

    if isinstance(exc, PapermillExecutionError):
        detail = f"{exc.ename}: {exc.evalue}\n" + "\n".join(exc.traceback)
        detail = re.sub(r"\x1b\[[0-9;]*m", "", detail)  # strip ANSI colours
        where = f" (cell {exc.exec_count})"
    else:
        detail, where = f"{type(exc).__name__}: {exc}", ""
    last_good = f"; the last good copy {kept} is kept, and the book will not build until it runs" if kept.exists() else ""
    return f"notebook {nb_path.name} failed{where}; the failed run is at {failed_copy}{last_good}\n{detail}"


#: Shared parameters that must agree across the chapters of one book (``device`` may differ:
#: the same computation on another device).
CONSISTENT_KEYS = tuple(k for k in config.SHARED_TYPES if k != "device")
#: The chapter that says how a book was built; a variant's book always includes it.
REPRODUCE_CHAPTER = "90_reproduce"
#: The book's own sources, copied into a variant's book.
BOOK_SOURCES = ("_config.yml", "_toc.yml", "intro.md", "discussion.md", "literature", "references.md", "references.bib", "_ext")
_VARIANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
#: a sweep's point (tamperbench.sweep): its results go to results/<profile>/sweeps/<sweep>/<point>/
_SWEEP_POINT = re.compile(r"^sweeps/[A-Za-z0-9][A-Za-z0-9_-]{0,63}/[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def variant_book_dir(profile: str, variant: str) -> Path:
    return paths.results_dir(profile, variant=variant) / "book"


def executed_parameters(book_dir: Path) -> dict[str, dict]:
    """The profile and parameters each executed chapter in ``book_dir`` ran with."""
    out = {}
    for path in sorted(Path(book_dir).glob("[0-9][0-9]_*.ipynb")):
        try:
            meta = nbformat.read(path, as_version=4).metadata.get("tamperbench", {})
        except Exception:
            continue
        if "parameters" in meta:
            out[path.stem] = {"profile": meta.get("profile"), **meta["parameters"]}
    return out


def _inconsistencies(plan, book_dir: Path) -> list[str]:
    """Chapters left in ``book_dir`` whose shared parameters would differ from the run's."""
    running = {nb.stem for nb, _ in plan}
    new = {}
    for _, params in plan:
        new.update({k: params[k] for k in ("profile", *CONSISTENT_KEYS) if k in params})
    problems = []
    for chapter, old in executed_parameters(book_dir).items():
        if chapter in running:
            continue
        diff = [f"{k}={old[k]!r}" for k in new if k in old and old[k] != new[k]]
        if diff:
            problems.append(f"{chapter} ({', '.join(diff)})")
    return problems


@contextlib.contextmanager
def _signals_raise():
    """Turn SIGTERM/SIGHUP into an exception, so that cleanup code runs on ``kill`` too."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    saved = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            saved[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def _environment(**values):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items() if v is not None})
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _prepare_variant_book(book_dir: Path, source: Path = None) -> None:
    source = Path(source or BOOK_DIR)
    book_dir.mkdir(parents=True, exist_ok=True)
    for name in BOOK_SOURCES:
        if (source / name).is_dir():
            shutil.copytree(source / name, book_dir / name, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
        elif (source / name).exists():
            shutil.copy2(source / name, book_dir / name)


def run(
    profile: str | None = None,
    only: list[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    force: bool = False,
    book_dir: Path | None = None,
    notebooks_dir: Path = config.NOTEBOOKS_DIR,
    config_path: Path = config.CONFIG_PATH,
    log=print,
    variant: str | None = None,
    progress: bool = False,
) -> list[RunRecord]:
    """Execute the study's notebooks; see the module docstring."""
    import papermill

    cfg = config.load(config_path, notebooks_dir)
    profile = cfg.check_profile(profile or cfg.default_profile)
    if variant is not None and not (_VARIANT.match(variant) or _SWEEP_POINT.match(variant)):
        raise config.ConfigError(f"variant name {variant!r} must be letters, digits, '_' or '-' (at most 64)")
    notebooks = config.list_notebooks(notebooks_dir)
    if only:
        names = {p.stem: p for p in notebooks}
        for o in only:
            if Path(o).stem not in names:
                raise config.ConfigError(f"unknown notebook {o!r}; valid notebooks: {', '.join(names)}")
        wanted = {Path(o).stem for o in only}
        if variant:  # a variant's book always says how it was built
            wanted.add(REPRODUCE_CHAPTER)
        notebooks = [p for p in notebooks if p.stem in wanted]
    overrides = dict(overrides or {})
    cfg.check_overrides(overrides, [p.stem for p in notebooks])
    # Resolve and validate every notebook's parameters before running any, so a bad value fails fast.
    plan = [(nb, cfg.parameters(profile, nb.stem, overrides)) for nb in notebooks]
    if book_dir is None:
        book_dir = variant_book_dir(profile, variant) if variant else BOOK_DIR
    book_dir = Path(book_dir)
    if only:
        stale = _inconsistencies(plan, book_dir)
        if stale:
            raise config.ConfigError(
                f"running only {', '.join(nb.stem for nb, _ in plan)} would leave chapters of {book_dir} on other "
                f"shared parameters: {'; '.join(stale)}. Rerun them too (drop --only), or write a variant "
                f"(--variant NAME) that keeps the main book as it is")
    if variant:
        _prepare_variant_book(book_dir)
    kernel = ensure_kernel()
    lib_digest = cache.source_digest()
    records: list[RunRecord] = []
    env = {"TAMPERBENCH_VARIANT": variant, "TAMPERBENCH_BOOK_DIR": str(book_dir.resolve())}
    with _environment(**env), _signals_raise(), tempfile.TemporaryDirectory(prefix="tamperbench-run-") as workdir:
        for nb, params in plan:
            records.append(_run_one(nb, params, profile, book_dir, Path(workdir), kernel, lib_digest, force, log,
                                    progress, papermill))
    return records


def _run_one(nb, params, profile, book_dir, workdir, kernel, lib_digest, force, log, progress, papermill) -> RunRecord:
    out = book_dir / f"{nb.stem}.ipynb"
    fp = fingerprint(nb, params, lib_digest)
    if not force and _stored_fingerprint(out) == fp and paths.results_dir(profile, nb.stem).exists():
        log(f"[{profile}] {nb.stem}: unchanged since its last run, skipped (use --force to rerun)")
        return RunRecord(nb.stem, "skipped", 0.0, 0.0, "", fp)
    shown = {k: v for k, v in params.items() if k != "attack_suite"}
    log(f"[{profile}] {nb.stem}: running with {shown}" + (" and its attack suite" if "attack_suite" in params else ""))
    failed_copy = paths.results_dir(profile) / "failed" / out.name
    work = workdir / out.name
    start = time.perf_counter()
    with PeakMemory() as mem:
        try:
            papermill.execute_notebook(
                config.read_notebook(nb), str(work), parameters=params, kernel_name=kernel,
                cwd=str(paths.REPO_ROOT), progress_bar=progress, log_output=progress, language="python",
            )
        except Exception as exc:
            failed_copy.parent.mkdir(parents=True, exist_ok=True)
            if work.exists():
                shutil.move(str(work), failed_copy)
            wall = time.perf_counter() - start
            _write_run_log(profile, [RunRecord(nb.stem, "failed", round(wall, 2), round(mem.peak / 2**20, 1),
                                               dt.datetime.now().isoformat(timespec="seconds"), fp)])
            raise NotebookFailed(_failure_message(nb, exc, failed_copy, out)) from exc
    executed = nbformat.read(work, as_version=4)
    executed.metadata["tamperbench"] = {"fingerprint": fp, "profile": profile, "parameters": params}
    _hide_parameter_cells(executed)
    with atomic.atomic_path(out) as tmp:
        nbformat.write(executed, tmp)
    failed_copy.unlink(missing_ok=True)
    wall = time.perf_counter() - start
    rec = RunRecord(nb.stem, "ran", round(wall, 2), round(mem.peak / 2**20, 1),
                    dt.datetime.now().isoformat(timespec="seconds"), fp)
    _write_run_log(profile, [rec])  # now, so that a later notebook (the reproduce chapter) reads it
    log(f"[{profile}] {nb.stem}: done in {rec.wall_seconds:.1f} s, peak memory {rec.peak_memory_mb:.0f} MB")
    return rec


def check_book(book_dir: Path = BOOK_DIR, notebooks_dir: Path = config.NOTEBOOKS_DIR, require_all: bool = True) -> list[str]:
    """Why ``book_dir`` must not be built now ([] when it may): a chapter missing (unless
    ``require_all`` is false, as for a variant of a few chapters), or failed in its last run."""
    problems = []
    executed = executed_parameters(book_dir)
    for nb in config.list_notebooks(notebooks_dir):
        if require_all and nb.stem not in executed:
            problems.append(f"{nb.stem} has no executed copy in {book_dir} (run: python -m tamperbench run)")
    for profile in {p["profile"] for p in executed.values() if p.get("profile")}:
        log_path = paths.results_dir(profile) / "run_log.csv"
        if log_path.exists():
            log = pd.read_csv(log_path)
            for row in log[log.status == "failed"].itertuples():
                if row.notebook in executed:
                    problems.append(f"{row.notebook} failed in its last run ({profile}); the book would show an older result")
    return problems


def build(book_dir: Path = BOOK_DIR, strict: bool = False, notebooks_dir: Path = config.NOTEBOOKS_DIR,
          require_all: bool = True) -> Path:
    """Build ``book_dir`` with Jupyter Book (``--all``: glued numbers are never stale), after
    :func:`check_book`; returns the HTML folder."""
    problems = check_book(book_dir, notebooks_dir, require_all)
    if problems:
        raise config.ConfigError("not building the book: " + "; ".join(problems))
    jb = Path(sys.executable).parent / "jupyter-book"
    cmd = [str(jb) if jb.exists() else "jupyter-book", "build", "--all", str(book_dir)]
    if strict:
        cmd += ["-W", "-n", "--keep-going"]
    if subprocess.run(cmd).returncode != 0:
        raise config.ConfigError(f"jupyter-book could not build {book_dir}: see its messages above")
    return Path(book_dir) / "_build" / "html"
