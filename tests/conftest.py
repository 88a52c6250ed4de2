import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from tamperbench import data


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> None:
    """Write ``array`` (uint8) in the IDX format that (Fashion-)MNIST files use."""
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    blob = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(path, "wb") as fh:
            fh.write(blob)
    else:
        path.write_bytes(blob)


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    """An empty data root, with downloads disabled: nothing outside tmp_path is touched."""
    root = tmp_path / "data"
    monkeypatch.setenv("TAMPERBENCH_DATA", str(root))
    monkeypatch.setenv("TAMPERBENCH_OFFLINE", "1")
    return root


@pytest.fixture
def fake_debian_fmnist(tmp_path, monkeypatch):
    """A tiny Fashion-MNIST in Debian's layout (gzipped IDX files): 10 classes, learnable."""
    folder = tmp_path / "debian-fashion-mnist"
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 300), ("t10k", 100)):
        y = np.arange(n) % 10
        x = rng.integers(0, 40, (n, 28, 28))
        for i, label in enumerate(y):  # each class lights up its own band of rows
            x[i, 2 * label + 4 : 2 * label + 7, 4:24] = 220
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", x, gz=True)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", y, gz=True)
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", folder)
    return folder


@pytest.fixture(scope="session")
def ci_book(tmp_path_factory):
    """The book sources with every notebook executed in the ci profile (real data root)."""
    import shutil

    from tamperbench import runner

    book = tmp_path_factory.mktemp("book")
    shutil.copytree(runner.BOOK_DIR, book, dirs_exist_ok=True, ignore=shutil.ignore_patterns("_build", "[0-9][0-9]_*.ipynb"))
    runner.run("ci", book_dir=book, force=True)
    return book


@pytest.fixture(scope="session")
def ci_site(ci_book):
    """The ci book built as ``make test`` builds it (strict: -W -n --keep-going); the process and
    the HTML folder."""
    import subprocess
    import sys

    jb = Path(sys.executable).parent / "jupyter-book"
    proc = subprocess.run([str(jb), "build", str(ci_book), "--all", "-W", "-n", "--keep-going"],
                          capture_output=True, text=True)
    return proc, ci_book / "_build" / "html"


def write_pickle(path: Path, obj) -> None:
    import pickle

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        pickle.dump(obj, fh)


@pytest.fixture
def tiny_cifar(data_root):
    """The gpu profile's CIFAR-10 benchmark in torchvision's on-disk layout, tiny: a learnable
    CIFAR-10 (each class a coloured band), CIFAR-100, SVHN and DTD. TinyImageNet, MNIST and
    Places365 are absent, as on a machine that cannot fetch them."""
    import scipy.io
    from PIL import Image

    rng = np.random.default_rng(0)
    datasets = data_root / "datasets"

    def images(labels):
        x = rng.integers(0, 60, (len(labels), 3, 32, 32))
        for i, label in enumerate(labels):  # class c: rows 3c..3c+2 bright in channel c % 3
            x[i, label % 3, 3 * label : 3 * label + 3, 2:30] = 230
        return x.reshape(len(labels), 3072).astype(np.uint8)

    folder = datasets / "cifar-10-batches-py"
    for i in range(1, 6):
        labels = [int(v) for v in rng.integers(0, 10, 60)]
        write_pickle(folder / f"data_batch_{i}", {"data": images(labels), "labels": labels})
    labels = [i % 10 for i in range(120)]
    write_pickle(folder / "test_batch", {"data": images(labels), "labels": labels})
    write_pickle(folder / "batches.meta", {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog",
                                                          "frog", "horse", "ship", "truck"]})
    folder = datasets / "cifar-100-python"
    for split in ("train", "test"):
        write_pickle(folder / split, {"data": rng.integers(0, 256, (40, 3072), dtype=np.uint8),
                                      "fine_labels": [i % 100 for i in range(40)], "coarse_labels": [0] * 40})
    write_pickle(folder / "meta", {"fine_label_names": [f"c{i}" for i in range(100)]})
    (datasets / "svhn").mkdir(parents=True)
    scipy.io.savemat(datasets / "svhn" / "test_32x32.mat",
                     {"X": rng.integers(0, 256, (32, 32, 3, 40), dtype=np.uint8), "y": rng.integers(1, 11, (40, 1))})
    base = datasets / "dtd" / "dtd"
    names = [f"{c}/{c}_{i:04d}.jpg" for c in ("banded", "zigzagged") for i in range(20)]
    for n in names:
        (base / "images" / n).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(base / "images" / n)
    (base / "labels").mkdir(parents=True)
    (base / "labels" / "test1.txt").write_text("\n".join(names) + "\n")
    return datasets
