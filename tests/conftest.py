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
