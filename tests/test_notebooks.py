"""Smoke run of every notebook in the ci profile, then a strict book build of the result."""

import numpy as np
import pandas as pd
import pytest

from tamperbench import config, paths


@pytest.mark.slow
def test_every_notebook_runs_in_the_ci_profile(ci_book):
    for nb in config.list_notebooks():
        executed = ci_book / f"{nb.stem}.ipynb"
        assert executed.exists()
        assert any(paths.results_dir("ci", nb.stem).glob("*.csv")), f"{nb.stem} wrote no table"
    log = pd.read_csv(paths.results_dir("ci") / "run_log.csv")
    assert set(log.notebook) >= {nb.stem for nb in config.list_notebooks()}
    acc = pd.read_csv(paths.results_dir("ci", "01_classifier") / "accuracy.csv")
    assert list(acc.columns) == ["model", "dataset", "split", "n", "accuracy", "profile", "seed"]  # provenance last
    assert acc.accuracy.min() > 0.5  # even one tiny epoch learns far beyond chance (0.1)


@pytest.mark.slow
def test_executed_chapters_hide_their_parameter_cells(ci_book):
    import nbformat

    for nb in config.list_notebooks():
        executed = nbformat.read(ci_book / f"{nb.stem}.ipynb", as_version=4)
        tagged = [c for c in executed.cells if {"parameters", "injected-parameters"} & set(c.metadata.get("tags", []))]
        assert len(tagged) == 2, nb.stem  # the declared defaults and Papermill's injected values
        assert all("remove-cell" in c.metadata["tags"] for c in tagged)


@pytest.mark.slow
def test_book_builds_without_warnings(ci_site):
    proc, html = ci_site
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert (html / "index.html").exists()
    for nb in config.list_notebooks():
        assert (html / f"{nb.stem}.html").exists()
    assert (html / "references.html").exists()
    assert (html / "discussion.html").exists() and len(list((html / "literature").glob("*.html"))) == 6


@pytest.mark.slow
def test_particul_chapters_report_the_grid_the_rule_and_both_configurations(ci_book):
    res = paths.results_dir("ci", "03_particul")
    selection = pd.read_csv(res / "selection.csv")
    assert selection.chosen.sum() == 1 and selection.published.sum() == 1
    assert list(selection.set.unique()) == ["fgsm (fit half)"]  # the rule saw one attack's fit half only
    grid = pd.read_csv(res / "grid.csv")
    assert set(grid["mode"]) == {"categorical", "argmax", "mean"}
    assert set(grid.layer) == {"block1", "block2", "block3", "multi"} and set(grid.num_parts) == {4, 8}
    assert {"fpr95", "fpr80"} <= set(grid.columns)
    ood = grid[grid.set.str.startswith("ood:")]
    n_selection = pd.read_csv(res / "selection.csv").n_reference.iloc[0]
    assert (ood.n_reference == 10000 - n_selection).all()  # the whole test split, less what the rule saw
    fits = pd.read_csv(res / "fits.csv")
    assert (fits.best_epoch >= 1).all() and (fits.best_epoch <= fits.epochs).all()
    detection = pd.read_csv(paths.results_dir("ci", "04_detection") / "detection.csv")
    assert {"particul", "particul_published"} <= set(detection.detector)
    assert "fpr80" in detection.columns


@pytest.mark.slow
def test_attack_chapter_counts_in_the_papers_units(ci_book):
    res = paths.results_dir("ci", "02_attacks")
    table = pd.read_csv(res / "attacks.csv")
    assert set(table.kind) == {"fixed budget", "minimal perturbation"}
    assert ((table.success_low <= table.success_rate) & (table.success_rate <= table.success_high)).all()
    checks = pd.read_csv(res / "budget_checks.csv")
    white = checks[checks.unit == "gradients"]
    assert (white.counted_per_image <= white.bound_per_image).all()
    black = table[table.box == "black"]
    assert (black.queries_per_image <= black.art_queries_per_image).all()


@pytest.mark.slow
def test_tampered_datasets_chapter_writes_its_tables_and_keeps_its_populations_apart(ci_book):
    res = paths.results_dir("ci", "05_tampered_datasets")
    power = pd.read_csv(res / "batch_power.csv")
    assert {"test", "detector", "attack", "n", "p", "batches", "power", "power_low", "power_high"} <= set(power.columns)
    assert {"ks", "mann_whitney", "tail_count", "higher_criticism", "berk_jones", "mmd", "group_scan"} <= set(power.test)
    assert ((power.power_low <= power.power) & (power.power <= power.power_high)).all()
    flags = pd.read_csv(res / "flags.csv")
    assert {"detector", "attack", "n", "p", "q", "fdr", "recall"} <= set(flags.columns)
    assert flags[flags.p == 0].recall.isna().all()
    fa = pd.read_csv(res / "false_alarms.csv")
    assert set(fa.test) == set(power.test)
    choice = pd.read_csv(res / "openood_choice.csv")
    assert choice.chosen.sum() == 1 and (choice.n_fit_half > 0).all()  # chosen on the fit half, never evaluation
    pops = pd.read_csv(res / "populations.csv").set_index("population")
    assert pops.loc["calibration", "images"] >= 1000


