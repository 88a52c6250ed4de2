import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from tamperbench import config, data, openood, paths, runner
from tests.conftest import write_idx


# ---- the sets' loaders
@pytest.mark.parametrize("name", ["mnist_subset", "textures", "sklearn_digits", "faces", "noise_gaussian", "noise_uniform"])
def test_offline_evaluation_sets_take_both_parts_deterministically(name):
    full = data.load_evaluation(name, seed=0)
    assert len(full) == len(data.load(name, "train")) + len(data.load(name, "test"))
    assert full.x.shape[1:] == (1, 28, 28) and 0.0 <= float(full.x.min()) and float(full.x.max()) <= 1.0
    some = data.load_evaluation(name, seed=0, n=30, shape=(3, 32, 32))
    assert some.x.shape == (30, 3, 32, 32)
    assert torch.equal(some.x, data.load_evaluation(name, seed=0, n=30, shape=(3, 32, 32)).x)


def test_torchvision_sets_evaluate_on_their_official_test_split(tiny_cifar):
    ds = data.load_evaluation("cifar100", seed=0)
    assert len(ds) == 40 and ds.split == "test"


def test_mnist_reads_torchvision_layout(data_root):
    raw = data_root / "datasets" / "MNIST" / "raw"
    x = np.random.default_rng(0).integers(0, 256, (7, 28, 28))
    write_idx(raw / "t10k-images-idx3-ubyte", x)
    write_idx(raw / "t10k-labels-idx1-ubyte", np.arange(7))
    ds = data.load("mnist", "test", shape=(3, 32, 32))
    assert ds.x.shape == (7, 3, 32, 32) and ds.y.tolist() == list(range(7))
    assert 0.0 <= float(ds.x.min()) and float(ds.x.max()) <= 1.0


def _write_images(folder, names, size=(40, 50)):
    from PIL import Image

    rng = np.random.default_rng(0)
    for n in names:
        (folder / n).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / n)


def test_tinyimagenet_reads_a_folder_of_class_folders(data_root):
    _write_images(data_root / "datasets" / "tin", [f"n0{c}/img_{i}.JPEG" for c in range(3) for i in range(10)])
    both = data.load_evaluation("tin", seed=0)
    assert both.x.shape == (30, 3, 32, 32) and set(both.y.tolist()) == {0, 1, 2}
    assert torch.equal(both.x, data.load_evaluation("tin", seed=0).x)


def test_places365_reads_the_small_validation_images(data_root):
    folder = data_root / "datasets" / "places365"
    names = [f"Places365_val_{i:08d}.jpg" for i in range(1, 11)]
    _write_images(folder / "val_256", names, size=(256, 256))
    (folder / "places365_val.txt").write_text("".join(f"{n} {i % 365}\n" for i, n in enumerate(names)))
    ds = data.load_evaluation("places365", seed=0, shape=(3, 32, 32))
    assert ds.x.shape == (10, 3, 32, 32) and sorted(ds.y.tolist()) == list(range(10))


def test_a_set_that_cannot_be_had_is_skipped_with_its_reason(tiny_cifar):
    loaded, skipped = openood.load_sets({"near": ["cifar100", "tin"], "far": ["mnist", "svhn", "dtd", "places365"]},
                                        (3, 32, 32), n=None)
    assert set(loaded) == {"cifar100", "svhn", "dtd"}
    assert {s.ood_set: s.group for s in skipped} == {"tin": "near", "mnist": "far", "places365": "far"}
    reasons = {s.ood_set: s.reason for s in skipped}
    assert "no TinyImageNet loader" in reasons["tin"] and "downloads disabled" in reasons["mnist"]
    assert all(s.reason for s in skipped)


def test_bad_groups_are_refused_with_the_valid_choices():
    with pytest.raises(openood.ProtocolError, match="unknown OOD group 'middle'; valid groups: near, far"):
        openood.check_groups({"middle": ["faces"]})
    with pytest.raises(openood.ProtocolError, match="unknown dataset 'lsun'; valid datasets:"):
        openood.check_groups({"far": ["lsun"]})
    with pytest.raises(openood.ProtocolError, match="in both near and far"):
        openood.check_groups({"near": ["faces"], "far": ["faces"]})


def test_covariate_sets_are_corrupted_copies():
    x = torch.rand(5, 1, 28, 28)
    sets = openood.covariate_sets(x, {"noise": 0.5, "rotation": 90.0}, seed=0)
    assert set(sets) == {"corrupted_noise", "corrupted_rotation"}
    assert all(v.shape == x.shape and not torch.equal(v, x) for v in sets.values())


# ---- metrics and tables
def test_ood_is_the_positive_class():
    id_scores, ood_scores = np.linspace(0, 1, 100), np.linspace(2, 3, 50)  # OOD scores higher: caught
    row = openood.ood_row("msp", "svhn", "far", id_scores, ood_scores)
    assert row["auroc"] == pytest.approx(1.0) and row["fpr95"] == pytest.approx(0.0)
    flipped = openood.ood_row("msp", "svhn", "far", ood_scores, id_scores)
    assert flipped["auroc"] == pytest.approx(0.0) and flipped["fpr95"] == pytest.approx(1.0)
    assert row["n_id"] == 100 and row["n_ood"] == 50


