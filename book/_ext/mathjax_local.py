"""Serve MathJax from the report itself, so that a shared copy renders formulas offline.

Sphinx points MathJax at a CDN by default; a supervisor opening the archive from ``make share``
may have no network. This takes the MathJax 3 build shipped by the ``sphinx-mathjax-offline``
package, and copies only what a page needs (``tex-chtml.js`` and its web fonts, about 1.6 MB,
not the package's 24 MB) into ``_static/mathjax``. Sphinx adds the script only to pages that
contain maths.
"""

import importlib
from pathlib import Path

from sphinx.util.fileutil import copy_asset

NEEDED = ("tex-chtml.js", "output/chtml/fonts/woff-v2")


def _mathjax_dir() -> Path:
    package = importlib.import_module("sphinx-mathjax-offline")  # the package's folder has a hyphen
    return Path(package.__file__).parent / "static" / "mathjax"


def _copy(app, exc):
    source, target = _mathjax_dir(), Path(app.outdir) / "_static" / "mathjax"
    for part in NEEDED:
        if (source / part).is_dir():
            copy_asset(str(source / part), str(target / part))
        else:
            (target / part).parent.mkdir(parents=True, exist_ok=True)
            (target / part).write_bytes((source / part).read_bytes())


def setup(app):
    app.config.mathjax_path = "mathjax/tex-chtml.js"
    app.connect("build-finished", _copy)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
