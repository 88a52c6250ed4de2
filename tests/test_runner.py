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


def _write_study(root, names, cell, suite, profiles):
    """Notebooks ``names`` (each writing its parameters) and a study config under ``root``."""
    nb_dir, book = root / "notebooks", root / "book"
    nb_dir.mkdir(), book.mkdir()
    for name in names:
        write_notebook(nb_dir / f"{name}.md", SHARED_CELL + cell, f"NAME = {name!r}", WRITE_PARAMS)
    cfg = root / "_config.yml"
    cfg.write_text(
        "shared: {seed: 0, device: cpu, dataset: fashion_mnist, model: smallcnn, epochs: 1, batch_size: 8, lr: 0.1, n_train: null,"
        f" n_pool: 4, attack_suite: {suite}, particul: {{}}, particul_search: {{}}}}\n"
        f"default_profile: cpu\nprofiles:\n{profiles}"
    )
    return nb_dir, book, cfg


@pytest.fixture
def study(tmp_path, data_root):
    return _write_study(tmp_path, ("01_first", "03_third"), "\nk = 1", "{}",
                        "  cpu: {01_first: {k: 5}, shared: {epochs: 2}}\n  ci: {}\n")


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


def test_a_failing_notebook_keeps_the_last_good_copy_and_blocks_the_build(study):
    nb_dir, book, cfg = study
    quiet = dict(book_dir=book, notebooks_dir=nb_dir, config_path=cfg, log=lambda m: None)
    runner.run("cpu", **quiet)
    good = (book / "03_third.ipynb").read_bytes()
    params_before = _params("cpu", "03_third")
    write_notebook(nb_dir / "03_third.md", SHARED_CELL + "\nk = 1", "raise ValueError('boom-123')")
    with pytest.raises(runner.NotebookFailed, match=r"03_third.md failed(.|\n)*last good copy(.|\n)*ValueError: boom-123"):
        runner.run("cpu", **quiet)
    assert (book / "03_third.ipynb").read_bytes() == good  # nothing lost
    assert _params("cpu", "03_third") == params_before
    assert (paths.results_dir("cpu") / "failed" / "03_third.ipynb").exists()
    log = pd.read_csv(paths.results_dir("cpu") / "run_log.csv").set_index("notebook")
    assert log.loc["03_third", "status"] == "failed" and log.loc["01_first", "status"] == "ran"
    assert not [f for f in book.iterdir() if f.name.startswith(".")]  # no temporary file left in book/
    problems = runner.check_book(book, nb_dir)
    assert problems and "03_third failed" in problems[0]
    with pytest.raises(config.ConfigError, match="not building the book: 03_third failed"):
        runner.build(book, notebooks_dir=nb_dir)


def test_stops_at_the_first_failing_notebook(study):
    nb_dir, book, cfg = study
    write_notebook(nb_dir / "02_broken.md", SHARED_CELL, "raise ValueError('boom-123')")
    with pytest.raises(runner.NotebookFailed, match=r"02_broken.md failed(.|\n)*ValueError: boom-123"):
        runner.run("cpu", book_dir=book, notebooks_dir=nb_dir, config_path=cfg, log=lambda m: None)
    assert (book / "01_first.ipynb").exists()
    assert not (book / "03_third.ipynb").exists()  # never ran
    assert not (paths.results_dir("cpu", "03_third")).exists()
    assert (paths.results_dir("cpu") / "failed" / "02_broken.ipynb").exists()
    assert runner.check_book(book, nb_dir)  # a chapter is missing: the book must not build


