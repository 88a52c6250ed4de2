import numpy as np
import pytest

from tamperbench import attacks, data, models


@pytest.fixture
def victim(data_root, fake_debian_fmnist):
    trained = models.train_or_load("smallcnn", "fashion_mnist", models.TrainConfig(epochs=2, batch_size=32), "cpu")
    test = data.load("fashion_mnist", "test").take(12, 0)
    return trained, test.x.numpy(), test.y.numpy()


def test_unknown_attack_lists_the_nine():
    with pytest.raises(attacks.AttackError, match="valid attacks: fgsm, bim, pgd, deepfool, cw_l2, hopskipjump, boundary, pixel, square"):
        attacks.spec("fsgm")
    assert len(attacks.available()) == 9


@pytest.mark.parametrize(
    "name, budget, message",
    [
        ("fgsm", {"eps": 1.5}, r"eps=1.5 is outside \[0, 1\]"),
        ("fgsm", {"eps": -0.1}, r"outside \[0, 1\]"),
        ("pgd", {"eps": 0.1, "max_iter": -3}, "max_iter=-3 is invalid; it must be ≥ 1"),
        ("pgd", {"norm": "1"}, "norm='1' is invalid; it must be one of: inf, 2"),
        ("bim", {"eps": 0.1, "eps_step": 0.2}, "eps_step=0.2 must not exceed eps=0.1"),
        ("bim", {"max_iter": 2.5}, "max_iter must be int"),
        ("deepfool", {"eps": 0.1}, "unknown budget parameter 'eps' for deepfool; valid parameters: max_iter, epsilon, nb_grads"),
        ("hopskipjump", {"max_eval": 0}, "max_eval=0 is invalid"),
    ],
)
def test_bad_budgets_are_refused_before_anything_runs(name, budget, message):
    with pytest.raises(attacks.AttackError, match=message):
        attacks.resolve_budget(name, budget, input_dim=784)


def test_l2_eps_may_exceed_one_but_not_the_diagonal():
    assert attacks.resolve_budget("pgd", {"norm": 2, "eps": 2.0, "eps_step": 0.5}, 784)["eps"] == 2.0
    with pytest.raises(attacks.AttackError, match="outside"):
        attacks.resolve_budget("pgd", {"norm": 2, "eps": 29.0}, 784)


def test_bad_inputs_are_refused_and_nothing_is_cached(victim, data_root):
    trained, x, y = victim
    atk = attacks.attack("fgsm", trained, eps=0.1)
    with pytest.raises(attacks.AttackError, match="float32"):
        atk.generate(x.astype(np.float64), y)
    with pytest.raises(attacks.AttackError, match=r"shape \(N, 1, 28, 28\)"):
        atk.generate(x[:, :, :20], y)
    with pytest.raises(attacks.AttackError, match="clip range"):
        atk.generate(x * 3, y)
    with pytest.raises(attacks.AttackError, match="integer numpy array"):
        atk.generate(x, y[:-1])
    with pytest.raises(attacks.AttackError, match="no targeted version"):
        attacks.attack("deepfool", trained, targeted=True)
    assert not (data_root / "artifacts" / "attack").exists()


def test_records_are_cached_and_deterministic(victim, data_root):
    trained, x, y = victim
    first = attacks.attack("pgd", trained, eps=0.2, eps_step=0.05, max_iter=5, seed=3).generate(x, y)
    path = next((data_root / "artifacts" / "attack").glob("*.npz"))
    mtime = path.stat().st_mtime_ns
    again = attacks.attack("pgd", trained, eps=0.2, eps_step=0.05, max_iter=5, seed=3).generate(x, y)
    assert path.stat().st_mtime_ns == mtime  # a hit: nothing rewritten
    assert np.array_equal(first.x_adv, again.x_adv)
    path.unlink()  # recompute from scratch: the same seed gives identical arrays
    fresh = attacks.attack("pgd", trained, eps=0.2, eps_step=0.05, max_iter=5, seed=3).generate(x, y)
    assert np.array_equal(first.x_adv, fresh.x_adv)
    other = attacks.attack("pgd", trained, eps=0.2, eps_step=0.05, max_iter=5, seed=4).generate(x, y)
    assert not np.array_equal(first.x_adv, other.x_adv)  # random start follows the seed
    assert len(list((data_root / "artifacts" / "attack").glob("*.npz"))) == 2


