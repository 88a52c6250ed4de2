"""What a chapter shows its reader: the run's parameters, glued numbers and formatted tables.

The report is read as HTML (Jupyter Book over the executed notebooks). A chapter's summary
quotes numbers that the notebook computed, through myst-nb's ``glue``: never typed by hand, so
they cannot drift from the tables. Code stays behind toggles (cell tags); what a reader sees
is prose, figures with captions, and tables rounded for reading.
"""

from __future__ import annotations

from typing import Any, Mapping

import pandas as pd
import yaml

from . import config


def _inline(value: Any) -> str:
    """A parameter value as one short line of YAML flow style (what ``-p key=value`` accepts)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False).strip()
    return text[:-4].strip() if text.endswith("\n...") else text.removesuffix("...").strip()


def parameters_markdown(notebook: str, namespace: Mapping[str, Any], profile: str | None = None) -> str:
    """A collapsed admonition listing every parameter of ``notebook`` with its value in this run.

    Dict parameters (the attack suite, PARTICUL's settings) get one row per entry, so the
    table stays readable.
    """
    declared = config.notebook_parameters(config.NOTEBOOKS_DIR / f"{notebook}{config.NOTEBOOK_SUFFIX}")
    rows = []
    for name in declared:
        if name == "profile" or name not in namespace:
            continue
        value = namespace[name]
        if isinstance(value, dict) and value:
            rows += [(f"{name}.{key}", _inline(sub)) for key, sub in value.items()]
        else:
            rows.append((name, _inline(value)))
    profile = profile if profile is not None else namespace.get("profile", "?")
    table = "\n".join(f"| `{name}` | `{value}` |" for name, value in rows)
    return (
        # no backticks in the title: a backtick fence's info string may not contain any
        f"```{{admonition}} Parameters of this run (profile {profile})\n:class: dropdown\n\n"
        "Set in the study configuration (`_config.yml`) or on the command line "
        "(`python -m tamperbench run -p key=value`); see {doc}`90_reproduce`.\n\n"
        f"| parameter | value |\n|---|---|\n{table}\n```\n"
    )


def show_parameters(notebook: str, namespace: Mapping[str, Any]) -> None:
    """Display the run's parameters at the top of a chapter (see :func:`parameters_markdown`)."""
    from IPython.display import Markdown, display

    display(Markdown(parameters_markdown(notebook, namespace)))


class _Plain:
    """A string whose plain-text form has no quotes (``{glue:text}`` pastes that form)."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        # myst-nb literal-evaluates the plain text: "54,000" would become the tuple (54, 0).
        # Such a string keeps its quotes, which that evaluation then removes.
        from ast import literal_eval

        try:
            literal_eval(self.text)
        except (SyntaxError, ValueError):
            return self.text
        return repr(self.text)


def glue(name: str, value: Any) -> None:
    """Glue ``value`` for the chapter's prose (``{glue:text}`name```) without showing it here.

    NumPy scalars become Python numbers (their repr, ``np.float64(0.9)``, defeats format specs
    such as ``{glue:text}`acc:.1%```) and strings lose their quotes.
    """
    from myst_nb import glue as _glue

    shown = value.item() if hasattr(value, "item") and getattr(value, "ndim", None) == 0 else value
    if isinstance(shown, str):
        shown = _Plain(shown)
    _glue(name, shown, display=False)  # returns None: a glue as a cell's last line shows nothing


def glue_md(name: str, text: str) -> None:
    """Glue a Markdown phrase (a verdict, a list of names) for ``{glue:md}`name``` in prose."""
    from IPython.display import Markdown

    md = Markdown("")  # IPython reads a str naming an existing path (".", "none") as a file name
    md.data = text
    glue(name, md)


def table(df: pd.DataFrame, digits: int = 3, caption: str | None = None, nowrap: bool = False):
    """A table for reading: floats rounded to ``digits``, no index column, an optional caption;
    ``nowrap`` keeps each cell on one line (short annotated values such as "+0.83 ✗")."""
    floats = [c for c in df.columns if pd.api.types.is_float_dtype(df[c])]
    styled = (
        df.style.hide(axis="index")
        .format({c: f"{{:.{digits}f}}" for c in floats}, na_rep="–")
        .set_table_attributes('class="dataframe"')
    )
    if nowrap:
        styled = styled.set_properties(**{"white-space": "nowrap"})
    return styled.set_caption(caption) if caption else styled


#: The packages whose versions a reader needs to reproduce the report.
KEY_PACKAGES = ("torch", "torchvision", "adversarial-robustness-toolbox", "pytorch-ood", "cabrnet", "captum",
                "numpy", "scikit-learn", "pandas", "papermill", "jupyter-book", "myst-nb", "sphinx")


def package_versions(names=KEY_PACKAGES) -> pd.DataFrame:
    """Installed versions of ``names`` (``not installed`` where absent)."""
    from importlib import metadata

    rows = []
    for name in names:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = "not installed"
        rows.append({"package": name, "version": version})
    return pd.DataFrame(rows)


def machine() -> dict:
    """The machine this runs on: OS, CPU model and cores, memory, accelerator, Python."""
    import os
    import platform

    import psutil
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU only)"
    return {
        "os": f"{platform.system()} {platform.release()}",
        "cpu": cpu,
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": gpu,
        "python": platform.python_version(),
    }


def chapter_parameters(book_dir=None, exclude=("90_reproduce",)) -> pd.DataFrame:
    """The shared parameters each executed chapter of a book ran with, one row per (chapter,
    parameter), and whether every chapter agrees on that parameter (``consistent``)."""
    import os
    from pathlib import Path

    from . import runner

    book_dir = Path(book_dir or os.environ.get("TAMPERBENCH_BOOK_DIR") or runner.BOOK_DIR)
    rows = []
    for chapter, params in runner.executed_parameters(book_dir).items():
        if chapter in exclude:
            continue
        for key in ("profile", *runner.CONSISTENT_KEYS):
            if key in params:
                rows.append({"chapter": chapter, "parameter": key, "value": _inline(params[key])})
    df = pd.DataFrame(rows, columns=["chapter", "parameter", "value"])
    df["consistent"] = df.groupby("parameter")["value"].transform("nunique") == 1
    return df
