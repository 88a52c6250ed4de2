import numpy as np
import pytest
import torch

from tamperbench import benchmark, data, models
from tamperbench import particul_search as ps
from tamperbench.attacks import AttackRecord
from tamperbench.detectors import DetectorError


@pytest.fixture
def setting(data_root, fake_debian_fmnist):
    trained = models.train_or_load("smallcnn", "fashion_mnist", models.TrainConfig(epochs=2, batch_size=32), "cpu")
    train = data.load("fashion_mnist", "train")
    grid = ps.Grid(trained, train, {"epochs": 1, "train_batch_size": 32}, {"num_parts": [2, 4]}, seed=0, device="cpu")
    return trained, train, grid


def _record(x_clean, x_adv, name="fgsm"):
    n = len(x_clean)
    zeros = np.zeros(n)
    return AttackRecord(name=name, budget={}, x_clean=x_clean, x_adv=x_adv, y_true=np.zeros(n, int),
                        pred_clean=np.zeros(n, int), pred_adv=np.ones(n, int), target=-np.ones(n, int),
                        success=np.ones(n, bool), linf=zeros, l2=zeros, l0=zeros, seconds=1.0, queries=1.0,
                        gradients=1.0, grad_seconds=0.0, key="k")


def test_grid_holds_every_block_and_part_count_and_the_multi_layer_variant(setting):
    trained, _, grid = setting
    assert set(grid.detectors) == {(layer, p) for layer in ("block1", "block2", "block3", "multi") for p in (2, 4)}
    assert len(grid.configs()) == 8 * 3
    x = data.load("fashion_mnist", "test").x[:12]
    conf = grid.confidences(x)
    for config in (ps.Config("block2", 4, "argmax"), ps.Config("multi", 2, "mean")):
        assert np.allclose(conf[config], grid.detector(config).confidence(x, config.mode), atol=1e-6)
    assert ps.published(trained) == ps.Config("block2", 4, "categorical")


def test_selection_uses_only_the_fit_half_and_picks_the_best(setting, monkeypatch):
    trained, _, grid = setting
    test = data.load("fashion_mnist", "test")
    record = _record(test.x[:40].numpy(), data.load("noise_uniform", "test").x[:40].numpy())
    fit_idx, eval_idx = benchmark.split_halves(record, seed=0)
    seen = []
    original = grid.confidences
    monkeypatch.setattr(grid, "confidences", lambda x: seen.append(x.clone()) or original(x))
    chosen, table = ps.select(grid, {"fgsm": record}, seed=0)
    # the rule saw the fit half, nothing of the evaluation half
    assert torch.equal(seen[0], torch.from_numpy(record.x_clean[fit_idx]))
    assert torch.equal(seen[1], torch.from_numpy(record.x_adv[fit_idx]))
    assert not set(fit_idx) & set(eval_idx)
    best = table.auroc.max()
    row = table[table.chosen].iloc[0]
    assert row.auroc == best and (row.layer, row.num_parts, row["mode"]) == (chosen.layer, chosen.num_parts, chosen.mode)
    assert table.chosen.sum() == 1 and table.published.sum() == 1


def test_ties_go_to_the_published_configuration(setting, monkeypatch):
    trained, _, grid = setting
    test = data.load("fashion_mnist", "test")
    record = _record(test.x[:40].numpy(), test.x[40:80].numpy())
    monkeypatch.setattr(grid, "confidences", lambda x: {c: np.full(len(x), 0.5) for c in grid.configs()})
    chosen, _ = ps.select(grid, {"fgsm": record}, seed=0)
    assert chosen == ps.published(trained)


def test_the_ood_reference_leaves_out_the_images_the_rule_saw(setting):
    trained, _, _ = setting
    test = data.load("fashion_mnist", "test")
    from tamperbench import suite

    pool = suite.attack_pool(trained, "fashion_mnist", 30, seed=0, device="cpu")
    record = _record(pool.x.numpy(), pool.x.numpy() * 0.5)
    fit_idx, _ = benchmark.split_halves(record, seed=0)
    ref = ps.id_reference(test, pool, {"fgsm": record}, "fgsm", seed=0)
    assert len(ref) == len(test) - len(fit_idx)
    assert not set(ref.indices) & set(pool.indices[fit_idx])
    assert torch.equal(test.x[pool.indices[fit_idx]], pool.x[fit_idx])  # pool indices point into the test split


def test_bad_search_settings_are_refused(setting):
    trained, train, _ = setting
    with pytest.raises(DetectorError, match="valid keys: layers, num_parts"):
        ps.check_search({"layer": ["block1"]})
    with pytest.raises(DetectorError, match="num_parts must be a list"):
        ps.check_search({"num_parts": 4})
    with pytest.raises(DetectorError, match="selection attack 'pgd' is not in the attack suite"):
        ps.select(ps.Grid(trained, train, {"epochs": 1}, {"num_parts": [2], "selection_attack": "pgd"}, 0, "cpu"), {}, 0)


class _StubParts:
    """Part confidences known in advance: class 0's parts read the image's mean pixel, every
    other class's are ``other``."""

    def __init__(self, other=0.2):
        self.other = other

    def part_confidences(self, x, classes):
        mean = x.flatten(1).mean(1).numpy()
        own = np.where(np.asarray(classes) == 0, mean, self.other)
        return np.stack([own, own], axis=1)


def test_part_survival_reads_the_evaluation_half_and_compares_true_and_predicted_parts():
    n = 40
    level = np.arange(n, dtype=np.float32) / 100  # image i's pixels are all i/100: the mean says which were read
    x_clean = np.broadcast_to(level[:, None, None, None], (n, 1, 4, 4)).copy()
    rec = _record(x_clean, x_clean * 0 + 0.1)  # true class 0, predicted 1 after the attack
    small = _record(x_clean[:3], x_clean[:3], name="pgd")
    table = ps.part_survival(_StubParts(), {"fgsm": rec, "pgd": small}, seed=0, min_n=5, n_boot=200)
    _, ev = benchmark.split_halves(rec, 0)
    assert list(table.attack) == ["fgsm"]  # pgd has fewer than min_n evaluation examples
    row = table.iloc[0]
    assert row.n == len(ev) and row.true_clean == pytest.approx(level[ev].mean())
    assert row.true_adversarial == pytest.approx(0.1) and row.predicted_adversarial == pytest.approx(0.2)
    assert row.true_wins == 0.0 and row.true_wins_high < 0.2  # 0.1 < 0.2 on every image
    assert row.true_clean_low < row.true_clean < row.true_clean_high


def test_part_survival_leaves_ties_out_and_has_its_columns_when_no_attack_qualifies():
    """Saturated confidences (a tie) count for neither class, as in a sign test; an empty result
    still has every column, so a chapter can select them."""
    n = 30
    x = np.full((n, 1, 4, 4), 0.25, dtype=np.float32)  # class 0 reads 0.25 (exact): the same as every other class
    rec = _record(x, x.copy())
    row = ps.part_survival(_StubParts(other=0.25), {"fgsm": rec}, seed=0, min_n=2, n_boot=50).iloc[0]
    assert row.ties == row.n and np.isnan(row.true_wins)
    empty = ps.part_survival(_StubParts(), {"fgsm": rec}, seed=0, min_n=10**6)
    assert empty.empty and {"attack", "true_wins_low", "true_clean_high", "ties"} <= set(empty.columns)
