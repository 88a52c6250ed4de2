"""Smoke run of every notebook in the ci profile, then a strict book build of the result."""

import shutil
import subprocess
import sys

import pandas as pd
import pytest

from tamperbench import config, paths, runner


@pytest.fixture(scope="module")
def ci_book(tmp_path_factory):
    """The book sources with every notebook executed in the ci profile (real data root)."""
    book = tmp_path_factory.mktemp("book")
    shutil.copytree(runner.BOOK_DIR, book, dirs_exist_ok=True, ignore=shutil.ignore_patterns("_build", "[0-9][0-9]_*.ipynb"))
    runner.run("ci", book_dir=book, force=True)
    return book


@pytest.mark.slow
def test_every_notebook_runs_in_the_ci_profile(ci_book):
    for nb in config.list_notebooks():
        assert (ci_book / nb.name).exists()
        assert any(paths.results_dir("ci", nb.stem).glob("*.csv")), f"{nb.stem} wrote no table"
    log = pd.read_csv(paths.results_dir("ci") / "run_log.csv")
    assert set(log.notebook) >= {nb.stem for nb in config.list_notebooks()}
    acc = pd.read_csv(paths.results_dir("ci", "01_classifier") / "accuracy.csv")
    assert list(acc.columns) == ["model", "dataset", "split", "accuracy"]
    assert acc.accuracy.min() > 0.5  # even one tiny epoch learns far beyond chance (0.1)


@pytest.mark.slow
def test_book_builds_without_warnings(ci_book):
    jb = shutil.which("jupyter-book", path=str(__import__("pathlib").Path(sys.executable).parent))
    proc = subprocess.run([jb, "build", str(ci_book), "-W", "-n", "--keep-going"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert (ci_book / "_build" / "html" / "index.html").exists()
    assert (ci_book / "_build" / "html" / "01_classifier.html").exists()
