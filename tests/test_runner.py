import json

import nbformat
import pandas as pd
import pytest

from tamperbench import config, paths, runner
from tests.notebook_factory import SHARED_CELL, write_notebook

WRITE_PARAMS = (
    "import json, tamperbench as tb\n"
    "out = tb.paths.results_dir(profile, NAME)\n"
    "out.mkdir(parents=True, exist_ok=True)\n"
    "(out / 'params.json').write_text(json.dumps(dict(profile=profile, seed=seed, k=k, epochs=epochs)))"
)


@pytest.fixture
def study(tmp_path, data_root):
    nb_dir, book = tmp_path / "notebooks", tmp_path / "book"
    nb_dir.mkdir()
    book.mkdir()
    for name in ("01_first", "03_third"):
        write_notebook(nb_dir / f"{name}.md", SHARED_CELL + "\nk = 1", f"NAME = {name!r}", WRITE_PARAMS)
    cfg = tmp_path / "_config.yml"
    cfg.write_text(
        "shared: {seed: 0, device: cpu, dataset: fashion_mnist, model: smallcnn, epochs: 1, batch_size: 8, lr: 0.1, n_train: null,"
        " n_pool: 4, attack_suite: {}, particul: {}}\n"
        "default_profile: cpu\n"
        "profiles:\n  cpu: {01_first: {k: 5}, shared: {epochs: 2}}\n  ci: {}\n"
    )
    return nb_dir, book, cfg


def _params(profile, name):
    return json.loads((paths.results_dir(profile, name) / "params.json").read_text())


def test_parameters_are_injected_and_overridden(study):
    nb_dir, book, cfg = study
    runner.run("cpu", overrides={"seed": 7}, book_dir=book, notebooks_dir=nb_dir, config_path=cfg, log=lambda m: None)
    assert _params("cpu", "01_first") == {"profile": "cpu", "seed": 7, "k": 5, "epochs": 2}
    assert _params("cpu", "03_third") == {"profile": "cpu", "seed": 7, "k": 1, "epochs": 2}
    executed = nbformat.read(book / "01_first.ipynb", as_version=4)
    assert executed.metadata["tamperbench"]["parameters"]["k"] == 5
    log = pd.read_csv(paths.results_dir("cpu") / "run_log.csv")
    assert list(log.notebook) == ["01_first", "03_third"]
    assert (log.wall_seconds > 0).all() and (log.peak_memory_mb > 10).all()


def test_unchanged_notebooks_are_skipped_and_changes_rerun(study):
    nb_dir, book, cfg = study
    quiet = dict(book_dir=book, notebooks_dir=nb_dir, config_path=cfg, log=lambda m: None)
    runner.run("cpu", **quiet)
    again = runner.run("cpu", **quiet)
    assert [r.status for r in again] == ["skipped", "skipped"]
    changed = runner.run("cpu", overrides={"k": 2}, **quiet)
    assert [r.status for r in changed] == ["ran", "ran"]
    forced = runner.run("cpu", only=["03_third"], overrides={"k": 2}, force=True, **quiet)
    assert [(r.notebook, r.status) for r in forced] == [("03_third", "ran")]


def test_a_library_change_reruns(study, monkeypatch):
    nb_dir, book, cfg = study
    quiet = dict(book_dir=book, notebooks_dir=nb_dir, config_path=cfg, log=lambda m: None)
    runner.run("cpu", only=["01_first"], **quiet)
    monkeypatch.setattr(runner.cache, "source_digest", lambda: "a-changed-library")
    assert runner.run("cpu", only=["01_first"], **quiet)[0].status == "ran"


def test_stops_at_the_first_failing_notebook(study):
    nb_dir, book, cfg = study
    write_notebook(nb_dir / "02_broken.md", SHARED_CELL, "raise ValueError('boom-123')")
    (book / "02_broken.ipynb").write_text("{}")  # a stale copy from an earlier run
    with pytest.raises(runner.NotebookFailed, match=r"02_broken.md failed(.|\n)*ValueError: boom-123"):
        runner.run("cpu", book_dir=book, notebooks_dir=nb_dir, config_path=cfg, log=lambda m: None)
    assert (book / "01_first.ipynb").exists()
    assert not (book / "02_broken.ipynb").exists()  # no stale chapter left to build
    assert not (book / "03_third.ipynb").exists()  # never ran
    assert not (paths.results_dir("cpu", "03_third")).exists()
    assert (paths.results_dir("cpu") / "failed" / "02_broken.ipynb").exists()


def test_bad_requests_fail_before_running_anything(study):
    nb_dir, book, cfg = study
    kw = dict(book_dir=book, notebooks_dir=nb_dir, config_path=cfg, log=lambda m: None)
    with pytest.raises(config.ConfigError, match="valid notebooks: 01_first, 03_third"):
        runner.run("cpu", only=["02_missing"], **kw)
    with pytest.raises(config.ConfigError, match="valid profiles: cpu, ci"):
        runner.run("gpu", **kw)
    with pytest.raises(config.ConfigError, match="must be int"):
        runner.run("cpu", overrides={"k": "five"}, **kw)
    assert not any(book.iterdir())


def test_cli_reports_errors_in_one_line(capsys):
    from tamperbench.__main__ import main

    assert main(["run", "--profile", "nope"]) == 2
    assert "valid profiles: ci, cpu, gpu" in capsys.readouterr().err
    assert main(["run", "-p", "seed"]) == 2
