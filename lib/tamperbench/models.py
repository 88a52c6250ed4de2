"""The classifier registry and cached, seeded training.

Every architecture is built from **named** blocks, so that any layer's activation can be
addressed by name (``model.get_submodule("block2")``): ART's activation-based detectors, subset
scanning and PARTICUL all read intermediate feature maps. Models output **logits**.

``train_or_load(...)`` caches checkpoints under ``data/artifacts/classifier/``, keyed by the
dataset, the architecture, every training parameter and the seed. A corrupt checkpoint is
retrained with a warning.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from . import cache, data

#: Bumped when training code changes in a way that changes the weights.
TRAIN_VERSION = 2


def _conv_bn(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallCNN(nn.Sequential):
    """A small, fast CNN for 28×28 inputs, the CPU default.

    Named blocks: ``block1`` (32×14×14), ``block2`` (64×7×7), ``block3`` (128×7×7, the last
    convolutional map: PARTICUL's part detectors and subset scanning read it), ``pool``
    (128×3×3), ``fc`` (256-d penultimate features) and ``logits``. PARTICUL attaches by default
    to ``block2``, as the authors did on LeNet's second block.
    """

    feature_layer = "block3"
    penultimate_layer = "fc"
    conv_layers = ("block1", "block2", "block3")
    # PARTICUL's published layer: the authors moved LeNet's detectors to its second block
    particul_layer = "block2"

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28):
        side = image_size // 8
        super().__init__(
            OrderedDict(
                block1=nn.Sequential(*_conv_bn(in_channels, 32), nn.MaxPool2d(2)),
                block2=nn.Sequential(*_conv_bn(32, 64), nn.MaxPool2d(2)),
                block3=nn.Sequential(*_conv_bn(64, 128)),
                pool=nn.MaxPool2d(2),
                fc=nn.Sequential(nn.Flatten(), nn.Dropout(0.25), nn.Linear(128 * side * side, 256), nn.ReLU(inplace=True)),
                logits=nn.Linear(256, num_classes),
            )
        )


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(cin, cout, stride)[:2], nn.ReLU(inplace=True), *_conv_bn(cout, cout)[:2])
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )
        self.out = nn.ReLU()  # a module, not F.relu: guided backpropagation hooks ReLU modules

    def forward(self, x):
        return self.out(self.body(x) + self.shortcut(x))


class ResNet18_32(nn.Sequential):
    """CIFAR-style ResNet-18 (3×3 stem, no max-pool), for 32×32 inputs; the gpu profile.

    Named blocks: ``stem``, ``layer1``…``layer4`` (512×4×4), ``pool`` (512-d) and ``logits``.
    """

    feature_layer = "layer4"
    penultimate_layer = "pool"
    conv_layers = ("layer1", "layer2", "layer3", "layer4")
    particul_layer = "layer4"  # the authors' CIFAR-10 ResNet-18: the last block

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32):
        def stage(cin, cout, stride):
            return nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1))

        super().__init__(
            OrderedDict(
                stem=nn.Sequential(*_conv_bn(in_channels, 64)),
                layer1=stage(64, 64, 1),
                layer2=stage(64, 128, 2),
                layer3=stage(128, 256, 2),
                layer4=stage(256, 512, 2),
                pool=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()),
                logits=nn.Linear(512, num_classes),
            )
        )


MODELS: dict[str, Callable[..., nn.Module]] = {"smallcnn": SmallCNN, "resnet18_32": ResNet18_32}


def available() -> list[str]:
    return sorted(MODELS)


def build(name: str, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; valid models: {', '.join(available())}")
    return MODELS[name](in_channels=in_channels, num_classes=num_classes, image_size=image_size)


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` → CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"unknown device {device!r}; valid devices: auto, cpu, cuda, cuda:N")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class TrainConfig:
    epochs: int = 5
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 5e-4
    n_train: int | None = None  # None: the whole training split
    augment: bool = False  # random crop + flip, for CIFAR-scale runs
    seed: int = 0

    @classmethod
    def from_study(cls, params: dict) -> "TrainConfig":
        """The training settings of a study's shared parameters (``config.study(...)``)."""
        return cls(epochs=params["epochs"], batch_size=params["batch_size"], lr=params["lr"],
                   n_train=params["n_train"], seed=params["seed"])


@dataclass
class Trained:
    model: nn.Module
    history: list[dict] = field(default_factory=list)
    params: dict = field(default_factory=dict)
    from_cache: bool = False
    train_seconds: float = 0.0
    input_shape: tuple[int, int, int] = (1, 28, 28)
    num_classes: int = 10


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=gen, device="cpu").to(x.device) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    dy, dx = torch.randint(0, 9, (2,), generator=gen).tolist()  # one shift per batch: cheap
    return padded[:, :, dy : dy + h, dx : dx + w]


