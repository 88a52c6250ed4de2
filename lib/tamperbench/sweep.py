"""Sweeps: the study rerun once per point of a parameter grid, each point a Ray task.

``python -m tamperbench sweep NAME [--profile P] [--grid KEY=V1,V2 ...] [-p KEY=VALUE ...]
[--only NB ...] [--address ADDR] [--cpus-per-point N] [--force]``

- The grid comes from ``_config.yml``'s ``sweeps:`` section (by ``NAME``) and/or ``--grid``
  (which adds keys or replaces a key's values); ``-p`` fixes a parameter for every point. Keys
  are the runner's: a shared or notebook parameter, dotted to reach a nested value.
- Every point's parameters are validated, for every notebook it runs, before any task starts:
  an unknown key, a wrong type or a bad value fails at once, naming the point and the choices.
- Each point is one :func:`tamperbench.runner.run` call (Papermill, the sweep's profile, the
  point's overrides) as a *variant* named ``sweeps/<sweep>/<point>``: its executed notebooks,
  tables, figures and run log are under ``data/results/<profile>/sweeps/<sweep>/<point>/``, so
  points never overwrite each other or the main run. The artifact cache is shared; its writes
  are atomic (write beside, then ``os.replace``), so two points building the same artifact
  leave one whole copy, never a torn one.
- Points run as Ray tasks: a local Ray instance by default, an existing cluster with
  ``--address`` (or ``RAY_ADDRESS``). Each task asks for the resources its profile needs: every
  CPU of a node (one point per machine: the notebooks use every core) and one GPU for a profile
  on CUDA; ``resources:`` in the sweep's block, or ``--cpus-per-point``, say otherwise. On a
  cluster the nodes need this repository installed at the same path and one shared ``data/``.
- A failed point is recorded with its error in its ``point.json`` and the sweep goes on; a
  rerun skips the points whose ``point.json`` says they completed with the same notebooks,
  parameters and library code (``--force`` reruns them).
- At the end, :mod:`tamperbench.aggregate` writes every table of every completed point, with the
  grid's columns, and the headline metrics' across-seed intervals. ``sweep_log.csv`` records
  each point's run time and the time Ray added around it.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import re
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import pandas as pd

from . import aggregate, atomic, cache, config, paths, runner

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
RESOURCE_KEYS = ("num_cpus", "num_gpus", "memory")


@dataclass(frozen=True)
class Point:
    name: str
    values: dict  # the grid's values at this point (dotted keys as given)
    overrides: dict  # what the runner gets: the sweep's fixed parameters, then the values


@dataclass
class Plan:
    sweep: str
    profile: str
    grid: dict[str, list]
    points: list[Point]
    notebooks: list[str] | None  # None: every notebook
    resources: dict
    directory: Path
    expected: dict[str, dict[str, str]] = field(default_factory=dict)  # point → notebook → fingerprint


def parse_grid(pairs: list[str]) -> dict[str, list]:
    """``["seed=0,1,2", "eps_grid=[[0.1],[0.2]]"]`` → ``{"seed": [0, 1, 2], ...}``: a value that
    is a YAML list is the list of values; otherwise the values are split at commas, each YAML."""
    grid = {}
    for pair in pairs:
        if "=" not in pair:
            raise config.ConfigError(f"--grid {pair!r} must look like key=v1,v2 (or key=[v1, v2])")
        key, text = (s.strip() for s in pair.split("=", 1))
        parsed = config.parse_value(text)
        grid[key] = parsed if isinstance(parsed, list) else [config.parse_value(v.strip()) for v in text.split(",")]
    return grid


def expand(grid: Mapping[str, list]) -> list[dict]:
    """Every combination of the grid's values, the first key varying slowest."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def _slug(value: Any, decimal: str = "p") -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else str(value)
    return re.sub(r"[^A-Za-z0-9_]+", "_", text.replace(".", decimal)).strip("_") or "x"


