import pickle

import numpy as np
import pytest
import torch

from tamperbench import data

OFFLINE_OOD = ["mnist_subset", "sklearn_digits", "textures", "faces", "noise_gaussian", "noise_uniform"]


@pytest.mark.parametrize("name", OFFLINE_OOD)
def test_offline_sets_are_unit_range_tensors_with_deterministic_splits(name):
    train, test = data.load(name, "train", seed=0), data.load(name, "test", seed=0)
    for ds in (train, test):
        assert ds.x.dtype == torch.float32 and ds.y.dtype == torch.int64
        assert ds.x.shape[1:] == (1, 28, 28)
        assert 0.0 <= float(ds.x.min()) and float(ds.x.max()) <= 1.0
        assert float(ds.x.std()) > 0.01  # real images, not a constant
    again = data.load(name, "test", seed=0)
    assert torch.equal(again.x, test.x) and torch.equal(again.y, test.y)
    other = data.load(name, "test", seed=1)
    assert not torch.equal(other.x, test.x)  # the seed changes the split or the draw


def test_splits_are_disjoint():
    train, test = data.load("mnist_subset", "train"), data.load("mnist_subset", "test")
    assert len(train) + len(test) == 5000
    flat_train = {tuple(r) for r in (train.x.view(len(train), -1)[:, ::7] * 255).round().int().tolist()}
    overlap = sum(tuple(r) in flat_train for r in (test.x.view(len(test), -1)[:, ::7] * 255).round().int().tolist())
    assert overlap < 5  # a handful of duplicate digits exist in MNIST itself


def test_shape_adaptation_and_subsets():
    ds = data.load("faces", "train", shape=(3, 32, 32), n=20, seed=3)
    assert ds.x.shape == (20, 3, 32, 32)
    assert torch.equal(ds.x[:, 0], ds.x[:, 1])  # grey replicated into RGB
    grey = data.adapt(torch.rand(2, 3, 32, 32), (1, 28, 28))
    assert grey.shape == (2, 1, 28, 28)


def test_unknown_names_list_valid_choices():
    with pytest.raises(KeyError, match="valid datasets: .*fashion_mnist"):
        data.load("fashion_mnsit")
    with pytest.raises(ValueError, match="valid splits: train, test"):
        data.load("faces", "validation")


def test_fashion_mnist_from_debian_files(data_root, fake_debian_fmnist):
    train = data.load("fashion_mnist", "train")
    assert train.x.shape == (300, 1, 28, 28) and train.classes[0] == "T-shirt/top"
    assert (data_root / "datasets" / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte").exists()
    # once prepared, the data folder alone suffices
    data.DEBIAN_FASHION_MNIST = data_root / "nowhere"
    assert len(data.load("fashion_mnist", "test")) == 100


def test_missing_fashion_mnist_names_the_three_ways(data_root, monkeypatch, tmp_path):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    with pytest.raises(data.DatasetUnavailable) as err:
        data.load("fashion_mnist", "train")
    msg = str(err.value)
    assert "FashionMNIST" in msg and "dataset-fashion-mnist" in msg and "download" in msg
    assert not (data_root / "datasets" / "FashionMNIST" / "raw").exists() or not any(
        (data_root / "datasets" / "FashionMNIST" / "raw").iterdir()
    )


# ---- torchvision-format fixtures for the gpu-profile sets (tiny files, the real layout)
def _pickle(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        pickle.dump(obj, fh)


def test_cifar10_reads_torchvision_layout(data_root):
    folder = data_root / "datasets" / "cifar-10-batches-py"
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        _pickle(folder / f"data_batch_{i}", {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [i % 10] * 4})
    test_pixels = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    _pickle(folder / "test_batch", {"data": test_pixels, "labels": [1, 2, 3]})
    _pickle(folder / "batches.meta", {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]})
    train, test = data.load("cifar10", "train"), data.load("cifar10", "test")
    assert train.x.shape == (20, 3, 32, 32) and test.y.tolist() == [1, 2, 3]
    # row-major channel planes, as in the real files
    assert test.x[0, 1, 0, 0] == pytest.approx(test_pixels[0, 1024] / 255)
    assert test.classes[1] == "automobile"


def test_cifar100_reads_fine_labels(data_root):
    folder = data_root / "datasets" / "cifar-100-python"
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        _pickle(folder / split, {"data": rng.integers(0, 256, (5, 3072), dtype=np.uint8), "fine_labels": [0, 1, 2, 3, 99], "coarse_labels": [0] * 5})
    _pickle(folder / "meta", {"fine_label_names": [f"c{i}" for i in range(100)]})
    ds = data.load("cifar100", "test")
    assert ds.y.tolist() == [0, 1, 2, 3, 99] and len(ds.classes) == 100


def test_svhn_reads_mat_files_and_maps_ten_to_zero(data_root):
    import scipy.io

    folder = data_root / "datasets" / "svhn"
    folder.mkdir(parents=True)
    x = np.random.default_rng(0).integers(0, 256, (32, 32, 3, 4), dtype=np.uint8)
    scipy.io.savemat(folder / "test_32x32.mat", {"X": x, "y": np.array([[10], [1], [5], [9]])})
    ds = data.load("svhn", "test")
    assert ds.y.tolist() == [0, 1, 5, 9]
    assert ds.x[2, 1, 3, 4] == pytest.approx(x[3, 4, 1, 2] / 255)


def test_dtd_reads_image_folders(data_root):
    from PIL import Image

    base = data_root / "datasets" / "dtd" / "dtd"
    names = ["banded/banded_0001.jpg", "zigzagged/zigzagged_0001.jpg"]
    for n in names:
        (base / "images" / n).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((40, 60, 3), 128, dtype=np.uint8)).save(base / "images" / n)
    (base / "labels").mkdir(parents=True)
    (base / "labels" / "test1.txt").write_text("\n".join(names) + "\n")
    ds = data.load("dtd", "test")
    assert ds.x.shape == (2, 3, 32, 32) and ds.classes == ("banded", "zigzagged") and ds.y.tolist() == [0, 1]


def test_missing_gpu_dataset_error_says_where(data_root):
    with pytest.raises(data.DatasetUnavailable, match="cifar-10-batches-py"):
        data.load("cifar10", "test")
