"""tamperbench: can OOD detectors tell when inputs, or whole datasets, were tampered with?

The package is deliberately thin. Notebooks call it; each module does one job:

- :mod:`tamperbench.paths`   where data, artifacts and results live;
- :mod:`tamperbench.cache`   content-keyed, atomic, self-healing artifact cache;
- :mod:`tamperbench.config`  the study configuration (top-level ``_config.yml``);
- :mod:`tamperbench.data`    the dataset registry;
- :mod:`tamperbench.models`  the classifier registry and cached training;
- :mod:`tamperbench.results` tidy CSV tables and PNG figures per notebook;
- :mod:`tamperbench.report`  what a chapter shows: parameters, glued numbers, tables;
- :mod:`tamperbench.runner`  executes the notebooks with Papermill.
"""

__version__ = "0.1.0"

from . import cache, config, data, models, paths, plots, report, results  # noqa: E402,F401  (tb.data.load(...) in notebooks)