def test_record_fields_are_consistent(victim):
    trained, x, y = victim
    rec = attacks.attack("fgsm", trained, eps=0.3).generate(x, y)
    assert rec.x_adv.dtype == np.float32 and rec.x_adv.min() >= 0 and rec.x_adv.max() <= 1
    assert np.allclose(rec.linf[rec.linf > 0], 0.3, atol=1e-5)  # FGSM moves every pixel by eps
    d = (rec.x_adv - rec.x_clean).reshape(len(x), -1)
    assert np.allclose(rec.l2, np.linalg.norm(d, axis=1), rtol=1e-5)
    assert np.array_equal(rec.success, (rec.pred_clean == y) & (rec.pred_adv != y))
    assert rec.gradients == 1 and rec.success_rate > 0
    assert rec.grad_seconds > 0 and rec.cost_ratio > 0


@pytest.mark.parametrize("name", ["bim", "deepfool", "cw_l2", "hopskipjump", "boundary", "pixel", "square"])
def test_every_attack_runs_with_a_tiny_budget(victim, name):
    trained, x, y = victim
    tiny = {
        "bim": {"eps": 0.2, "eps_step": 0.05, "max_iter": 5},
        "deepfool": {"max_iter": 5, "nb_grads": 3},
        "cw_l2": {"binary_search_steps": 2, "max_iter": 5},
        "hopskipjump": {"max_iter": 2, "max_eval": 50, "init_eval": 5, "init_size": 20},
        "boundary": {"max_iter": 5, "num_trial": 5, "sample_size": 5, "init_size": 20},
        "pixel": {"max_iter": 2},
        "square": {"eps": 0.2, "max_iter": 10},
    }[name]
    rec = attacks.attack(name, trained, **tiny).generate(x[:4], y[:4])
    assert rec.x_adv.shape == x[:4].shape and rec.seconds > 0
    if attacks.spec(name).box == "black":
        assert rec.queries > 1 and rec.gradients == 0
    else:
        assert rec.gradients >= 1


def test_targeted_attacks_aim_at_other_classes(victim):
    trained, x, y = victim
    rec = attacks.attack("pgd", trained, targeted=True, eps=0.5, eps_step=0.05, max_iter=20).generate(x, y)
    assert (rec.target != y).all() and (rec.target >= 0).all()
    assert np.array_equal(rec.success, (rec.pred_clean == y) & (rec.pred_adv == rec.target))


def test_fast_per_sample_class_gradient_matches_art(victim):
    trained, x, y = victim
    clf = attacks.wrap(trained.model, (1, 28, 28), 10, "cpu")
    labels = np.arange(len(x)) % 10
    fast = clf.class_gradient(x, label=labels)
    slow = super(type(clf), clf).class_gradient(x, label=labels)
    assert fast.shape == slow.shape == (len(x), 1, 1, 28, 28)
    assert np.allclose(fast, slow, atol=1e-6)


@pytest.mark.parametrize("name, budget", [("hopskipjump", {"max_iter": 2, "max_eval": 50, "init_eval": 5, "init_size": 20}),
                                          ("boundary", {"max_iter": 5, "num_trial": 5, "sample_size": 5, "init_size": 20})])
def test_black_box_attacks_are_deterministic_despite_arts_fresh_random_states(victim, name, budget):
    trained, x, y = victim
    atk = attacks.attack(name, trained, seed=5, **budget)
    first, second = atk._run(x[:4], y[:4]), atk._run(x[:4], y[:4])  # uncached, twice
    assert np.array_equal(first["x_adv"], second["x_adv"])
    assert isinstance(np.random.RandomState(), np.random.mtrand.RandomState)  # restored afterwards