def point_name(values: Mapping[str, Any]) -> str:
    """A readable folder name (``seed-1``, ``eps-0p1__seed-2``); a short hash replaces the tail
    of a name too long for a folder, and keeps names of distinct points distinct."""
    name = "__".join(f"{_slug(k, '_')}-{_slug(v)}" for k, v in values.items()) or "default"
    if len(name) > 64 or not _NAME.match(name):
        name = name[:40].strip("_-") + "-" + cache.content_key(dict(values))[:12]
    return name


def _check_grid(grid: Any, where: str) -> dict[str, list]:
    if not isinstance(grid, dict) or not grid:
        raise config.ConfigError(f"{where}: the grid must map parameters to lists of values, e.g. {{seed: [0, 1, 2]}}")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise config.ConfigError(f"{where}: grid key {key!r} must have a non-empty list of values, got {values!r}")
        seen = [json.dumps(v, sort_keys=True) for v in values]
        if len(set(seen)) != len(seen):
            raise config.ConfigError(f"{where}: grid key {key!r} repeats a value: {values!r}")
    return grid


def default_resources(cfg: config.StudyConfig, profile: str) -> dict:
    """One point per machine (the notebooks use every core), and one GPU for a CUDA profile."""
    device = str(cfg._merged(profile, None, None, lambda root: True).get("device", "auto"))
    gpu = device.startswith("cuda") or (device == "auto" and profile == "gpu")
    return {"num_cpus": 1, "num_gpus": 1} if gpu else {"num_cpus": os.cpu_count() or 1}


def _point_notebooks(only: list[str] | None, notebooks_dir: Path) -> list[Path]:
    """The notebooks a point runs: as :func:`runner.run` picks them for a variant."""
    nbs = config.list_notebooks(notebooks_dir)
    if not only:
        return nbs
    wanted = {Path(o).stem for o in only} | {runner.REPRODUCE_CHAPTER}
    return [p for p in nbs if p.stem in wanted]


def plan(name: str, profile: str | None = None, grid: Mapping[str, list] | None = None,
         overrides: Mapping[str, Any] | None = None, only: list[str] | None = None,
         cpus_per_point: float | None = None, config_path: Path = config.CONFIG_PATH,
         notebooks_dir: Path = config.NOTEBOOKS_DIR) -> Plan:
    """Resolve and validate a sweep: every point, every notebook, before anything runs."""
    cfg = config.load(config_path, notebooks_dir)
    sweeps = cfg.sweeps or {}
    if not _NAME.match(str(name)):
        raise config.ConfigError(f"sweep name {name!r} must be letters, digits, '_' or '-' (at most 64)")
    if name not in sweeps and not grid:
        raise config.ConfigError(f"unknown sweep {name!r}; valid sweeps: {', '.join(sweeps) or 'none'} "
                                 f"(or define one on the command line with --grid KEY=V1,V2)")
    block = sweeps.get(name, {})
    profile = cfg.check_profile(profile or block.get("profile") or cfg.default_profile)
    full_grid = _check_grid({**(block.get("grid") or {}), **dict(grid or {})}, f"sweep {name!r}")
    fixed = dict(block.get("parameters") or {})
    if not isinstance(fixed, dict):
        raise config.ConfigError(f"sweep {name!r}: parameters must be a mapping of overrides")
    fixed.update(overrides or {})
    for key in full_grid:
        fixed.pop(key, None)
    only = list(only) if only else block.get("notebooks")
    if only is not None and (not isinstance(only, list) or not all(isinstance(o, str) for o in only)):
        raise config.ConfigError(f"sweep {name!r}: notebooks must be null (all) or a list of notebook names")
    valid = [p.stem for p in config.list_notebooks(notebooks_dir)]
    for o in only or []:
        if Path(o).stem not in valid:
            raise config.ConfigError(f"sweep {name!r}: unknown notebook {o!r}; valid notebooks: {', '.join(valid)}")
    nbs = _point_notebooks(only, notebooks_dir)
    lib = cache.source_digest()
    points, expected = [], {}
    for values in expand(full_grid):
        point = Point(point_name(values), dict(values), {**fixed, **values})
        where = f"sweep {name!r}, point {point.name}"
        try:
            cfg.check_overrides(point.overrides, [nb.stem for nb in nbs])
            expected[point.name] = {nb.stem: runner.fingerprint(nb, cfg.parameters(profile, nb.stem, point.overrides), lib)
                                    for nb in nbs}
        except config.ConfigError as exc:
            raise config.ConfigError(f"{where}: {exc}") from exc
        points.append(point)
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        raise config.ConfigError(f"sweep {name!r}: two points share a folder name; rename the grid's values")
    resources = {**default_resources(cfg, profile), **(block.get("resources") or {})}
    if cpus_per_point is not None:
        resources["num_cpus"] = cpus_per_point
    for key, value in resources.items():
        if key not in RESOURCE_KEYS or isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise config.ConfigError(f"sweep {name!r}: resource {key}={value!r}; valid: {', '.join(RESOURCE_KEYS)}, numbers ≥ 0")
    return Plan(name, profile, full_grid, points, only, resources, aggregate.sweep_dir(profile, name), expected)


