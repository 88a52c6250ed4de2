import pandas as pd

from tamperbench import report


def test_parameters_markdown_lists_every_parameter_with_nested_entries():
    namespace = {"profile": "ci", "seed": 3, "device": "cpu", "dataset": "fashion_mnist", "model": "smallcnn",
                 "epochs": 1, "batch_size": 8, "lr": 0.1, "n_train": None, "n_pool": 4,
                 "attack_suite": {"fgsm": {"n": 4, "eps": 0.1}}, "eps_grid": [0.1, 0.2]}
    text = report.parameters_markdown("02_attacks", namespace)
    assert text.startswith("```{admonition} Parameters of this run (profile ci)\n:class: dropdown")
    assert "| `seed` | `3` |" in text and "| `n_train` | `null` |" in text
    assert "| `attack_suite.fgsm` | `{n: 4, eps: 0.1}` |" in text
    assert "| `eps_grid` | `[0.1, 0.2]` |" in text
    assert "`profile`" not in text.split("\n", 1)[1]  # the title says it; not repeated as a row
    assert text.rstrip().endswith("```")


def test_glue_pastes_plain_text_and_python_numbers(monkeypatch):
    import numpy as np
    import myst_nb

    glued = {}
    monkeypatch.setattr(myst_nb, "glue", lambda name, value, display=True: glued.update({name: value}))
    assert report.glue("acc", np.float64(0.93)) is None  # nothing shown when it ends a cell
    report.glue("name", "smallcnn")
    assert type(glued["acc"]) is float and glued["acc"] == 0.93
    assert repr(glued["name"]) == "smallcnn"  # {glue:text} pastes text/plain: no quotes


def test_table_rounds_floats_and_hides_the_index():
    html = report.table(pd.DataFrame({"attack": ["fgsm"], "auroc": [0.912345], "n": [10]}), digits=2).to_html()
    assert "0.91" in html and "0.912345" not in html and ">fgsm<" in html
    assert 'class="dataframe"' in html and "row_heading" not in html


def test_package_versions_and_machine():
    versions = report.package_versions(("torch", "no-such-package-xyz"))
    assert versions.set_index("package").version["no-such-package-xyz"] == "not installed"
    assert versions.set_index("package").version["torch"].startswith("2.")
    facts = report.machine()
    assert facts["cpu_cores"] >= 1 and facts["memory_gib"] > 0


def test_glued_markdown_is_text_even_when_it_names_a_path(monkeypatch, tmp_path):
    import myst_nb

    glued = {}
    monkeypatch.setattr(myst_nb, "glue", lambda name, value, display=True: glued.update({name: value}))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "none").write_text("a file that must not be read")
    for text in (".", "none", "**bold** verdict."):
        report.glue_md("verdict", text)
        assert glued["verdict"].data == text
