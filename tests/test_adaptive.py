import numpy as np
import pytest
import torch
import torch.nn as nn

from tamperbench import adaptive


def _toy(seed: int = 0, size: int = 4):
    """A linear 3-class classifier on 2×size×size images, and a detector that scores the mean of the
    first channel: an attack that brightens channel 0 is caught unless it adapts."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * size * size, 3))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(3, 2 * size * size))
        model[1].bias.zero_()
    score = lambda x: x[:, 0].mean((1, 2)) - x[:, 1].mean((1, 2))  # noqa: E731
    x = torch.rand(64, 2, size, size, generator=torch.Generator().manual_seed(seed))
    y = model(x).argmax(1)  # the classifier is right on its own labels
    return model, score, x, y


def test_orthogonal_gradients_are_orthogonal_to_each_other():
    model, score, x, y = _toy()
    g_c, g_d, _, _ = adaptive._gradients(model, score, x, y)
    for a, b in ((adaptive.orthogonal_to(g_c, g_d), g_d), (adaptive.orthogonal_to(g_d, g_c), g_c)):
        dots = (a.flatten(1) * b.flatten(1)).sum(1)
        assert torch.allclose(dots, torch.zeros_like(dots), atol=1e-5)
        assert a.flatten(1).norm(dim=1).min() > 0  # not trivially zero


@pytest.mark.parametrize("mode", ["selective", "orthogonal"])
def test_an_adaptive_attack_lowers_the_score_below_plain_pgd(mode):
    model, score, x, y = _toy()
    eps = 0.3
    plain = adaptive.detector_aware_pgd(model, lambda v: torch.zeros(len(v)) + 0 * v.sum((1, 2, 3)), x, y, eps,
                                        steps=40, mode="selective")  # a detector-blind PGD
    aware = adaptive.detector_aware_pgd(model, score, x, y, eps, steps=40, mode=mode)
    both = plain.misclassified & aware.misclassified
    assert both.sum() > 20
    assert float(score(aware.x_adv)[both].mean()) < float(score(plain.x_adv)[both].mean()) - 0.05
    # every kept input stays in the ε-ball and the image range
    assert float((aware.x_adv - x).abs().max()) <= eps + 1e-6
    assert 0 <= float(aware.x_adv.min()) and float(aware.x_adv.max()) <= 1


def test_the_composite_model_rejects_exactly_when_the_score_exceeds_tau():
    model, score, x, _ = _toy()
    s = score(x)
    tau = float(s.median())
    composite = adaptive.Composite(model, score, tau, beta=3.0)
    with torch.no_grad():
        rejected = composite(x).argmax(1) == 3
    assert torch.equal(rejected, s > tau)
    assert rejected.any() and (~rejected).any()
    with pytest.raises(adaptive.AdaptiveError, match="beta must be > 0"):
        adaptive.Composite(model, score, tau, beta=0.0)


def test_threshold_at_fpr_flags_at_most_that_share_of_clean_scores():
    clean = np.random.default_rng(0).normal(size=1000)
    for fpr in (0.01, 0.05, 0.2):
        tau = adaptive.threshold_at_fpr(clean, fpr)
        assert (clean > tau).mean() <= fpr
        assert (clean >= tau).mean() > fpr - 0.002  # and not far below it
    with pytest.raises(adaptive.AdaptiveError, match=r"fpr must be in \(0, 1\)"):
        adaptive.threshold_at_fpr(clean, 5)


def test_metrics_and_the_worst_case_over_attacks():
    correct_clean = np.array([1, 1, 1, 1, 0], bool)
    accepted_clean = np.array([1, 1, 1, 0, 1], bool)
    correct_adv = np.array([0, 0, 1, 0, 0], bool)
    accepted_adv = np.array([1, 0, 1, 1, 1], bool)
    m = adaptive.adaptive_metrics(correct_clean, accepted_clean, correct_adv, accepted_adv)
    assert m["tpr"] == pytest.approx(1 / 4)  # of the four fooled inputs, one is rejected
    assert m["attack_success_rate"] == pytest.approx(1 / 3)  # eligible: inputs 0–2; input 0 is broken
    assert m["robust_accuracy_with_detection"] == pytest.approx(2 / 5)  # input 1 rejected, input 2 correct
    # a second attack breaks input 2: the worst case keeps it broken
    worst = adaptive.worst_case([(correct_adv, accepted_adv), (np.array([1, 1, 0, 1, 1], bool), np.ones(5, bool))])
    assert adaptive.adaptive_metrics(correct_clean, accepted_clean, *worst)["robust_accuracy_with_detection"] == pytest.approx(1 / 5)


def test_eps50_interpolates_where_robustness_halves():
    assert adaptive.eps_at_half([0.1, 0.2, 0.3], [0.8, 0.4, 0.1], clean_robust=1.0) == pytest.approx(0.175)  # 0.8 → 0.4 between 0.1 and 0.2
    assert np.isnan(adaptive.eps_at_half([0.1, 0.2], [0.9, 0.8], clean_robust=1.0))


def test_bad_settings_name_the_valid_choices():
    model, score, x, y = _toy()
    with pytest.raises(adaptive.AdaptiveError, match="unknown mode 'greedy'; valid modes: naive, selective, orthogonal"):
        adaptive.detector_aware_pgd(model, score, x, y, 0.1, mode="greedy")
    with pytest.raises(adaptive.AdaptiveError, match="eps must be in"):
        adaptive.detector_aware_pgd(model, score, x, y, 1.5)


def test_the_gradient_free_check_finds_inputs_that_are_misclassified_and_accepted():
    model, score, x, y = _toy(size=16)  # Square's patches need room
    tau = float(score(x).quantile(0.95))
    x_adv, wrong, accepted = adaptive.gradient_free_check(model, score, tau, x.numpy(), y.numpy(), eps=0.3, max_iter=60)
    assert x_adv.shape == x.shape and np.abs(x_adv - x.numpy()).max() <= 0.3 + 1e-6
    assert (wrong & accepted).mean() > 0.3  # the toy detector does not resist a query attack
    with torch.no_grad():
        assert np.array_equal(accepted, score(torch.as_tensor(x_adv)).numpy() <= tau)


def test_the_soft_subset_scan_ranks_images_as_the_scan_does(data_root, fake_debian_fmnist):
    from scipy.stats import spearmanr

    from tamperbench import data, models
    from tamperbench.detectors import detector

    trained = models.train_or_load("smallcnn", "fashion_mnist", models.TrainConfig(epochs=1, batch_size=32), "cpu")
    train, test = data.load("fashion_mnist", "train"), data.load("fashion_mnist", "test")
    scan = detector("subset_scan", device="cpu", n_background=200).fit(trained, train)
    x = test.x[:40].clone()
    x[20:] = (x[20:] + 0.3 * torch.rand(20, 1, 28, 28, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    soft = adaptive.SoftSubsetScan(scan)
    surrogate = soft(x)
    assert spearmanr(surrogate.detach().numpy(), scan.score(x)).statistic > 0.8
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(soft(xr).sum(), xr)
    assert torch.isfinite(grad).all() and float(grad.abs().sum()) > 0


def test_bpda_squeezing_keeps_the_score_and_passes_a_gradient(data_root, fake_debian_fmnist):
    from tamperbench import data, models
    from tamperbench.detectors import detector

    trained = models.train_or_load("smallcnn", "fashion_mnist", models.TrainConfig(epochs=1, batch_size=32), "cpu")
    train, test = data.load("fashion_mnist", "train"), data.load("fashion_mnist", "test")
    squeeze = detector("feature_squeezing", device="cpu", bit_depth=1, median_window=2).fit(trained, train)
    surrogate = adaptive.attack_score(squeeze)
    x = test.x[:12].clone().requires_grad_(True)
    s = surrogate(x)
    assert np.allclose(s.detach().numpy(), squeeze.score(test.x[:12]), atol=1e-5)
    (grad,) = torch.autograd.grad(s.sum(), x)
    assert torch.isfinite(grad).all() and float(grad.abs().sum()) > 0
    fitted_on = trained

    class Opaque:  # a detector with neither a gradient nor a surrogate
        name, device, trained = "opaque", "cpu", fitted_on

        def torch_score(self, x):
            from tamperbench.detectors.base import DetectorError

            raise DetectorError("opaque has no differentiable score")

    with pytest.raises(adaptive.AdaptiveError, match="opaque: no gradient and no surrogate.*gradient_free_check"):
        adaptive.attack_score(Opaque())


def test_the_feature_response_surrogate_keeps_the_score_and_tracks_its_entropy(data_root, fake_debian_fmnist):
    from scipy.stats import spearmanr

    from tamperbench import data, models
    from tamperbench.detectors import detector

    trained = models.train_or_load("smallcnn", "fashion_mnist", models.TrainConfig(epochs=1, batch_size=32), "cpu")
    train, test = data.load("fashion_mnist", "train"), data.load("fashion_mnist", "test")
    response = detector("feature_response", device="cpu").fit(trained, train)
    surrogate = adaptive.attack_score(response)
    x = test.x[:30].clone()
    x[15:] = (x[15:] + 0.2 * torch.randn(15, 1, 28, 28, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    xr = x.clone().requires_grad_(True)
    s = surrogate(xr)
    assert np.allclose(s.detach().numpy(), response.score(x), atol=1e-6)  # the value is the detector's own score
    (grad,) = torch.autograd.grad(s.sum(), xr)
    assert torch.isfinite(grad).all() and float(grad.abs().sum()) > 0  # double backprop through the smooth response
    soft = surrogate.soft_entropy(x).detach().numpy()
    assert spearmanr(soft, response.score(x)).statistic > 0.6


def test_composite_apgd_seeks_misclassified_and_accepted_inputs():
    model, score, x, y = _toy(size=8)
    tau = float(score(x).quantile(0.5))
    x_adv = torch.as_tensor(adaptive.composite_apgd(model, score, tau, x, y, eps=0.3, steps=30))
    with torch.no_grad():
        wrong, accepted = model(x_adv).argmax(1) != y, score(x_adv) <= tau
    assert float((x_adv - x).abs().max()) <= 0.3 + 1e-6
    assert float((wrong & accepted).float().mean()) > 0.5


def _broken(model, score, tau, x_adv, y):
    x_adv = torch.as_tensor(x_adv)
    with torch.no_grad():
        return ((model(x_adv).argmax(1) != y) & (score(x_adv) <= tau)).numpy()


def test_more_targets_and_restarts_only_break_more_inputs():
    model, score, x, y = _toy(size=8)
    tau = float(score(x).quantile(0.1))  # a strict detector and few steps: one target or start leaves inputs robust
    one = _broken(model, score, tau, adaptive.composite_apgd(model, score, tau, x, y, eps=0.1, steps=3, targets=1), y)
    two = _broken(model, score, tau, adaptive.composite_apgd(model, score, tau, x, y, eps=0.1, steps=3, targets=2), y)
    assert not (one & ~two).any() and two.sum() > one.sum()  # the second target breaks more, never fewer
    pgd1 = _broken(model, score, tau, adaptive.run_attack("selective", model, score, tau, x, y, 0.1, 3, 0), y)
    pgd2 = _broken(model, score, tau, adaptive.run_attack("selective", model, score, tau, x, y, 0.1, 3, 0, restarts=3), y)
    assert not (pgd1 & ~pgd2).any() and pgd2.sum() > pgd1.sum()
    with pytest.raises(adaptive.AdaptiveError, match=r"targets must be an int in \[1, 2\]"):
        adaptive.composite_apgd(model, score, tau, x, y, eps=0.1, targets=3)
    with pytest.raises(adaptive.AdaptiveError, match="restarts must be an int"):
        adaptive.run_attack("selective", model, score, tau, x, y, 0.1, 3, 0, restarts=0)


def test_the_convergence_check_attacks_only_robust_inputs_and_never_raises_robustness(data_root):
    model, score, x, y = _toy(size=8)
    tau = float(score(x).quantile(0.3))
    score_np = lambda v: score(torch.as_tensor(v)).detach().numpy()  # noqa: E731
    first = adaptive.run_attack("selective", model, score, tau, x, y, 0.1, 2, 0)
    robust = ~_broken(model, score, tau, first, y)
    got = adaptive.convergence_check(["selective", "orthogonal"], model, score, score_np, tau, x, y, 0.1, 2, 0,
                                     {"toy": 1}, robust)
    assert got["as_run"] == pytest.approx(robust.mean())
    assert got["twice_iterations"] <= got["as_run"] and got["twice_restarts"] <= got["as_run"]
    assert got["twice_iterations"] < got["as_run"]  # two steps were not enough: the check says so
    everything = adaptive.convergence_check(["selective"], model, score, score_np, tau, x, y, 0.1, 2, 0, {"toy": 1},
                                            np.zeros(len(x), dtype=bool))
    assert everything == {"as_run": 0.0, "twice_iterations": 0.0, "twice_restarts": 0.0}


def test_the_cascade_attacks_only_what_earlier_attacks_and_budgets_left_robust(data_root, monkeypatch):
    model, score, x, y = _toy(size=8)
    tau = float(score(x).quantile(0.2))
    score_np = lambda v: score(torch.as_tensor(v)).detach().numpy()  # noqa: E731
    calls = []
    run = adaptive.run_attack
    monkeypatch.setattr(adaptive, "run_attack", lambda attack, m, g, t, xs, *a, **kw: calls.append((attack, len(xs))) or run(attack, m, g, t, xs, *a, **kw))
    out = adaptive.cascade(["selective", "orthogonal"], model, score, score_np, tau, x, y, [0.05, 0.1], 5, 0, {"toy": 1})
    broken = {e: {a: _broken(model, score, tau, v, y) for a, v in d.items()} for e, d in out.items()}
    assert calls[0] == ("selective", len(x))
    assert calls[1] == ("orthogonal", int((~broken[0.05]["selective"]).sum()))  # only the robust ones
    assert calls[2] == ("selective", int((~broken[0.05]["orthogonal"]).sum()))  # carried over to the larger ε
    assert not (broken[0.05]["selective"] & ~broken[0.05]["orthogonal"]).any()  # never un-broken
    assert not (broken[0.05]["orthogonal"] & ~broken[0.1]["selective"]).any()
    assert float(np.abs(out[0.1]["orthogonal"] - x.numpy()).max()) <= 0.1 + 1e-6
    again = adaptive.cascade(["selective", "orthogonal"], model, score, score_np, tau, x, y, [0.05, 0.1], 5, 0, {"toy": 1})
    assert len(calls) == 4 and np.array_equal(again[0.1]["orthogonal"], out[0.1]["orthogonal"])  # cached


def test_the_gradient_free_check_scores_each_distinct_image_once():
    model, score, x, y = _toy(size=16)
    tau = float(score(x).quantile(0.95))
    scored = []

    def counting(v):
        scored.append(len(v))
        return score(v)

    adaptive.gradient_free_check(model, counting, tau, x.numpy(), y.numpy(), eps=0.3, max_iter=30)
    # Square asks for up to three scores per input and iteration; each new image costs one
    assert sum(scored) <= len(x) * (30 + 3)


def test_nothing_left_to_attack_is_not_an_error(data_root):
    model, score, x, y = _toy(size=8)
    def refuses_empty(v):
        assert len(v), "scored an empty batch"
        return score(torch.as_tensor(v)).detach().numpy()

    got = adaptive.outcomes(model, refuses_empty, {0.05: 1.0}, x[:0], y[:0].numpy())
    assert len(got["correct"]) == 0 and len(got[0.05]) == 0
    x_sq, wrong, accepted = adaptive.gradient_free_check(model, score, 0.0, x[:0].numpy(), y[:0].numpy(), eps=0.1)
    assert len(x_sq) == len(wrong) == len(accepted) == 0
    # a detector that accepts everything: the blind start breaks every input at the first ε, leaving nothing after
    start = adaptive.cascade(["pgd"], model, None, lambda v: np.zeros(len(v)), 0.0, x, y, [0.3, 0.5], 20, 0, {"toy": 2})
    start = {eps: stages["pgd"] for eps, stages in start.items()}
    everything = lambda v: np.full(len(v), -1.0) if len(v) else refuses_empty(v)  # noqa: E731
    with torch.no_grad():
        assert (model(torch.as_tensor(start[0.3])).argmax(1) != y).all()
    out = adaptive.cascade(["selective"], model, score, everything, 0.0, x, y, [0.3, 0.5], 5, 0, {"toy": 3}, start=start)
    assert np.array_equal(out[0.5]["selective"], start[0.3])


def test_a_combination_is_attacked_through_its_members_gradients_and_surrogates(data_root, fake_debian_fmnist):
    """The combined detector's attack score has the exact score's value and a gradient through
    each member's own gradient (MSP) or its surrogate (feature squeezing's BPDA): finite, non-zero,
    from a stand-in ordered as the exact score."""
    from scipy import stats

    from tamperbench import data, models
    from tamperbench.detectors import detector

    trained = models.train_or_load("smallcnn", "fashion_mnist", models.TrainConfig(epochs=1, batch_size=32), "cpu")
    train, test = data.load("fashion_mnist", "train"), data.load("fashion_mnist", "test")
    comb = detector("combined", members=["msp", ("feature_squeezing", {"bit_depth": 1, "median_window": 2})],
                    tails=["two", "upper"], device="cpu").fit(trained, train, calibration=test.x[:40])
    score = adaptive.attack_score(comb)
    x = test.x[40:70].clone().requires_grad_(True)
    s = score(x)
    (grad,) = torch.autograd.grad(s.sum(), x)
    assert torch.isfinite(grad).all() and float(grad.abs().sum()) > 0
    assert np.allclose(s.detach().numpy(), comb.score(test.x[40:70]), rtol=1e-5, atol=1e-5)  # judged on the exact value
    soft = comb.torch_score(test.x[40:70], member_scores=[m.torch_score if m.name == "msp" else adaptive.attack_score(m)
                                                          for m in comb.members]).detach().numpy()
    assert stats.spearmanr(soft, comb.score(test.x[40:70])).statistic > 0.7  # the direction follows the score