def test_sigterm_leaves_no_file_in_book(study, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    nb_dir, book, cfg = study
    marker = tmp_path / "in_the_cell"
    write_notebook(nb_dir / "01_first.md", SHARED_CELL + "\nk = 1",
                   f"import pathlib, time; pathlib.Path({str(marker)!r}).touch(); time.sleep(60)")
    script = (f"from tamperbench import runner; runner.run('cpu', book_dir={str(book)!r}, notebooks_dir={str(nb_dir)!r},"
              f" config_path={str(cfg)!r}, log=print)")
    proc = subprocess.Popen([sys.executable, "-c", script], env=os.environ.copy(), stdout=subprocess.PIPE, text=True)
    assert "01_first: running" in proc.stdout.readline()
    deadline = time.monotonic() + 120
    while not marker.exists() and time.monotonic() < deadline:  # the kernel is up and sleeping in the cell
        time.sleep(0.2)
    assert marker.exists(), "the notebook's cell never started"
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert list(book.iterdir()) == []


def _shared_study(tmp_path, data_root):
    nb_dir, book, cfg = _write_study(tmp_path, ("01_first", "02_second"), "\nattack_suite = {}\nk = 1",
                                     "{fgsm: {n: 4, eps: 0.1}, bim: {n: 4, eps: 0.1, max_iter: 5}}", "  cpu: {}\n")
    return dict(book_dir=book, notebooks_dir=nb_dir, config_path=cfg, log=lambda m: None)


def test_a_shared_change_for_some_chapters_is_refused(tmp_path, data_root):
    kw = _shared_study(tmp_path, data_root)
    runner.run("cpu", **kw)
    with pytest.raises(config.ConfigError, match=r"02_second \(seed=0\).*--variant"):
        runner.run("cpu", only=["01_first"], overrides={"seed": 1}, **kw)
    # a chapter's own parameter changes nothing shared: allowed
    assert runner.run("cpu", only=["01_first"], overrides={"k": 3}, **kw)[0].status == "ran"
    # the whole book rerun together stays consistent: allowed
    assert [r.status for r in runner.run("cpu", overrides={"seed": 1}, **kw)] == ["ran", "ran"]


def test_dotted_overrides_change_one_nested_value(tmp_path, data_root):
    kw = _shared_study(tmp_path, data_root)
    cfg = config.load(kw["config_path"], kw["notebooks_dir"])
    params = cfg.parameters("cpu", "01_first", {"attack_suite.fgsm.eps": 0.2})
    assert params["attack_suite"] == {"fgsm": {"n": 4, "eps": 0.2}, "bim": {"n": 4, "eps": 0.1, "max_iter": 5}}
    assert cfg.parameters("cpu", "01_first")["attack_suite"]["fgsm"]["eps"] == 0.1  # the config is untouched


@pytest.mark.parametrize("override, message", [
    ({"attack_suite.fgsm.eps": 2.0}, "attack_suite.fgsm"),
    ({"attack_suite.fgsm.eps": "big"}, "attack_suite.fgsm"),
    ({"attack_suite.nosuch.eps": 0.1}, "unknown attack 'nosuch'; valid attacks: fgsm"),
    ({"attack_suite.fgsm.n": 0}, "n must be an int"),
    ({"dataset": "imagenet"}, "unknown dataset 'imagenet'; valid choices"),
    ({"seed.x": 1}, "seed is 0, not a mapping"),
    ({"nope.x": 1}, "unknown parameter 'nope.x'"),
])
def test_nested_values_are_validated_before_any_kernel_starts(tmp_path, data_root, monkeypatch, override, message):
    kw = _shared_study(tmp_path, data_root)
    monkeypatch.setattr(runner, "ensure_kernel", lambda: pytest.fail("a kernel was started"))
    with pytest.raises(config.ConfigError, match=message):
        runner.run("cpu", overrides=override, **kw)
    assert not any(kw["book_dir"].iterdir())


def test_a_variant_writes_nothing_into_the_main_results(study):
    nb_dir, book, cfg = study
    quiet = dict(notebooks_dir=nb_dir, config_path=cfg, log=lambda m: None)
    runner.run("cpu", book_dir=book, **quiet)
    main_before = {p: p.read_bytes() for p in paths.results_dir("cpu", variant="").rglob("*") if p.is_file()}
    runner.run("cpu", only=["01_first"], overrides={"seed": 9}, variant="seed9", **quiet)
    main_after = {p: p.read_bytes() for p in paths.results_dir("cpu", variant="").rglob("*")
                  if p.is_file() and "variants" not in p.parts}
    assert main_after == main_before
    assert _params("cpu", "01_first") ["seed"] == 0
    variant_dir = paths.results_dir("cpu", variant="seed9")
    assert json.loads((variant_dir / "01_first" / "params.json").read_text())["seed"] == 9
    assert (variant_dir / "book" / "01_first.ipynb").exists() and (variant_dir / "book" / "_toc.yml").exists()
    assert not (book / "01_first.ipynb").read_bytes() == (variant_dir / "book" / "01_first.ipynb").read_bytes()
    with pytest.raises(config.ConfigError, match="variant name"):
        runner.run("cpu", variant="../escape", **quiet)


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


def test_list_names_what_exists(capsys):
    from tamperbench.__main__ import main

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for expected in ("01_classifier: n_show=", "PROFILES (default: cpu): ci, cpu, gpu", "fgsm (white box",
                     "eps=0.1 [in [0, clip_max]]", "particul: num_parts=4", "lid *:", "fashion_mnist [id]",
                     "mnist_subset [ood]", "cifar10: near = cifar100, tin", "blur: Gaussian blur"):
        assert expected in out, expected


@pytest.mark.parametrize("override, message", [
    ({"detector_params.knn.kk": 3}, r"04_detection \(ci\): detector_params\.knn: unknown parameter 'kk' \(did you mean 'k'\?\); "
                                    r"valid parameters: n_fit, seed, device, batch_size, k, normalize"),
    ({"detector_params.lid.k": 1}, r"detector_params\.lid: k must be an int in \[2, n_reference\)"),
    ({"detector_params.knn": 3}, r"detector_params\.knn must be a mapping"),
    ({"detector_params.nosuch.k": 3}, r"detector_params names unknown detector 'nosuch'; valid detectors: particul"),
])
def test_a_detector_parameter_typo_fails_before_any_kernel_starts(tmp_path, monkeypatch, override, message):
    """The study's own configuration: a bad detector parameter is refused up front, not inside chapter 4."""
    monkeypatch.setattr(runner, "ensure_kernel", lambda: pytest.fail("a kernel was started"))
    book = tmp_path / "book"
    book.mkdir()
    with pytest.raises(config.ConfigError, match=message):
        runner.run("ci", book_dir=book, overrides=override, log=lambda m: None)
    assert not any(book.iterdir())


def test_cli_names_a_detector_parameter_typo_in_one_line(capsys):
    from tamperbench.__main__ import main

    assert main(["run", "--profile", "ci", "--quiet", "-p", "detector_params.knn.kk=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown parameter 'kk'" in err and "valid parameters:" in err and len(err.strip().splitlines()) == 1
