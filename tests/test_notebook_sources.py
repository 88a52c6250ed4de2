"""The notebook sources read as a report: prose is prose, code is hidden, figures are captioned.

A report once rendered every prose line as a heading (each markdown line began with ``# ``)
and a strict build did not notice. These checks read the sources themselves.
"""

import re

import pytest

from tamperbench import config

NOTEBOOKS = config.list_notebooks()
#: Tags that keep a code cell's source out of the reader's way (``show-input`` is the
#: explicit opt-in for code a reader should see).
CODE_TAGS = {"parameters", "hide-input", "remove-input", "remove-cell", "hide-cell", "show-input"}


def commented_prose(markdown: str) -> list[str]:
    """Why a markdown cell looks like commented-out text rather than prose ([] if it does not).

    The defect: every line of the cell starts with ``#`` (a jupytext ``py:percent`` comment
    pasted as markdown), so each line renders as a heading.
    """
    lines, in_fence = [], False
    for line in markdown.splitlines():
        if line.lstrip().startswith(("```", "~~~", ":::")):
            in_fence = not in_fence
            continue
        if not in_fence and line.strip():
            lines.append(line)
    problems = []
    if len(lines) >= 2 and all(line.startswith("#") for line in lines):
        problems.append(f"all {len(lines)} lines start with '#': {lines[0][:60]!r}…")
    problems += [f"commented heading {line[:60]!r}" for line in lines if re.match(r"^#+ #", line)]
    return problems


def test_the_check_catches_the_old_defect():
    bad = "# # The classifier\n#\n# Every detector in this study watches one frozen classifier.\n"
    assert commented_prose(bad)
    assert commented_prose("# ## Accuracy")
    good = "# The classifier\n\nEvery detector watches one classifier.\n\n```bash\n# a comment\nmake book\n```\n"
    assert commented_prose(good) == []
    assert commented_prose("## Accuracy") == []


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 5, NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_markdown_cells_are_prose(path):
    nb = config.read_notebook(path)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            assert commented_prose(cell.source) == [], f"{path.name}, cell {i}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_chapter_opens_with_title_and_glued_summary(path):
    nb = config.read_notebook(path)
    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.startswith("# "), f"{path.name} must open with its title"
    assert "{glue:" in first.source, f"{path.name}: the opening summary must quote glued numbers, not typed ones"
    assert sum(line.startswith("# ") for line in first.source.splitlines()) == 1


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_code_is_hidden_and_figures_are_captioned(path):
    nb = config.read_notebook(path)
    labels = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        tags = set(cell.metadata.get("tags", []))
        assert tags & CODE_TAGS, f"{path.name}, cell {i}: tag it hide-input, remove-input or show-input"
        if "results.figure(" in cell.source:
            figure = cell.metadata.get("mystnb", {}).get("figure", {})
            assert figure.get("caption") and figure.get("name"), f"{path.name}, cell {i}: a figure needs a caption and a name"
            assert cell.source.count("results.figure(") == 1, f"{path.name}, cell {i}: one figure per cell"
            labels.append(figure["name"])
    assert len(labels) == len(set(labels))


def test_figure_labels_are_unique_across_the_book():
    names = []
    for path in NOTEBOOKS:
        for cell in config.read_notebook(path).cells:
            name = cell.metadata.get("mystnb", {}).get("figure", {}).get("name")
            if name:
                names.append(name)
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
