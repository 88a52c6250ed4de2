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
