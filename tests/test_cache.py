import numpy as np
import pytest
import torch

from tamperbench import cache


def test_key_ignores_order_and_int_float_spelling():
    assert cache.content_key({"a": 1, "b": 0.5}) == cache.content_key({"b": 0.5, "a": 1.0})
    assert cache.content_key({"a": 1}) != cache.content_key({"a": 2})
    with pytest.raises(TypeError, match="cannot key"):
        cache.content_key({"a": object()})


def test_same_parameters_hit_changed_parameters_miss(data_root):
    calls = []

    def build():
        calls.append(1)
        return {"w": torch.arange(3.0)}

    params = {"model": "smallcnn", "epochs": 2, "seed": 0}
    first = cache.cached("demo", params, build)
    second = cache.cached("demo", params, build)
    assert len(calls) == 1 and torch.equal(first["w"], second["w"])
    cache.cached("demo", {**params, "epochs": 3}, build)
    assert len(calls) == 2
    manifest = cache.cache_path("demo", params).with_suffix(".params.json")
    assert '"epochs": 2' in manifest.read_text()


@pytest.mark.parametrize("fmt", ["torch", "npz", "json"])
def test_corrupt_file_is_rebuilt_with_a_warning(data_root, fmt):
    value = {"a": np.arange(4)} if fmt == "npz" else ({"a": [1, 2]} if fmt == "json" else {"a": torch.ones(2)})
    cache.cached("demo", {"x": 1}, lambda: value, fmt=fmt)
    path = cache.cache_path("demo", {"x": 1}, fmt)
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 3] + b"garbage")
    rebuilt = []
    with pytest.warns(cache.CacheWarning, match="unreadable"):
        cache.cached("demo", {"x": 1}, lambda: rebuilt.append(1) or value, fmt=fmt)
    assert rebuilt == [1]
    assert cache.load("demo", {"x": 1}, fmt) is not None  # the rebuilt file reads again


def test_failed_build_writes_nothing(data_root):
    def boom():
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        cache.cached("demo", {"x": 2}, boom)
    folder = cache.cache_path("demo", {"x": 2}).parent
    assert not folder.exists() or not any(folder.iterdir())


def test_unknown_format():
    with pytest.raises(ValueError, match="valid formats: torch, npz, json"):
        cache.cache_path("demo", {}, "pickle")


def test_source_digest_ignores_orchestration_only():
    """Editing the runner or the sweep orchestration reruns nothing; editing a module that
    computes results does (the digest is what score caches and the runner key on)."""
    from pathlib import Path

    import tamperbench

    folder = Path(tamperbench.__file__).parent
    assert {"runner.py", "sweep.py", "__main__.py"} <= cache.ORCHESTRATION
    assert not cache.ORCHESTRATION & {"benchmark.py", "adaptive.py", "aggregate.py", "metrics.py"}
    assert all((folder / name).exists() for name in cache.ORCHESTRATION)
