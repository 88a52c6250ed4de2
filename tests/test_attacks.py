import numpy as np
import pytest
import torch

from tamperbench import attacks, data, models


@pytest.fixture
def victim(data_root, fake_debian_fmnist):
    trained = models.train_or_load("smallcnn", "fashion_mnist", models.TrainConfig(epochs=2, batch_size=32), "cpu")
    test = data.load("fashion_mnist", "test").take(12, 0)
    return trained, test.x.numpy(), test.y.numpy()


def test_unknown_attack_lists_the_valid_ones():
    with pytest.raises(attacks.AttackError, match="valid attacks: fgsm, bim, pgd, deepfool, cw_l2, hopskipjump, boundary, pixel, "
                                                  "apgd_ce, apgd_dlr, autoattack, square"):
        attacks.spec("fsgm")
    assert len(attacks.available()) == 12


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
        "hopskipjump": {"max_iter": 2, "init_eval": 5, "init_size": 20},
        "boundary": {"max_iter": 5, "sample_size": 5, "init_size": 20},
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


@pytest.mark.parametrize("name, budget", [("hopskipjump", {"max_iter": 2, "init_eval": 5, "init_size": 20}),
                                          ("boundary", {"max_iter": 5, "sample_size": 5, "init_size": 20})])
def test_black_box_attacks_are_deterministic_despite_arts_fresh_random_states(victim, name, budget):
    trained, x, y = victim
    atk = attacks.attack(name, trained, seed=5, **budget)
    first, second = atk._run(x[:4], y[:4]), atk._run(x[:4], y[:4])  # uncached, twice
    assert np.array_equal(first["x_adv"], second["x_adv"])
    assert isinstance(np.random.RandomState(), np.random.mtrand.RandomState)  # restored afterwards


# ---------------------------------------------------------------- what the record counts (issue 12)
WHITE_BOX_TINY = {
    "fgsm": {"eps": 0.1},
    "bim": {"eps": 0.2, "eps_step": 0.05, "max_iter": 4},
    "pgd": {"eps": 0.2, "eps_step": 0.05, "max_iter": 3, "num_random_init": 2},
    "deepfool": {"max_iter": 4},
    "cw_l2": {"binary_search_steps": 2, "max_iter": 3},
    "apgd_ce": {"eps": 0.2, "max_iter": 4, "nb_random_init": 2},
    "apgd_dlr": {"eps": 0.2, "max_iter": 4},
    "autoattack": {"eps": 0.05, "max_iter": 3, "square_queries": 10},
}


#: attacks whose ART code has no early stop: every image pays every step, fooled or not.
#: FGSM: one loss gradient; BIM/PGD (projected_gradient_descent_pytorch.py) run max_iter steps per
#: restart; Carlini-Wagner L2 (carlini.py) takes two class gradients per step of every image whose
#: constant stays below 1e11 and whose learning rate stays positive, i.e. all of them
NO_EARLY_STOP = {"fgsm", "bim", "pgd", "cw_l2"}


@pytest.mark.parametrize("name", sorted(WHITE_BOX_TINY))
def test_counted_gradients_never_exceed_the_bound(victim, name):
    trained, x, y = victim
    assert set(WHITE_BOX_TINY) == {n for n, s in attacks.ATTACKS.items() if s.box == "white"}
    atk = attacks.attack(name, trained, **WHITE_BOX_TINY[name])
    rec = atk.generate(x[:6], y[:6])
    assert rec.gradient_bound == atk.gradient_bound
    if name in NO_EARLY_STOP:  # the bound is reached: one set too high would fail here
        assert rec.gradients == rec.gradient_bound
    else:  # DeepFool stops a batch once all its images are fooled, APGD skips fooled images
        assert 1 <= rec.gradients <= rec.gradient_bound