def test_group_means_and_the_published_comparison():
    ood = pd.DataFrame([
        {"detector": "msp", "ood_set": "cifar100", "group": "near", "auroc": 0.88, "fpr95": 0.5, "aupr_in": 0.9, "aupr_out": 0.8},
        {"detector": "msp", "ood_set": "tin", "group": "near", "auroc": 0.90, "fpr95": 0.4, "aupr_in": 0.9, "aupr_out": 0.8},
        {"detector": "msp", "ood_set": "svhn", "group": "far", "auroc": 0.80, "fpr95": 0.6, "aupr_in": 0.9, "aupr_out": 0.8},
        {"detector": "particul", "ood_set": "svhn", "group": "far", "auroc": 0.70, "fpr95": 0.6, "aupr_in": 0.9, "aupr_out": 0.8},
    ])
    means = openood.group_means(ood)
    near = means[(means.detector == "msp") & (means.group == "near")].iloc[0]
    assert near.auroc == pytest.approx(0.89) and near.n_sets == 2
    cmp = openood.published_comparison(means, "cifar10").set_index("group")
    assert set(cmp.detector) == {"msp"}  # PARTICUL has no published v1.5 number
    assert cmp.loc["near", "auroc_published"] == 88.03 and bool(cmp.loc["near", "within_tolerance"])
    assert not bool(cmp.loc["far", "within_tolerance"])  # 80.0 against 90.73
    assert openood.published_comparison(means, "fashion_mnist").empty


def test_rank_correlation_ignores_missing_detectors():
    rho, p, n = openood.rank_correlation([0.9, 0.8, np.nan, 0.6, 0.5], [0.7, 0.6, 0.9, 0.4, 0.3])
    assert rho == pytest.approx(1.0) and n == 4
    assert np.isnan(openood.rank_correlation([1, 2], [1, 2])[0])
    assert "no evidence" in openood.correlation_verdict(0.2, 0.4)
    assert "a negative link" in openood.correlation_verdict(-0.8, 0.001)


# ---- the gpu profile's path, end to end, on tiny CIFAR-format data
@pytest.mark.slow
def test_the_cifar10_benchmark_runs_end_to_end_and_reports_what_it_skipped(tiny_cifar, tmp_path):
    study = yaml.safe_load(config.CONFIG_PATH.read_text())
    study["profiles"] = {"tiny_cifar": {
        "shared": {"dataset": "cifar10", "model": "resnet18_32", "epochs": 1, "batch_size": 32, "lr": 0.01,
                   "n_pool": 20, "attack_suite": {"fgsm": {"n": 20, "eps": 0.3}},
                   "particul": {"epochs": 1, "n_fit": 200, "snapshot_epochs": [1], "train_batch_size": 32},
                   "particul_search": {"layers": ["layer4"], "num_parts": [4], "multi_layer": False}},
        "06_openood": {"openood_methods": ["msp", "ebo", "knn", "vim"], "n_fit": 200, "min_evaluation": 2,
                       "detector_params": {"knn": {"k": 5}, "vim": {"d": 16}},
                       "n_covariate": 20, "n_perturbation": 4}}}
    study["default_profile"] = "tiny_cifar"
    study.pop("sweeps", None)  # they name the real profiles
    cfg = tmp_path / "_config.yml"
    cfg.write_text(yaml.safe_dump(study))
    book = tmp_path / "book"
    book.mkdir()
    records = runner.run("tiny_cifar", only=["06_openood"], book_dir=book, config_path=cfg, log=lambda m: None)
    assert [r.status for r in records] == ["ran"]
    res = paths.results_dir("tiny_cifar", "06_openood")
    ood = pd.read_csv(res / "ood.csv")
    assert list(ood.columns[:7]) == ["detector", "ood_set", "group", "auroc", "fpr95", "aupr_in", "aupr_out"]
    assert set(zip(ood.ood_set, ood.group)) >= {("cifar100", "near"), ("svhn", "far"), ("dtd", "far")}
    assert set(ood.detector) == {"particul", "particul_published", "msp", "ebo", "knn", "vim"}
    skipped = pd.read_csv(res / "skipped.csv")
    assert set(skipped.ood_set) == {"tin", "mnist", "places365"} and skipped.reason.str.len().min() > 20
    cmp = pd.read_csv(res / "published_comparison.csv")
    assert set(cmp.detector) == {"msp", "ebo", "knn", "vim"} and set(cmp.group) == {"near", "far"}
    perturbation = pd.read_csv(res / "perturbation.csv")
    assert list(perturbation.columns[:4]) == ["detector", "perturbation", "spearman", "flagged"]
    assert {"detector", "near_auroc", "far_auroc", "adversarial_auroc"} <= set(pd.read_csv(res / "ood_vs_adv.csv").columns)