def _batched(model: nn.Module, x, batch_size: int, device: str, head: Callable[[torch.Tensor], torch.Tensor]) -> list:
    """``head(model(batch))`` for each batch of ``x`` (tensor or array), on the CPU, the model in eval mode."""
    dev = pick_device(device)
    model.eval().to(dev)
    x = torch.as_tensor(x)
    with torch.no_grad():
        return [head(model(x[i : i + batch_size].to(dev))).cpu() for i in range(0, len(x), batch_size)]


def probabilities(model: nn.Module, x: torch.Tensor | np.ndarray, batch_size: int = 512, device: str = "auto") -> np.ndarray:
    """Softmax probabilities (N×C) for images ``x`` (tensor or array), the model in eval mode."""
    out = _batched(model, x, batch_size, device, lambda z: torch.softmax(z, 1))
    return torch.cat(out).numpy() if out else np.zeros((0, 0), dtype=np.float32)


def predict(model: nn.Module, x: torch.Tensor | np.ndarray, batch_size: int = 512, device: str = "auto") -> np.ndarray:
    """Predicted labels for images ``x`` (tensor or array), the model in eval mode."""
    preds = _batched(model, x, batch_size, device, lambda z: z.argmax(1))
    return torch.cat(preds).numpy() if preds else np.zeros(0, dtype=np.int64)


def evaluate(model: nn.Module, ds: data.Dataset, batch_size: int = 512, device: str = "auto", cached: bool = True) -> np.ndarray:
    """Predicted labels for a dataset, cached by the model's weights, the images and the code: a
    classifier's whole test split is predicted once (its last training epoch), not again by each
    chapter's attack pool."""
    if not cached:
        return predict(model, ds.x, batch_size, device)
    params = {"code": cache.source_digest(), "model": cache.model_digest(model), "data": cache.array_digest(np.asarray(ds.x)),
              "batch_size": batch_size, "device": pick_device(device).type}
    return cache.cached("predictions", params, lambda: {"labels": predict(model, ds.x, batch_size, device)}, fmt="npz")["labels"]


def _train(model: nn.Module, train: data.Dataset, test: data.Dataset, cfg: TrainConfig, dev: torch.device) -> list[dict]:
    model.to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * math.ceil(len(train) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(steps, 1))
    gen = torch.Generator().manual_seed(cfg.seed)
    history = []
    # In an executed notebook the bar would fill the page: refresh rarely when not on a terminal.
    interval = 0.5 if sys.stderr.isatty() else 30
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(train), generator=gen)
        total, n = 0.0, 0
        bar = tqdm(range(0, len(train), cfg.batch_size), desc=f"epoch {epoch + 1}/{cfg.epochs}", mininterval=interval, leave=False)
        for i in bar:
            idx = order[i : i + cfg.batch_size]
            xb, yb = train.x[idx].to(dev), train.y[idx].to(dev)
            if cfg.augment:
                xb = _augment(xb, gen)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            n += len(idx)
        # the last epoch's predictions are the trained model's: cached for every chapter that asks
        acc = float((evaluate(model, test, device=str(dev), cached=epoch == cfg.epochs - 1) == test.y.numpy()).mean())
        history.append({"epoch": epoch + 1, "train_loss": total / max(n, 1), "test_accuracy": acc})
        print(f"epoch {epoch + 1}/{cfg.epochs}: train loss {total / max(n, 1):.4f}, test accuracy {acc:.4f}")
    return history


def train_or_load(
    name: str,
    dataset: str,
    cfg: TrainConfig | None = None,
    device: str = "auto",
) -> Trained:
    """Train ``name`` on ``dataset`` (or load its cached checkpoint) and return it in eval mode."""
    cfg = cfg or TrainConfig()
    if name not in MODELS:  # fail before loading any data
        raise KeyError(f"unknown model {name!r}; valid models: {', '.join(available())}")
    dev = pick_device(device)
    train = data.load(dataset, "train", seed=cfg.seed).take(cfg.n_train, cfg.seed)
    c, h, w = train.shape
    n_classes = len(train.classes)
    params = {"model": name, "dataset": dataset, "version": TRAIN_VERSION, **vars(cfg)}

    def make():
        return build(name, in_channels=c, num_classes=n_classes, image_size=h)

    hit = cache.load("classifier", params)
    if hit is not None:
        try:
            model = make()
            model.load_state_dict(hit["state_dict"])
            return Trained(model.to(dev).eval(), hit["history"], params, True, hit["train_seconds"], (c, h, w), n_classes)
        except (KeyError, RuntimeError, TypeError) as exc:
            import warnings

            warnings.warn(f"cached classifier does not match its architecture ({exc}); retraining", cache.CacheWarning)
    torch.set_num_threads(os.cpu_count() or 1)
    seed_everything(cfg.seed)  # before building: the initial weights come from the seeded RNG
    model = make()
    test = data.load(dataset, "test", seed=cfg.seed)
    start = time.perf_counter()
    history = _train(model, train, test, cfg, dev)
    seconds = time.perf_counter() - start
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    cache.save("classifier", params, {"state_dict": state, "history": history, "train_seconds": seconds})
    return Trained(model.eval(), history, params, False, seconds, (c, h, w), n_classes)