@pytest.mark.parametrize("name, loss", [("apgd_ce", "cross_entropy"), ("apgd_dlr", "difference_logits_ratio")])
def test_apgd_through_the_registry_matches_art(victim, name, loss):
    """The registry's APGD is ART's, with the same loss, step and seed; only the counting differs."""
    from art.attacks.evasion import AutoProjectedGradientDescent

    trained, x, y = victim
    budget = {"eps": 0.15, "max_iter": 6, "nb_random_init": 1}
    rec = attacks.attack(name, trained, seed=3, batch_size=8, **budget).generate(x[:8], y[:8])
    clf = attacks.wrap(trained.model, (1, 28, 28), 10, "cpu")
    art = AutoProjectedGradientDescent(clf, norm=np.inf, eps=0.15, eps_step=0.15, max_iter=6, nb_random_init=1,
                                       batch_size=8, loss_type=loss, verbose=False)
    with attacks.contained_random_states(3):
        x_art = art.generate(x[:8].astype(np.float32), y=np.eye(10, dtype=np.float32)[y[:8]])
    assert np.allclose(rec.x_adv, x_art, atol=1e-6)
    assert 1 <= rec.gradients <= rec.gradient_bound == 6  # counted through ART's own loss


class KeyedModel(torch.nn.Module):
    """A victim no attack can fool, on 1×8×8 inputs with 4 classes.

    Pixel 0 (the key) picks the logits by its quarter of [0, 1] through a step, which has no
    gradient: class ``b`` first, then ``b + 1``, … (mod 4), one logit apart. The other 63 pixels
    add a linear term of at most 0.32 per class, which gives every attack a gradient but can never reorder the
    classes. A key at a quarter's centre stays in it under every ε ≤ 0.1 perturbation, and the
    unbounded attacks (DeepFool, Carlini-Wagner) only move along the gradient, never the key:
    every attack spends its whole budget on every image.
    """

    def __init__(self):
        super().__init__()
        ranks = (np.arange(4)[None, :] - np.arange(4)[:, None]) % 4  # row b: class b has rank 0
        self.register_buffer("table", torch.as_tensor(4.0 - ranks, dtype=torch.float32))
        self.register_buffer("w", torch.as_tensor(np.random.default_rng(0).uniform(-1, 1, (63, 4)), dtype=torch.float32))

    def forward(self, x):
        flat = x.flatten(1)
        quarter = (flat[:, 0] * 4).floor().clamp(0, 3).long()
        return self.table[quarter] + 0.005 * flat[:, 1:] @ self.w


KEYED_SHAPE = (1, 8, 8)  # Square's first tiles (80 % of the pixels) must be smaller than the image


def keyed_inputs(quarters):
    """Images whose key lies at the centre of the given quarters; the other pixels random."""
    x = np.random.default_rng(1).random((len(quarters), *KEYED_SHAPE)).astype(np.float32)
    x[:, 0, 0, 0] = 0.125 + 0.25 * np.asarray(quarters)
    return x, np.asarray(quarters, dtype=np.int64)


@pytest.fixture
def art_gradient_calls(monkeypatch):
    """Every gradient ART's attacks ask the classifier for, seen where ART asks (the estimator's
    ``class_gradient`` and ``loss_gradient``) and counted from what they return, apart from the
    classifier's own counter: one entry (images, classes, label) per call."""
    calls = []
    real_wrap = attacks.wrap

    def wrap(*args, **kwargs):
        clf = real_wrap(*args, **kwargs)
        class_gradient, loss_gradient = clf.class_gradient, clf.loss_gradient

        def spy_class_gradient(x, label=None, *a, **kw):
            out = class_gradient(x, label, *a, **kw)  # (images, classes differentiated, *input)
            calls.append((out.shape[0], out.shape[1], label))
            return out

        def spy_loss_gradient(x, y, *a, **kw):
            out = loss_gradient(x, y, *a, **kw)  # (images, *input): one gradient per image
            calls.append((out.shape[0], 1, None))
            return out

        clf.class_gradient, clf.loss_gradient = spy_class_gradient, spy_loss_gradient
        return clf

    monkeypatch.setattr(attacks, "wrap", wrap)
    return calls