@pytest.mark.slow
def test_openood_chapter_writes_the_issue_tables_and_keeps_its_protocol(ci_book):
    res = paths.results_dir("ci", "06_openood")
    ood = pd.read_csv(res / "ood.csv")
    assert list(ood.columns[:7]) == ["detector", "ood_set", "group", "auroc", "fpr95", "aupr_in", "aupr_out"]
    assert set(ood.group) == {"near", "far", "covariate"}
    assert {"particul", "particul_published", "msp", "knn"} <= set(ood.detector)
    assert (ood.n_id == 2000).all()  # the ci profile's cap on the ID side
    perturbation = pd.read_csv(res / "perturbation.csv", float_precision="round_trip")  # ρ exactly as written
    assert list(perturbation.columns[:4]) == ["detector", "perturbation", "spearman", "flagged"]
    wrong_way = ((perturbation.expected == "falls") & (perturbation.spearman >= -0.3)) | (
        (perturbation.expected == "rises") & (perturbation.spearman <= 0.3)) | perturbation.spearman.isna()
    assert (perturbation.flagged == wrong_way).all()
    both = pd.read_csv(res / "ood_vs_adv.csv")
    assert {"near_auroc", "far_auroc", "adversarial_auroc"} <= set(both.columns)
    assert pd.read_csv(res / "skipped.csv").empty  # every cpu stand-in ships offline


@pytest.mark.slow
def test_adaptive_chapter_writes_its_table_with_the_worst_case(ci_book):
    res = paths.results_dir("ci", "07_adaptive")
    table = pd.read_csv(res / "adaptive.csv")
    assert list(table.columns[:9]) == ["detector", "attack", "eps", "n", "tpr_at_fpr5", "attack_success_rate",
                                       "robust_accuracy_with_detection", "iterations", "restarts"]
    assert {"pgd", "selective", "orthogonal", "composite_apgd", "worst case"} <= set(table.attack)
    # the cascade only ever breaks more inputs, and its last stage is the worst case per input
    cascade = table[~table.attack.str.startswith("naive")]
    for (det, eps), rows in cascade.groupby(["detector", "eps"]):
        robust = rows.set_index("attack").robust_accuracy_with_detection
        stages = [a for a in ("pgd", "selective", "orthogonal", "composite_apgd") if a in robust.index]
        assert (np.diff(robust[stages].values) <= 1e-12).all(), (det, eps)
        assert robust["worst case"] == robust[stages[-1]], (det, eps)
    naive = table[table.attack.str.startswith("naive")]
    assert len(naive) and (naive.n == 10).all()  # the ci profile's n_naive
    conv = pd.read_csv(res / "convergence.csv")
    assert ((conv.twice_iterations <= conv.as_run + 1e-12) & (conv.twice_restarts <= conv.as_run + 1e-12)).all()
    assert (pd.read_csv(res / "adaptive_fpr1.csv").attack == "worst case").any()
    thresholds = pd.read_csv(res / "thresholds.csv")
    assert (thresholds.groupby("detector").tau.nunique() >= 1).all()


@pytest.mark.slow
def test_model_tampering_chapter_writes_both_tables(ci_book):
    res = paths.results_dir("ci", "08_model_tampering")
    tampernn = pd.read_csv(res / "tampernn.csv")
    assert list(tampernn.columns[:5]) == ["tampering", "strength", "markers", "queries_to_detect", "detection_rate"]
    assert set(tampernn.markers) == {"boundary", "adversarial", "random"}
    assert {"finetune", "quantize", "prune", "trojan", "watermark"} <= set(tampernn.tampering)
    assert (tampernn[tampernn.tampering == "none"].detection_rate == 0).all()  # no false alarm on the untouched copy
    watermark = pd.read_csv(res / "watermark.csv")
    assert list(watermark.columns[:7]) == ["model", "epsilon", "key_size", "mismatches", "threshold", "accepted", "accuracy"]
    assert (watermark.accepted == (watermark.mismatches <= watermark.threshold)).all()
    assert (res / "tampernn.png").exists() and (res / "watermark.png").exists()
