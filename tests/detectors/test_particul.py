import numpy as np
import pytest
import torch

from tamperbench import data, models
from tamperbench.detectors import DetectorError, detector
from tamperbench.detectors import particul as pt


def _box_max(norm_map: np.ndarray, k: int = 3) -> float:
    """Independent reference: the largest k×k window sum (zero padding) of an H×W map."""
    h, w = norm_map.shape
    padded = np.pad(norm_map, k // 2)
    return max(padded[i : i + k, j : j + k].sum() for i in range(h) for j in range(w))


def test_locality_of_a_peaked_detector_is_minus_its_box_filtered_peak():
    raw = torch.zeros(1, 1, 7, 7)
    raw[0, 0, 3, 4] = 6.0  # one detector, peaked at one place
    norm = pt.normalise(raw)
    assert torch.allclose(norm.sum((-2, -1)), torch.ones(1, 1))
    expected = -_box_max(norm[0, 0].numpy())
    assert pt.locality_loss(norm).item() == pytest.approx(expected, rel=1e-6)
    delta = torch.zeros(1, 1, 7, 7)
    delta[0, 0, 3, 3] = 1.0
    assert pt.locality_loss(delta).item() == pytest.approx(-1.0)
    uniform = torch.full((1, 1, 5, 5), 1 / 25)
    assert pt.locality_loss(uniform).item() == pytest.approx(-9 / 25)  # a spread map is penalised


def test_two_detectors_on_the_same_spot_raise_unicity():
    same = torch.zeros(1, 2, 5, 5)
    same[0, :, 2, 2] = 1.0
    apart = torch.zeros(1, 2, 5, 5)
    apart[0, 0, 1, 1] = apart[0, 1, 3, 3] = 1.0
    assert pt.unicity_loss(same).item() == pytest.approx(1.0)
    assert pt.unicity_loss(apart).item() == pytest.approx(0.0)


def test_clustering_loss_is_zero_for_flat_and_positive_for_a_spike():
    flat = torch.full((1, 2, 5, 5), 1 / 25)
    spike = torch.zeros(1, 2, 5, 5)
    spike[0, 0, 2, 2] = 1.0
    assert pt.clustering_loss(flat).item() == pytest.approx(0.0, abs=1e-7)
    assert pt.clustering_loss(spike).item() == pytest.approx(1.0)


def test_calibration_recovers_known_logistic_parameters():
    rng = np.random.default_rng(0)
    loc, scale = pt.fit_logistic(rng.logistic(3.0, 0.5, 20000))
    assert loc == pytest.approx(3.0, abs=0.02) and scale == pytest.approx(0.5, rel=0.03)


def test_confidence_is_the_logistic_cdf_and_removing_the_peak_lowers_it():
    dec = pt.ParticulDecision(num_classes=2, num_features=3, num_parts=2, head=torch.nn.Identity())
    dec.calibration_loc.fill_(1.0)
    maps = torch.zeros(1, 2, 2, 4, 4)
    maps[0, :, :, 1, 2] = 3.0
    with_peak = dec.class_confidence(maps)
    assert torch.allclose(with_peak, torch.sigmoid(torch.tensor(2.0)).expand(1, 2))
    maps[0, 0, 0, 1, 2] = 0.0  # remove class 0's first part
    without = dec.class_confidence(maps)
    assert without[0, 0] < with_peak[0, 0] and without[0, 1] == with_peak[0, 1]
    logits = torch.tensor([[5.0, -5.0]])
    for mode in pt.MODES:
        assert pt.image_confidence(without, logits, mode) < pt.image_confidence(with_peak, logits, mode)
    with pytest.raises(DetectorError, match="valid modes: categorical, argmax, mean"):
        pt.image_confidence(with_peak, logits, "max")


@pytest.fixture
def fitted(data_root, fake_debian_fmnist):
    trained = models.train_or_load("smallcnn", "fashion_mnist", models.TrainConfig(epochs=2, batch_size=32), "cpu")
    before = {k: v.clone() for k, v in trained.model.state_dict().items()}
    det = detector("particul", epochs=3, train_batch_size=32, device="cpu").fit(trained, data.load("fashion_mnist", "train"))
    return trained, det, before


def test_training_moves_only_the_detectors(fitted):
    trained, det, before = fitted
    for k, v in trained.model.state_dict().items():
        assert torch.equal(v, before[k]), f"classifier weight {k} changed"
    for k, v in det.net.extractor.state_dict().items():
        assert torch.equal(v, before[k.removeprefix("body.")])
    assert det.history[-1]["locality"] < det.history[0]["locality"]  # the detectors learned
    # gradients of the loss reach the prototypes and nothing else
    x = data.load("fashion_mnist", "test").x[:8]
    det.decision.prototypes.grad = None
    loss = det.losses(det.net.extractor(x), torch.arange(8) % 10)["total"]
    loss.backward()
    assert det.decision.prototypes.grad is not None and det.decision.prototypes.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in det.net.named_parameters() if n != "classifier.prototypes")