WHITE_BOX_FULL = {  # budgets small enough for a test; the keyed victim makes each one spent in full
    "fgsm": {"eps": 0.1},
    "bim": {"eps": 0.1, "eps_step": 0.05, "max_iter": 3},
    "pgd": {"eps": 0.1, "eps_step": 0.05, "max_iter": 3, "num_random_init": 2},
    "deepfool": {"max_iter": 3},
    "cw_l2": {"binary_search_steps": 2, "max_iter": 3},
    "apgd_ce": {"eps": 0.1, "max_iter": 4, "nb_random_init": 2},
    "apgd_dlr": {"eps": 0.1, "max_iter": 4},
    "autoattack": {"eps": 0.05, "max_iter": 3, "square_queries": 5},
}


@pytest.mark.parametrize("name", sorted(WHITE_BOX_FULL))
def test_the_bounds_follow_what_art_calls(art_gradient_calls, name):
    """The bound formula against an independent count of ART's gradient calls, on a victim that
    resists every attack, so that ART runs every step it can."""
    assert set(WHITE_BOX_FULL) == {n for n, s in attacks.ATTACKS.items() if s.box == "white"}
    x, y = keyed_inputs([0, 1, 2, 3, 0, 2])
    atk = attacks.attack(name, KeyedModel(), input_shape=KEYED_SHAPE, nb_classes=4, batch_size=4, device="cpu",
                         **WHITE_BOX_FULL[name])
    run = atk._run(x, y)
    assert not run["success"].any()  # the victim resisted: no attack stopped early on success
    art_counted = sum(images * classes for images, classes, _ in art_gradient_calls) / len(x)
    assert art_counted == attacks.spec(name).gradient_bound(atk.budget, 4) == run["gradient_bound"]
    assert run["gradients"] == art_counted  # the record's counter agrees with ART's calls


def test_a_bound_set_too_high_is_caught(data_root, monkeypatch):
    """A Carlini-Wagner bound twice what ART calls: the record still counts ART's calls, and
    chapter 2's budget table flags the row (CW never stops early, so it must reach its bound)."""
    import dataclasses

    from tamperbench import suite

    x, y = keyed_inputs([0, 1, 2])
    budget = {"binary_search_steps": 2, "max_iter": 3}
    honest = attacks.attack("cw_l2", KeyedModel(), input_shape=KEYED_SHAPE, nb_classes=4, device="cpu", **budget).generate(x, y)
    assert honest.gradients == honest.gradient_bound == 2 * 2 * 3
    assert suite.budget_checks({"cw_l2": honest}, 4).iloc[0].spent_as_configured
    doubled = dataclasses.replace(attacks.ATTACKS["cw_l2"], gradient_bound=lambda b, k: 4 * b["binary_search_steps"] * b["max_iter"])
    monkeypatch.setitem(attacks.ATTACKS, "cw_l2", doubled)
    loose = attacks.attack("cw_l2", KeyedModel(), input_shape=KEYED_SHAPE, nb_classes=4, device="cpu", seed=1, **budget).generate(x, y)
    row = suite.budget_checks({"cw_l2": loose}, 4).iloc[0]
    assert loose.gradients == honest.gradients and not row.spent_as_configured and "below the bound 24" in row.problems


def test_deepfool_with_every_class_reaches_its_bound_when_an_image_resists(victim):
    trained, x, y = victim
    rec = attacks.attack("deepfool", trained, max_iter=1, epsilon=0.0).generate(x[:6], y[:6])
    # one step rarely fools every image, so the batch pays the before-loop and one-step gradients
    assert rec.gradients == rec.gradient_bound == 2 * 10


def test_boundary_records_the_iterations_it_ran_and_spends_its_budget(victim):
    trained, x, y = victim
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec = attacks.attack("boundary", trained, max_iter=8, num_trial=25, sample_size=5).generate(x[:4], y[:4])
    assert rec.iterations.shape == (4,) and rec.iterations.dtype == np.int64
    started = rec.success  # an image with no adversarial start returns unchanged, after 0 iterations
    assert started.sum() >= 2
    # ART may give up on an image when its step sizes collapse (a float-level event): then, and
    # only then, fewer than 8 iterations are recorded, and the attack says so
    import re

    said = [re.search(r"gave up before max_iter=8 on (\d+) of", str(w.message)) for w in caught
            if issubclass(w.category, attacks.AttackWarning)]
    said_short = sum(int(m.group(1)) for m in said if m)
    short = (rec.iterations[started] < 8)
    assert (rec.iterations[started] >= 1).all() and (rec.iterations[started] <= 8).all()
    assert int(short.sum()) == said_short  # every image short of its budget is named by the warning, and only those
    assert (rec.iterations[~started] == 0).all()
    other = attacks.attack("fgsm", trained, eps=0.1).generate(x[:4], y[:4])
    assert (other.iterations == -1).all()


