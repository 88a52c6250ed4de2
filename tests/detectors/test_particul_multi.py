import numpy as np
import pytest
import torch

from tamperbench import data, models
from tamperbench.detectors import ParticulMultiLayer, DetectorError, detector
from tamperbench.detectors import particul as pt


@pytest.fixture
def trained_and_train(data_root, fake_debian_fmnist):
    trained = models.train_or_load("smallcnn", "fashion_mnist", models.TrainConfig(epochs=1, batch_size=32), "cpu")
    return trained, data.load("fashion_mnist", "train")


def test_multi_layer_score_is_the_mean_of_the_layers_confidences(trained_and_train):
    trained, train = trained_and_train
    multi = detector("particul_multi", epochs=2, train_batch_size=32, device="cpu").fit(trained, train)
    assert multi.layers == ["block1", "block2", "block3"]
    singles = [detector("particul", layer=layer, epochs=2, train_batch_size=32, device="cpu").fit(trained, train)
               for layer in multi.layers]
    assert all(s.from_cache for s in singles)  # the members are the single-layer fits, shared through the cache
    x = torch.cat([data.load("fashion_mnist", "test").x[:30], data.load("noise_uniform", "test").x[:10]])
    for mode in pt.MODES:
        expected = np.mean([s.confidence(x, mode) for s in singles], axis=0)
        assert np.allclose(multi.confidence(x, mode), expected, atol=1e-6)
        assert not np.allclose(multi.confidence(x, mode), singles[0].confidence(x, mode))


def test_multi_layer_reads_every_layer_in_one_forward_pass(trained_and_train):
    trained, train = trained_and_train
    multi = detector("particul_multi", layers=["block1", "block3"], epochs=1, device="cpu").fit(trained, train)
    calls = []
    hook = trained.model.get_submodule("block1").register_forward_hook(lambda *a: calls.append(1))
    try:
        multi.score(data.load("fashion_mnist", "test").x[:10])
    finally:
        hook.remove()
    assert len(calls) == 1


def test_multi_layer_refuses_bad_settings():
    with pytest.raises(DetectorError, match="at least two distinct layer names"):
        detector("particul_multi", layers=["block1"])
    with pytest.raises(DetectorError, match=r"unknown parameter 'layer' \(did you mean 'layers'\?\)"):
        detector("particul_multi", layer="block1")
    with pytest.raises(DetectorError, match="not `layer`"):  # the class itself says so too
        ParticulMultiLayer(layer="block1")
    with pytest.raises(DetectorError, match="valid modes"):
        detector("particul_multi", mode="max")
    with pytest.raises(DetectorError, match="num_parts must be an int"):
        detector("particul_multi", num_parts=0)