def test_scores_are_suspicion_and_ood_scores_higher(fitted):
    trained, det, _ = fitted
    clean = data.load("fashion_mnist", "test").x
    noise = data.load("noise_uniform", "test").x[:100]
    s_clean, s_noise = det.score(clean), det.score(noise)
    assert ((s_clean >= 0) & (s_clean <= 1)).all()
    assert s_noise.mean() > s_clean.mean()
    assert np.allclose(det.confidence(clean), 1 - s_clean)


def test_save_load_round_trip_reproduces_scores_exactly(fitted, tmp_path):
    trained, det, _ = fitted
    folder = det.save(tmp_path / "particul")
    assert (folder / "model_arch.yml").exists() and (folder / "model_state.pth").exists()
    again = pt.Particul.load(folder, trained, device="cpu")
    x = data.load("fashion_mnist", "test").x
    for mode in pt.MODES:
        assert np.array_equal(det.confidence(x, mode), again.confidence(x, mode))


def test_refit_hits_the_cache(fitted):
    trained, det, _ = fitted
    again = detector("particul", epochs=3, train_batch_size=32, device="cpu").fit(trained, data.load("fashion_mnist", "train"))
    assert again.from_cache and torch.equal(again.decision.prototypes, det.decision.prototypes)


def test_part_maps_cover_the_image(fitted):
    trained, det, _ = fitted
    maps, pred = det.part_maps(data.load("fashion_mnist", "test").x[:3])
    assert maps.shape == (3, 4, 28, 28) and pred.shape == (3,)


def test_bad_use_is_refused(fitted):
    trained, det, _ = fitted
    with pytest.raises(DetectorError, match="valid detectors: particul"):
        detector("partikul")
    with pytest.raises(DetectorError, match="before score"):
        detector("particul").score(torch.zeros(1, 1, 28, 28))
    with pytest.raises(DetectorError, match="empty"):
        det.score(torch.zeros(0, 1, 28, 28))
    with pytest.raises(DetectorError, match=r"shape \(N, 1, 28, 28\)"):
        det.score(torch.zeros(2, 3, 32, 32))
    with pytest.raises(DetectorError, match="unknown layer 'block9'; valid layers: block1"):
        detector("particul", layer="block9", epochs=1).fit(trained, data.load("fashion_mnist", "train"))
    with pytest.raises(DetectorError, match="num_parts must be an int"):
        detector("particul", num_parts=0)


# ---- the authors' training protocol (issue 10)
def test_detectors_start_as_the_authors_conv2d_detectors():
    """The authors build each detector as its own Conv2d(D, 1, 1) and Xavier-normal initialise it;
    our (C·P)×D prototypes must start with the same spread, measured on such layers, not on a
    formula of ours (one xavier_normal_ over the whole tensor starts √(257/336) ≈ 0.87× as wide here)."""
    d, c, p = 256, 10, 8
    torch.manual_seed(0)
    dec = pt.ParticulDecision(num_classes=c, num_features=d, num_parts=p, head=torch.nn.Identity())
    w = dec.prototypes.detach().flatten().numpy()
    authors = []
    for _ in range(c * p):
        conv = torch.nn.Conv2d(d, 1, kernel_size=1, bias=False)
        torch.nn.init.xavier_normal_(conv.weight)
        authors.append(conv.weight.detach().flatten().numpy())
    reference = np.concatenate(authors)
    assert abs(w.mean()) < 0.1 * reference.std()
    assert w.std() == pytest.approx(reference.std(), rel=0.03)
    per_detector = dec.prototypes.detach().flatten(1).std(1).numpy()  # every detector, not only on average
    assert per_detector.min() > 0.8 * reference.std() and per_detector.max() < 1.2 * reference.std()
    kurtosis = ((w - w.mean()) ** 4).mean() / w.var() ** 2
    assert kurtosis == pytest.approx(3.0, abs=0.2)  # normal (a uniform initialisation gives 1.8)


def test_fit_and_validation_splits_are_disjoint_and_sized():
    fit, val = pt.split_fit_validation(1000, None, 0.1, seed=0)
    assert len(val) == 100 and len(fit) == 900 and not set(fit) & set(val)
    fit, val = pt.split_fit_validation(60000, 900, 0.1, seed=3)
    assert len(fit) == 900 and len(val) == 100 and not set(fit) & set(val)
    assert not np.array_equal(pt.split_fit_validation(1000, None, 0.1, seed=1)[1], pt.split_fit_validation(1000, None, 0.1, seed=0)[1])
    with pytest.raises(DetectorError, match="val_fraction"):
        detector("particul", val_fraction=1.5)