def completed(p: Plan, point: Point) -> bool:
    """Whether ``point`` ran to the end with today's notebooks, parameters and library code."""
    record = aggregate.read_point(p.directory / point.name)
    return bool(record and record.get("status") == "done" and record.get("fingerprints") == p.expected[point.name])


def run_point(profile: str, sweep: str, point: Point, notebooks: list[str] | None, force: bool = False,
              data_root: str | None = None) -> dict:
    """One point: the runner as variant ``sweeps/<sweep>/<point>``; never raises (a failure is
    recorded in the point's ``point.json`` and returned)."""
    entered = time.time()
    if data_root:
        os.environ["TAMPERBENCH_DATA"] = data_root
    variant = f"sweeps/{sweep}/{point.name}"
    directory = paths.results_dir(profile, variant=variant)
    status, error, fingerprints = "done", "", {}
    start = time.perf_counter()
    try:
        records = runner.run(profile, only=notebooks, overrides=point.overrides, force=force, variant=variant,
                             log=lambda message: None)
        fingerprints = {r.notebook: r.fingerprint for r in records}
    except BaseException as exc:  # a point's failure, whatever it is, must not stop the sweep
        status, error = "failed", f"{type(exc).__name__}: {exc}"
        if isinstance(exc, KeyboardInterrupt):
            raise
    run_seconds = time.perf_counter() - start
    record = {"point": point.name, "values": point.values, "overrides": point.overrides, "profile": profile,
              "status": status, "error": error, "fingerprints": fingerprints, "run_seconds": round(run_seconds, 3),
              "started": entered, "finished": time.time(), "host": socket.gethostname(),
              "finished_at": dt.datetime.now().isoformat(timespec="seconds")}
    atomic.write_text(directory / aggregate.POINT_FILE, json.dumps(record, indent=1, default=str))
    return record


def _connect(address: str | None, cpus: int | None):
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:  # a new, small local instance ("local": never another driver's): the kernels need the memory
        ray.init(address="local", num_cpus=cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 object_store_memory=100 * 2**20)
    return ray