def test_boundary_counts_an_early_stop_and_warns(victim, monkeypatch):
    import art.attacks.evasion.boundary as boundary_module

    trained, x, y = victim
    calls = {"n": 0}
    real = boundary_module.BoundaryAttack._attack

    def fail_after_three(self, *args, **kwargs):  # ART's step-size search giving up at iteration 4
        calls["n"] += 1
        self.max_iter, full = 3, self.max_iter
        try:
            return real(self, *args, **kwargs)
        finally:
            self.max_iter = full

    monkeypatch.setattr(boundary_module.BoundaryAttack, "_attack", fail_after_three)
    atk = attacks.attack("boundary", trained, max_iter=6, sample_size=5, init_size=20)
    with pytest.warns(attacks.AttackWarning, match="gave up before max_iter=6 on 3 of 3 images"):
        rec = atk._run(x[:3], y[:3])
    assert calls["n"] == 3 and (rec["iterations"] == 3).all()


def test_square_counts_distinct_queries_in_the_papers_unit(victim):
    trained, x, y = victim
    rec = attacks.attack("square", trained, eps=0.05, max_iter=10).generate(x[:6], y[:6])
    # the clean image, the stripe start and at most one new candidate per iteration; ART's own
    # count re-predicts the whole batch at every iteration
    assert 2 <= rec.queries <= 10 + 2
    assert rec.art_queries > rec.queries


def test_square_l2_is_repeatable_although_it_draws_from_pythons_random(victim):
    import random

    trained, x, y = victim
    atk = attacks.attack("square", trained, norm="2", eps=1.0, max_iter=10, seed=2)
    random.seed(1)
    first = atk._run(x[:4], y[:4])
    random.seed(99)
    second = atk._run(x[:4], y[:4])
    assert np.array_equal(first["x_adv"], second["x_adv"])


@pytest.mark.parametrize("name, budget", [("square", {"norm": "2", "eps": 1.0, "max_iter": 5}),
                                          ("pgd", {"eps": 0.1, "eps_step": 0.05, "max_iter": 2}),
                                          ("boundary", {"max_iter": 3, "sample_size": 5, "init_size": 20})])
def test_an_attack_leaves_the_global_random_states_as_it_found_them(victim, name, budget):
    import random

    import torch

    trained, x, y = victim
    random.seed(123), np.random.seed(123), torch.manual_seed(123)
    before = random.getstate(), np.random.get_state(), torch.get_rng_state()
    attacks.attack(name, trained, seed=7, **budget)._run(x[:3], y[:3])
    after = random.getstate(), np.random.get_state(), torch.get_rng_state()
    assert before[0] == after[0]
    assert all(np.array_equal(a, b) for a, b in zip(before[1][1:], after[1][1:]))
    assert torch.equal(before[2], after[2])


@pytest.mark.parametrize("key", ["max_halving", "max_doubling"])
def test_cw_line_search_needs_one_step_each_way(key):
    with pytest.raises(attacks.AttackError, match=f"{key}=0 is invalid; it must be ≥ 1"):
        attacks.resolve_budget("cw_l2", {key: 0}, input_dim=784)


def test_values_that_cannot_bind_are_flagged(victim):
    trained, _, _ = victim
    with pytest.warns(attacks.AttackWarning, match="nb_grads=10 cannot bind"):
        attacks.attack("deepfool", trained, nb_grads=10)
    with pytest.warns(attacks.AttackWarning, match="max_eval=500 cannot bind.*peaks at 31"):
        attacks.attack("hopskipjump", trained, max_iter=10, init_eval=10, max_eval=500)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", attacks.AttackWarning)
        attacks.attack("hopskipjump", trained, max_iter=10, init_eval=10, max_eval=20)  # binds from t = 3
        attacks.attack("hopskipjump", trained, max_iter=10, init_eval=10)  # null: no cap, nothing to flag
        attacks.attack("deepfool", trained)
    with pytest.raises(attacks.AttackError, match="init_eval=30 must not exceed max_eval=20"):
        attacks.resolve_budget("hopskipjump", {"init_eval": 30, "max_eval": 20}, 784)


