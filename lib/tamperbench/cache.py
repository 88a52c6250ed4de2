"""Content-keyed artifact cache.

Every expensive artifact (a trained classifier, an attack's outputs, a fitted detector, a table
of scores) is stored under ``data/artifacts/<kind>/<key>.<ext>``, where ``key`` is a hash of
everything that determines it: dataset, architecture, parameters, seed, format version. The
same parameters hit; any changed parameter misses. A JSON manifest beside each file records
the parameters in clear, for provenance.

Later chapters call :func:`cached` with the same parameters as earlier ones and so reuse their
artifacts instead of recomputing them. Writes are atomic; an unreadable file (truncated,
corrupt) is reported with a warning and rebuilt, never trusted and never fatal.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from . import atomic, paths

FORMATS = ("torch", "npz", "json")
_EXTENSIONS = {"torch": ".pt", "npz": ".npz", "json": ".json"}


class CacheWarning(UserWarning):
    """An artifact could not be read and is being rebuilt."""


def _canonical(obj: Any) -> Any:
    """Turn parameters into plain JSON values with one spelling each (for stable hashing)."""
    if isinstance(obj, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        # 1 and 1.0 are the same budget; store integral floats as ints.
        return int(f) if math.isfinite(f) and f.is_integer() else repr(f)
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot key a cache entry on a {type(obj).__name__}: {obj!r}")


#: Modules that run, schedule or ship the study but compute none of its results: editing them
#: must not invalidate every cached score and rerun every chapter.
ORCHESTRATION = frozenset({"__main__.py", "runner.py", "sweep.py", "share.py"})


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """A hash of the package's source code: artifacts derived cheaply from other artifacts
    (scores) include it in their key, so a code change never serves a stale result; the
    runner uses it to rerun notebooks after a change in ``lib/``."""
    folder = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*.py")):
        if f.relative_to(folder).as_posix() in ORCHESTRATION:
            continue
        h.update(str(f.relative_to(folder)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:20]


def array_digest(*arrays: np.ndarray) -> str:
    """Identity of arrays: a hash of their dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:20]


def model_digest(model) -> str:
    """Identity of a model: a hash of its weights and buffers (so a retrained model never reuses
    an artifact of another)."""
    return array_digest(*(t.detach().cpu().numpy() for t in model.state_dict().values()))


def content_key(params: Mapping[str, Any]) -> str:
    """A short stable hash of ``params`` (order of keys and int/float spelling do not matter)."""
    blob = json.dumps(_canonical(params), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def cache_path(kind: str, params: Mapping[str, Any], fmt: str = "torch") -> Path:
    if fmt not in FORMATS:
        raise ValueError(f"unknown cache format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    return paths.artifacts_dir() / kind / (content_key(params) + _EXTENSIONS[fmt])


def _save(obj: Any, path: Path, fmt: str) -> None:
    with atomic.atomic_path(path) as tmp:
        if fmt == "torch":
            import torch

            torch.save(obj, tmp)
        elif fmt == "npz":
            with open(tmp, "wb") as fh:
                np.savez(fh, **obj)
        else:
            tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))


def _load(path: Path, fmt: str) -> Any:
    if fmt == "torch":
        import torch

        return torch.load(path, map_location="cpu", weights_only=True)
    if fmt == "npz":
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    return json.loads(path.read_text())


def load(kind: str, params: Mapping[str, Any], fmt: str = "torch") -> Any | None:
    """The cached artifact, or ``None`` on a miss or an unreadable file (with a warning)."""
    path = cache_path(kind, params, fmt)
    if not path.exists():
        return None
    try:
        return _load(path, fmt)
    except Exception as exc:  # any failure to read means the file cannot be trusted
        warnings.warn(
            f"cache file {path} is unreadable ({type(exc).__name__}: {exc}); rebuilding it",
            CacheWarning,
            stacklevel=2,
        )
        return None


def save(kind: str, params: Mapping[str, Any], obj: Any, fmt: str = "torch") -> Path:
    """Store ``obj`` atomically, with a manifest of ``params`` beside it."""
    path = cache_path(kind, params, fmt)
    _save(obj, path, fmt)
    manifest = {"kind": kind, "key": content_key(params), "params": _canonical(params)}
    atomic.write_text(path.with_suffix(".params.json"), json.dumps(manifest, indent=1))
    return path


def cached(
    kind: str,
    params: Mapping[str, Any],
    build: Callable[[], Any],
    fmt: str = "torch",
) -> Any:
    """Return the artifact for ``params``, building and storing it on a miss.

    ``build`` is called only on a miss (or a corrupt file). If it raises, nothing is written.
    """
    hit = load(kind, params, fmt)
    if hit is not None:
        return hit
    obj = build()
    save(kind, params, obj, fmt)
    return obj
