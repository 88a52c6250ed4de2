"""tamperbench: can OOD detectors tell when inputs, or whole datasets, were tampered with?

The package is deliberately thin. Notebooks call it; each module does one job:

- :mod:`tamperbench.paths`      where data, artifacts and results live (and a variant's);
- :mod:`tamperbench.atomic`     atomic file writes;
- :mod:`tamperbench.cache`      content-keyed, atomic, self-healing artifact cache;
- :mod:`tamperbench.config`     the study configuration (top-level ``_config.yml``), overrides;
- :mod:`tamperbench.data`       the dataset registry (in-distribution and OOD sets);
- :mod:`tamperbench.models`     the classifier registry and cached training;
- :mod:`tamperbench.attacks`    the attack registry over ART, with cached per-sample records;
- :mod:`tamperbench.suite`      the study's attack suite: pool, runs, summaries;
- :mod:`tamperbench.tampering`  tampered datasets built from attack records;
- :mod:`tamperbench.detectors`  one module per detector, PARTICUL on CaBRNet first;
- :mod:`tamperbench.particul_search`  PARTICUL's grid (layer, parts, aggregation) and the rule
  that picks the study's default configuration;
- :mod:`tamperbench.combination`  combined detectors for the study: tails, members chosen on fit
  halves, the clean images that calibrate them (chapters 4, 5, 7);
- :mod:`tamperbench.metrics`    detection metrics with bootstrap intervals;
- :mod:`tamperbench.benchmark`  the per-sample detection benchmark, cached scores;
- :mod:`tamperbench.batch`      tampered batches: calibrated batch tests, BH flags, the simulation;
- :mod:`tamperbench.openood`    the OpenOOD v1.5 protocol offline: OOD sets by group, published numbers;
- :mod:`tamperbench.perturbations`  natural perturbations and the CODE perturbation benchmark;
- :mod:`tamperbench.adaptive`   adaptive attacks (detector-aware PGD, the detector as a class,
  surrogates, a gradient-free check) and robust accuracy with detection (chapter 7);
- :mod:`tamperbench.model_tampering`  tampered models: TamperNN markers, tamperings, frontier-stitching
  watermarks (chapter 8);
- :mod:`tamperbench.plots`      figures several chapters draw;
- :mod:`tamperbench.results`    tidy CSV tables and PNG figures per notebook, with provenance;
- :mod:`tamperbench.report`     what a chapter shows: parameters, glued numbers, tables;
- :mod:`tamperbench.runner`     executes the notebooks with Papermill, builds the book;
- :mod:`tamperbench.sweep`      grids of runs (seeds, parameters) as Ray tasks, each an isolated variant;
- :mod:`tamperbench.aggregate`  a sweep's tables over all points, and across-seed intervals;
- :mod:`tamperbench.catalog`    ``python -m tamperbench list``: what exists;
- :mod:`tamperbench.share`      the built report as one archive that opens offline.
"""

__version__ = "0.1.0"

import importlib

#: submodules reached as attributes (``tb.data.load(...)`` in notebooks), imported on first use:
#: importing the package stays cheap (no torch) for what needs only paths, config or the runner
_SUBMODULES = ("adaptive", "aggregate", "atomic", "attacks", "batch", "benchmark", "cache", "catalog", "combination", "config", "data",
               "detectors", "metrics", "model_tampering", "models", "openood", "particul_search", "paths",
               "perturbations", "plots", "report", "results", "runner", "share", "suite", "sweep", "tampering")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_SUBMODULES])