@pytest.mark.parametrize("quarters, union", [([0, 1, 2, 3], [0, 1, 2, 3]), ([0, 1, 1, 0], [0, 1])])
def test_deepfool_follows_arts_whole_input_class_union(art_gradient_calls, data_root, quarters, union):
    """ART unions the images' top nb_grads classes over the whole input, not per batch: with
    batches of 2 and top-1 classes [0, 1 | 2, 3], no batch covers every class but the input
    does, and ART differentiates all 4 classes in every batch; nb_grads does not bind then, and
    only then, the run warns. The bound is (max_iter + 1) · |union|, reached on this victim."""
    import warnings

    x, y = keyed_inputs(quarters)
    atk = attacks.attack("deepfool", KeyedModel(), input_shape=KEYED_SHAPE, nb_classes=4, batch_size=2, device="cpu",
                         max_iter=2, nb_grads=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec = atk.generate(x, y)
    said = [str(w.message) for w in caught if issubclass(w.category, attacks.AttackWarning)]
    covers_all = len(union) == 4
    assert len(said) == covers_all and rec.warnings == said
    if covers_all:
        assert "nb_grads=1 does not bind here" in said[0] and "whole input" in said[0]
    # ART's calls: one class at a time, each a class of the whole-input union, in every batch
    assert sorted({label for _, _, label in art_gradient_calls}) == union
    assert list(attacks.deepfool_classes(np.asarray(KeyedModel()(torch.from_numpy(x)).detach()), 1, 4)) == union
    art_counted = sum(images * classes for images, classes, _ in art_gradient_calls) / len(x)
    assert rec.gradients == art_counted == rec.gradient_bound == (2 + 1) * len(union)
    cached = atk.generate(x, y)  # the warning survives the cache, for chapter 2's budget table
    assert cached.warnings == rec.warnings and cached.gradient_bound == rec.gradient_bound


def test_l0_ignores_changes_below_half_a_grey_level():
    x = np.zeros((1, 1, 4, 4), np.float32)
    adv = x.copy()
    adv[0, 0, 0, 0], adv[0, 0, 1, 1], adv[0, 0, 2, 2] = 1e-4, 1.9 / 255, 0.5
    assert attacks.perturbation_norms(x, adv)[2][0] == 2


def test_budget_checks_flag_what_was_not_spent(victim):
    from tamperbench import suite

    trained, x, y = victim
    records = {
        "fgsm": attacks.attack("fgsm", trained, eps=0.1).generate(x[:4], y[:4]),
        "hopskipjump": attacks.attack("hopskipjump", trained, max_iter=2, init_eval=5, init_size=20).generate(x[:4], y[:4]),
    }
    checks = suite.budget_checks(records, 10).set_index("attack")
    assert checks.loc["fgsm", "within_bound"] and checks.loc["fgsm", "spent_as_configured"]
    assert checks.loc["hopskipjump", "unit"] == "distinct queries"
    hsj = records["hopskipjump"]
    hsj.budget = dict(hsj.budget, max_eval=500)  # as if configured with a cap it never reaches
    flagged = suite.budget_checks({"hopskipjump": hsj}, 10).iloc[0]
    assert not flagged.spent_as_configured and "max_eval=500 cannot bind" in flagged.problems


def test_budget_checks_show_the_records_warnings(victim):
    """A warning the record carries (DeepFool's whole-input class union) reaches chapter 2's
    budget table: the row is not 'spent as configured' and names the problem."""
    from tamperbench import suite

    trained, x, y = victim
    rec = attacks.attack("fgsm", trained, eps=0.1).generate(x[:4], y[:4])
    rec.warnings = ["deepfool: nb_grads=1 does not bind here: ..."]
    row = suite.budget_checks({"fgsm": rec}, 10).iloc[0]
    assert not row.spent_as_configured and "nb_grads=1 does not bind here" in row.problems