def test_the_best_validation_checkpoint_is_kept_and_calibrated(data_root, fake_debian_fmnist, monkeypatch):
    trained = models.train_or_load("smallcnn", "fashion_mnist", models.TrainConfig(epochs=1, batch_size=32), "cpu")
    train = data.load("fashion_mnist", "train")
    scripted = iter([-0.1, -0.5, -0.3])  # validation losses: epoch 2 is the best, not the last
    states = []

    def fake_val(self, feats, y, batch=1024):
        states.append(self.decision.prototypes.detach().clone())
        return {"locality": 0.0, "unicity": 0.0, "clustering": 0.0, "total": next(scripted)}

    monkeypatch.setattr(pt.Particul, "_mean_losses", fake_val)
    det = detector("particul", epochs=3, train_batch_size=32, device="cpu").fit(trained, train)
    assert det.best_epoch == 2 and [h["best_epoch"] for h in det.history] == [1, 2, 2]
    assert torch.equal(det.decision.prototypes.detach(), states[1])
    assert not torch.equal(det.decision.prototypes.detach(), states[2])
    # calibration ran on that checkpoint: refitting the logistics on its fit-set maxima agrees
    maxima = det.maxima(train.x[det.fit_indices])
    y = train.y[det.fit_indices].numpy()
    for c in (0, 3):
        loc, scale = pt.fit_logistic(maxima[y == c, c, 0])
        assert det.decision.calibration_loc[c, 0].item() == pytest.approx(loc, rel=1e-4, abs=1e-5)
        assert det.decision.calibration_scale[c, 0].item() == pytest.approx(scale, rel=1e-4)


def test_a_snapshot_is_what_a_shorter_training_gives(data_root, fake_debian_fmnist):
    trained = models.train_or_load("smallcnn", "fashion_mnist", models.TrainConfig(epochs=1, batch_size=32), "cpu")
    train = data.load("fashion_mnist", "train")
    long = detector("particul", epochs=3, snapshot_epochs=[1, 2], train_batch_size=32, device="cpu").fit(trained, train)
    short = detector("particul", epochs=2, train_batch_size=32, device="cpu").fit(trained, train)
    snap = long.snapshot(2)
    for name in ("prototypes", "calibration_loc", "calibration_scale"):
        assert torch.allclose(getattr(snap.decision, name), getattr(short.decision, name), atol=1e-5), name
    x = data.load("fashion_mnist", "test").x[:20]
    assert np.allclose(snap.score(x), short.score(x), atol=1e-5)
    with pytest.raises(DetectorError, match="snapshots: \\[1, 2\\]"):
        long.snapshot(5)


def test_calibrated_maps_share_one_scale_and_peak_at_the_part_confidence(fitted):
    _, det, _ = fitted
    x = data.load("fashion_mnist", "test").x[:4]
    maps, pred = det.part_maps(x, upsample=False, calibrated=True)
    assert ((maps >= 0) & (maps <= 1)).all()
    peaks = maps.reshape(*maps.shape[:2], -1).max(-1)
    assert np.allclose(peaks, det.part_confidences(x), atol=1e-6)
    # the figure draws every map on that one [0, 1] scale, values untouched
    from tamperbench import plots

    up, _ = det.part_maps(x, calibrated=True)
    fig = plots.overlay_grid(x.numpy(), up, scale="calibrated", annotations=np.round(peaks, 2))
    overlays = [im for ax in fig.axes for im in ax.get_images() if im.get_cmap().name == "jet"]
    assert len(overlays) == 4 * det.params["num_parts"]
    assert all(im.get_clim() == (0, 1) for im in overlays)
    assert any(np.allclose(im.get_array(), up[0, 0]) for im in overlays)
    with pytest.raises(ValueError, match="valid scales"):
        plots.overlay_grid(x.numpy(), up, scale="own")


def test_reference_patches_agree_with_cabrnet_projection(fitted):
    trained, det, _ = fitted
    train = data.load("fashion_mnist", "train")
    patches = det.reference_patches(train, k=2)
    top = {(r["class"], r["part"]): r for r in patches if r["rank"] == 0}
    assert len(top) == 10 * det.params["num_parts"]
    fit = train.take(None)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(fit.x[det.fit_indices], fit.y[det.fit_indices]),
                                         batch_size=64)
    info = det.net.project(loader, device="cpu", update_prototypes=False)
    for proto in info:
        c, p = divmod(proto["proto_idx"], det.params["num_parts"])
        assert det.fit_indices[proto["img_idx"]] == top[(c, p)]["index"]
        assert (proto["h"], proto["w"]) == (top[(c, p)]["h"], top[(c, p)]["w"])
        t, l, b, r = top[(c, p)]["box"]
        assert 0 <= t < b <= 28 and 0 <= l < r <= 28 and (b - t) < 28  # a patch, not the whole image
