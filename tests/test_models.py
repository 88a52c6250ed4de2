import numpy as np
import pytest
import torch

from tamperbench import cache, models


@pytest.mark.parametrize("name, shape", [("smallcnn", (1, 28, 28)), ("resnet18_32", (3, 32, 32))])
def test_architectures_output_logits_and_name_their_blocks(name, shape):
    net = models.build(name, in_channels=shape[0], num_classes=10, image_size=shape[1]).eval()
    out = net(torch.rand(2, *shape))
    assert out.shape == (2, 10)
    assert not torch.allclose(out.softmax(1).sum(1), out.sum(1))  # logits, not probabilities
    names = [n for n, _ in net.named_children()]
    assert net.feature_layer in names and net.penultimate_layer in names and names[-1] == "logits"
    feats = {}
    net.get_submodule(net.feature_layer).register_forward_hook(lambda m, i, o: feats.setdefault("f", o))
    net(torch.rand(1, *shape))
    assert feats["f"].dim() == 4  # a spatial feature map, for PARTICUL and subset scanning


def test_unknown_model_and_device():
    with pytest.raises(KeyError, match="valid models: resnet18_32, smallcnn"):
        models.build("vgg", 1, 10, 28)
    with pytest.raises(ValueError, match="valid devices: auto, cpu, cuda"):
        models.pick_device("tpu")
    assert models.pick_device("auto").type in ("cpu", "cuda")


def test_training_is_seeded_learns_and_is_cached(data_root, fake_debian_fmnist):
    cfg = models.TrainConfig(epochs=2, batch_size=32, lr=3e-3, seed=0)
    first = models.train_or_load("smallcnn", "fashion_mnist", cfg, device="cpu")
    assert not first.from_cache and first.history[-1]["test_accuracy"] > 0.8
    again = models.train_or_load("smallcnn", "fashion_mnist", cfg, device="cpu")
    assert again.from_cache
    for a, b in zip(first.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(a, b)
    # a second, uncached training with the same seed gives the same weights
    path = cache.cache_path("classifier", first.params)
    path.unlink()
    rerun = models.train_or_load("smallcnn", "fashion_mnist", cfg, device="cpu")
    assert not rerun.from_cache
    for a, b in zip(first.model.state_dict().values(), rerun.model.state_dict().values()):
        assert torch.equal(a, b)
    other = models.train_or_load("smallcnn", "fashion_mnist", models.TrainConfig(epochs=1, batch_size=32, seed=0), device="cpu")
    assert not other.from_cache  # a changed parameter misses


def test_corrupt_checkpoint_retrains_with_a_warning(data_root, fake_debian_fmnist):
    cfg = models.TrainConfig(epochs=1, batch_size=64, seed=1)
    trained = models.train_or_load("smallcnn", "fashion_mnist", cfg, device="cpu")
    path = cache.cache_path("classifier", trained.params)
    path.write_bytes(b"not a checkpoint")
    with pytest.warns(cache.CacheWarning):
        again = models.train_or_load("smallcnn", "fashion_mnist", cfg, device="cpu")
    assert not again.from_cache
    assert models.train_or_load("smallcnn", "fashion_mnist", cfg, device="cpu").from_cache


def test_evaluate_predicts_labels(data_root, fake_debian_fmnist):
    from tamperbench import data

    test = data.load("fashion_mnist", "test")
    net = models.build("smallcnn", 1, 10, 28)
    pred = models.evaluate(net, test, device="cpu")
    assert pred.shape == (len(test),) and pred.dtype == np.int64


def test_evaluate_is_cached_by_weights_and_images(data_root, fake_debian_fmnist, monkeypatch):
    """A second call with the same weights and images reads the cache; other weights or other
    images are predicted afresh, never served another model's labels."""
    import torch

    from tamperbench import data

    test = data.load("fashion_mnist", "test")
    net = models.build("smallcnn", 1, 10, 28)
    calls = []
    real = models.predict
    monkeypatch.setattr(models, "predict", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = models.evaluate(net, test, device="cpu")
    assert np.array_equal(models.evaluate(net, test, device="cpu"), first) and len(calls) == 1
    with torch.no_grad():
        net.logits.bias.copy_(torch.arange(10.0) * 100)  # class 9 wins everywhere
    assert (models.evaluate(net, test, device="cpu") == 9).all() and len(calls) == 2
    half = data.Dataset(test.name, "test", test.x[:50], test.y[:50], test.classes)
    assert len(models.evaluate(net, half, device="cpu")) == 50 and len(calls) == 3
    assert np.array_equal(models.evaluate(net, test, device="cpu", cached=False), models.predict(net, test.x, device="cpu"))