def _fit_to_cluster(resources: dict, ray) -> dict:
    """Ask no node for more CPUs than the largest has (a task asking more would wait forever)."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    most = max((r.get("CPU", 0) for r in nodes), default=0)
    out = dict(resources)
    if most and out.get("num_cpus", 0) > most:
        out["num_cpus"] = most
    gpus = max((r.get("GPU", 0) for r in nodes), default=0)
    if out.get("num_gpus", 0) > gpus:
        raise config.ConfigError(f"each point asks for {out['num_gpus']} GPU(s) but no Ray node has one; "
                                 f"give resources: {{num_gpus: 0}} in the sweep, or run on a cluster with GPUs")
    return out


def run(p: Plan, address: str | None = None, force: bool = False, log: Callable[[str], None] = print,
        task: Callable[..., dict] = run_point) -> pd.DataFrame:
    """Run the plan's points as Ray tasks (completed ones skipped), aggregate, and return the
    sweep log (one row per point: status, error, run time and Ray's overhead around it)."""
    t0 = time.perf_counter()
    todo = [pt for pt in p.points if force or not completed(p, pt)]
    done_before = [pt for pt in p.points if pt not in todo]
    total = len(p.points)
    rows = [{"point": pt.name, **{f"grid.{k}": v for k, v in pt.values.items()}, "status": "skipped",
             "error": "completed earlier"} for pt in done_before]
    for i, row in enumerate(rows, 1):
        log(f"[{i}/{total}] {row['point']}: completed earlier, skipped (--force reruns it)")
    if todo:
        ray = _connect(address, None)
        resources = _fit_to_cluster(p.resources, ray)
        remote = ray.remote(**resources)(task)
        data_root = str(paths.data_root())
        submitted = time.time()
        pending = {remote.remote(p.profile, p.sweep, pt, p.notebooks, force, data_root): pt for pt in todo}
        finished = len(rows)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            pt = pending.pop(ready[0])
            received = time.time()
            try:
                rec = ray.get(ready[0])
            except Exception as exc:  # the task raised, or its worker died (memory, node lost): the point failed
                cause = getattr(exc, "cause", None) or exc  # Ray wraps what the task raised
                rec = {"point": pt.name, "values": pt.values, "status": "failed", "error": f"{type(cause).__name__}: {cause}",
                       "run_seconds": float("nan"), "started": float("nan"), "finished": float("nan")}
                atomic.write_text(p.directory / pt.name / aggregate.POINT_FILE, json.dumps(rec, indent=1, default=str))
            finished += 1
            rows.append({"point": pt.name, **{f"grid.{k}": v for k, v in pt.values.items()}, "status": rec["status"],
                         "error": rec.get("error", ""), "run_seconds": rec.get("run_seconds"),
                         "submitted": submitted, "started": rec.get("started"), "finished": rec.get("finished"),
                         "received": received})
            first_line = (rec.get("error") or "").strip().splitlines()[:1]
            log(f"[{finished}/{total}] {pt.name}: " + (f"done in {rec['run_seconds']:.0f} s" if rec["status"] == "done"
                                                       else f"FAILED: {first_line[0] if first_line else 'no message'}"))
    wall = time.perf_counter() - t0
    sweep_log = pd.DataFrame(rows)
    aggregate.write(p.directory, list(p.grid))
    summary = overhead(sweep_log, wall)
    sweep_log = sweep_log.assign(sweep_wall_seconds=round(wall, 3))
    with atomic.atomic_path(p.directory / "sweep_log.csv") as tmp:
        sweep_log.to_csv(tmp, index=False)
    if summary:
        log(f"Ray's overhead: {summary['overhead_seconds']:.1f} s over {summary['points']} point(s) run, "
            f"{summary['overhead_share']:.1%} of their run time ({summary['run_seconds']:.0f} s)")
    failed = sweep_log[sweep_log.status == "failed"]
    log(f"{len(sweep_log) - len(failed)} of {total} points completed; tables in {p.directory / aggregate.AGGREGATE_DIR}, "
        f"across-seed intervals in {p.directory / aggregate.HEADLINES_FILE}")
    for row in failed.itertuples():
        log(f"  failed: {row.point}: {row.error}")
    return sweep_log


def overhead(sweep_log: pd.DataFrame, wall: float) -> dict | None:
    """What Ray added: the sweep's wall time (connection, scheduling, workers, results) less the
    points' own run time, when the points ran one after another (the local default); with
    several points at once, the per-point delays around each run instead."""
    ran = sweep_log[sweep_log.status.isin(["done", "failed"])].dropna(subset=["run_seconds"]) if "run_seconds" in sweep_log else sweep_log.iloc[0:0]
    if ran.empty:
        return None
    run_total = float(ran.run_seconds.sum())
    spans = sorted(zip(ran.started, ran.finished))
    sequential = all(b[0] >= a[1] - 1e-3 for a, b in zip(spans, spans[1:]))
    if sequential:
        extra = wall - run_total
    else:
        extra = float(((ran.received - ran.started) - ran.run_seconds).sum())
    return {"points": len(ran), "run_seconds": run_total, "overhead_seconds": extra,
            "overhead_share": extra / run_total if run_total > 0 else float("nan"), "sequential": sequential}
