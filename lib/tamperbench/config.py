"""The study configuration: the top-level ``_config.yml``.

Layout::

    shared:            # written once, injected into every notebook
      seed: 0
      dataset: fashion_mnist
      ...
    default_profile: cpu
    profiles:
      ci:              # tiny: the smoke test
        shared: {epochs: 1}          # optional overrides of shared values
        01_classifier: {n_show: 4}   # one block per notebook: its parameters
      cpu: {...}
      gpu: {...}

The valid parameters of a notebook are those of its Papermill ``parameters`` cell; their
defaults (or annotations) give their types. Any unknown key or wrong type is a
:class:`ConfigError` that names it and lists the valid choices.
"""

from __future__ import annotations

import ast
import copy
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import yaml

from . import paths

CONFIG_PATH = paths.REPO_ROOT / "_config.yml"
NOTEBOOKS_DIR = paths.REPO_ROOT / "notebooks"

#: Shared parameters and their types. Classifier training lives here because every chapter
#: reloads the same cached classifier, so they must all agree on how it was trained.
SHARED_TYPES: dict[str, tuple[type, ...]] = {
    "seed": (int,),
    "device": (str,),
    "dataset": (str,),
    "model": (str,),
    "epochs": (int,),
    "batch_size": (int,),
    "lr": (float,),
    "n_train": (int, type(None)),
    # the attack suite: a pool of correctly classified test images, and per attack the number
    # of pool images it attacks and its budget. Chapters after 02 reuse its cached records.
    "n_pool": (int,),
    "attack_suite": (dict,),
    # PARTICUL's settings (chapter 3; later chapters reuse the fitted detector from the cache),
    # and the grid of layers and part counts its default configuration is chosen from
    "particul": (dict,),
    "particul_search": (dict,),
    # the combined detectors (chapters 4, 5, 7): members, candidates, method, calibration images
    "combination": (dict,),
}
#: Shared values a study may leave out: their defaults live with the code that reads them
#: (``combination``: :data:`tamperbench.combination.DEFAULTS`).
OPTIONAL_SHARED = ("combination",)
#: Every notebook declares these; the others are injected where a notebook declares them.
REQUIRED_SHARED = ("seed", "device", "dataset", "model", "epochs", "batch_size", "lr", "n_train")
TOP_KEYS = ("shared", "default_profile", "profiles", "sweeps")
#: The keys of one sweep in the ``sweeps:`` section (see :mod:`tamperbench.sweep`).
SWEEP_KEYS = ("profile", "grid", "parameters", "notebooks", "resources")
#: Injected by the runner into every notebook, never set in the file.
RUNNER_KEYS = ("profile",)


class ConfigError(ValueError):
    """The study configuration or an override is invalid."""


def _type_ok(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in types:
        return False  # YAML's true/false must not pass as an int
    if isinstance(value, int) and float in types:
        return True
    return isinstance(value, types)


def _names(types: tuple[type, ...]) -> str:
    return " or ".join("None" if t is type(None) else t.__name__ for t in types)


_ANNOTATIONS = {"int": int, "float": float, "str": str, "bool": bool, "None": type(None), "list": list, "dict": dict}


def _types_from(annotation: ast.expr | None, default: Any) -> tuple[type, ...]:
    """Allowed types of a parameter: its annotation (``int | None``) or its default's type."""
    if annotation is not None:
        text = ast.unparse(annotation).replace("Optional[", "").replace("]", " | None")
        types = tuple(_ANNOTATIONS[a.strip()] for a in text.split("|") if a.strip() in _ANNOTATIONS)
        if types:
            return types
    if default is not None and type(default) in _ANNOTATIONS.values():
        return (type(default),)
    return (object,)  # None or an expression: the notebook accepts whatever it is given


@lru_cache(maxsize=64)
def _parameters_cell(path: str, mtime: float) -> dict[str, tuple[tuple[type, ...], Any]]:
    """name → (allowed types, default) for each assignment of the notebook's ``parameters`` cell."""
    nb = read_notebook(Path(path))
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    if not cells:
        raise ConfigError(f"{Path(path).name} has no cell tagged 'parameters'")
    out = {}
    for node in ast.parse(cells[0].source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name, annotation, value = node.targets[0].id, None, node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            name, annotation, value = node.target.id, node.annotation, node.value
        else:
            continue
        try:
            default = ast.literal_eval(value)
        except ValueError:
            default = object()
        out[name] = (_types_from(annotation, default), default)
    return out


def _notebook_parameters_cached(path: str, mtime: float) -> dict[str, tuple[type, ...]]:
    return {name: types for name, (types, _) in _parameters_cell(path, mtime).items()}


def notebook_defaults(path: Path) -> dict[str, Any]:
    """The default value of each parameter in a notebook's ``parameters`` cell."""
    return {name: default for name, (_, default) in _parameters_cell(str(path), path.stat().st_mtime).items()}


def notebook_parameters(path: Path) -> dict[str, tuple[type, ...]]:
    """The parameters declared in a notebook's ``parameters`` cell, with their allowed types."""
    return _notebook_parameters_cached(str(path), path.stat().st_mtime)


#: The notebooks' source format: MyST Markdown notebooks (jupytext's ``md:myst``). Prose is
#: plain Markdown and code sits in ``{code-cell}`` blocks, so a markdown cell cannot end up
#: as commented-out lines, and a diff reads like a diff of text.
NOTEBOOK_SUFFIX = ".md"


def read_notebook(path: Path):
    """A notebook source (MyST Markdown, or ``.ipynb``) as an nbformat notebook."""
    import jupytext

    try:
        return jupytext.read(path)
    except Exception as exc:  # jupytext raises many types on malformed sources
        raise ConfigError(f"cannot read notebook {Path(path).name}: {exc}") from exc


def list_notebooks(notebooks_dir: Path = NOTEBOOKS_DIR) -> list[Path]:
    """The study's notebooks in reading order (``NN_name.md``)."""
    return sorted(p for p in Path(notebooks_dir).glob(f"[0-9][0-9]_*{NOTEBOOK_SUFFIX}"))


def parse_value(text: str) -> Any:
    """Parse a command-line value as YAML: ``3`` → int, ``0.1`` → float, ``null`` → None."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


@dataclass
class StudyConfig:
    shared: dict
    default_profile: str
    profiles: dict
    notebooks: dict[str, dict[str, tuple[type, ...]]]  # name → its declared parameters
    shared_declared: dict[str, list[str]]  # name → the optional shared parameters it declares
    sweeps: dict = None  # name → its block of the ``sweeps:`` section (checked in full by tamperbench.sweep)

    def check_profile(self, profile: str) -> str:
        if profile not in self.profiles:
            raise ConfigError(f"unknown profile {profile!r}; valid profiles: {', '.join(self.profiles)}")
        return profile

    def parameters(self, profile: str, notebook: str, overrides: Mapping[str, Any] | None = None) -> dict:
        """The parameters Papermill injects into ``notebook`` under ``profile`` and ``overrides``.

        An override key may be dotted (``attack_suite.fgsm.eps``): it changes that one nested
        value and keeps the rest. Every value is validated here, nested ones included, so a bad
        one fails before any kernel starts.
        """
        self.check_profile(profile)
        if notebook not in self.notebooks:
            raise ConfigError(f"unknown notebook {notebook!r}; valid notebooks: {', '.join(self.notebooks)}")
        declared = self.notebooks[notebook]
        params = self._merged(profile, notebook, overrides, lambda root: root in SHARED_TYPES or root in declared)
        wanted = set(REQUIRED_SHARED) | set(self.shared_declared[notebook])
        params = {k: v for k, v in params.items() if k not in SHARED_TYPES or k in wanted}
        for key, value in params.items():
            types = SHARED_TYPES.get(key) or declared.get(key, (object,))
            if not _type_ok(value, types):
                raise ConfigError(f"parameter {key!r} of {notebook} must be {_names(types)}, got {value!r}")
        _check_shared({k: v for k, v in params.items() if k in SHARED_TYPES}, f"{notebook} ({profile})", require_all=False)
        _check_names({k: v for k, v in params.items() if k not in SHARED_TYPES}, f"{notebook} ({profile})")
        if "detector_params" in params:
            _check_detector_params(params["detector_params"], f"{notebook} ({profile})")
        return params

    def _merged(self, profile: str, notebook: str | None, overrides: Mapping[str, Any] | None, accepts) -> dict:
        """Shared values, then the profile's shared block and notebook block, then the overrides
        whose root key ``accepts`` (dotted keys set one nested value); a deep copy."""
        prof = self.profiles[profile] or {}
        params = copy.deepcopy({"profile": profile, **self.shared, **prof.get("shared", {}), **prof.get(notebook, {})})
        for key, value in (overrides or {}).items():
            if accepts(key.split(".", 1)[0]):
                set_dotted(params, key, value)
        return params

    def check_overrides(self, overrides: Mapping[str, Any], notebooks: list[str]) -> None:
        valid = set(SHARED_TYPES).union(*(self.notebooks[n] for n in notebooks)) - set(RUNNER_KEYS)
        for key in overrides:
            if key.split(".", 1)[0] not in valid:
                raise ConfigError(f"unknown parameter {key!r} for {', '.join(notebooks)}; valid parameters: {', '.join(sorted(valid))}")


def set_dotted(params: dict, key: str, value: Any) -> None:
    """Set ``params[a][b][c] = value`` for ``key = "a.b.c"``, creating missing mappings below ``a``."""
    *path, last = key.split(".")
    node = params
    for i, part in enumerate(path):
        if part not in node:
            if i == 0:
                raise ConfigError(f"unknown parameter {part!r}")
            node[part] = {}
        if not isinstance(node[part], dict):
            raise ConfigError(f"cannot set {key!r}: {'.'.join(path[: i + 1])} is {node[part]!r}, not a mapping")
        node = node[part]
    node[last] = value


#: Notebook parameters that name things of a registry: validated before any kernel starts.
NAMED_PARAMETERS = {
    "unsupervised": "detector", "supervised": "detector", "detector_params": "detector",
    "ood_sets": "dataset", "near_ood": "dataset", "far_ood": "dataset",
    "openood_methods": "detector", "adaptive_detectors": "detector", "openood_candidates": "detector", "covariate": "perturbation",
    "curve_attacks": "attack", "explain_attacks": "attack", "subset_attacks": "attack", "transfer_attacks": "attack",
}


def registry(kind: str) -> list[str]:
    """The valid names of ``kind``: attack, detector, dataset, model or perturbation."""
    from . import attacks, data, detectors, models, perturbations

    return {"attack": attacks.available, "detector": detectors.available, "dataset": data.available,
            "model": models.available, "perturbation": perturbations.available}[kind]()


def _check_names(params: Mapping[str, Any], where: str) -> None:
    for key, kind in NAMED_PARAMETERS.items():
        if key in params and isinstance(params[key], (list, dict)):
            valid = registry(kind)
            for name in params[key]:
                if name not in valid:
                    raise ConfigError(f"{where}: {key} names unknown {kind} {name!r}; valid {kind}s: {', '.join(valid)}")


def _check_detector_params(block: Any, where: str) -> None:
    """Each detector's parameters as its constructor checks them (unknown keys, types, ranges),
    on the CPU, so a typo fails here and not inside a chapter."""
    from .detectors import DetectorError, detector

    if not isinstance(block, dict):
        raise ConfigError(f"{where}: detector_params must be a mapping of detector name to its parameters, got {block!r}")
    for name, params in block.items():
        if not isinstance(params, dict):
            raise ConfigError(f"{where}: detector_params.{name} must be a mapping of parameter to value, got {params!r}")
        try:
            detector(name, **{**params, "device": "cpu"})
        except DetectorError as exc:
            raise ConfigError(f"{where}: detector_params.{name}: {str(exc).removeprefix(name + ': ')}") from exc


def _check_attack_suite(suite: dict, where: str) -> None:
    from . import attacks

    for name, entry in suite.items():
        if name not in attacks.ATTACKS:
            raise ConfigError(f"{where}: unknown attack {name!r}; valid attacks: {', '.join(attacks.available())}")
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}.{name} must be a mapping (n and budget parameters)")
        budget = {k: v for k, v in entry.items() if k != "n"}
        if "n" in entry and (not _type_ok(entry["n"], (int,)) or entry["n"] < 1):
            raise ConfigError(f"{where}.{name}.n must be an int ≥ 1, got {entry['n']!r}")
        try:
            attacks.resolve_budget(name, budget, input_dim=10**6)  # the L2 range is checked at run time
        except attacks.AttackError as exc:
            raise ConfigError(f"{where}.{name}: {exc}") from exc


def _check_shared(block: Any, where: str, require_all: bool) -> dict:
    if not isinstance(block, dict):
        raise ConfigError(f"{where} must be a mapping of parameters; valid keys: {', '.join(SHARED_TYPES)}")
    for key, value in block.items():
        if key not in SHARED_TYPES:
            raise ConfigError(f"unknown key {key!r} in {where}; valid keys: {', '.join(SHARED_TYPES)}")
        if not _type_ok(value, SHARED_TYPES[key]):
            raise ConfigError(f"{where}.{key} must be {_names(SHARED_TYPES[key])}, got {value!r}")
    if "attack_suite" in block:
        _check_attack_suite(block["attack_suite"], f"{where}.attack_suite")
    if "particul" in block:
        from .detectors import DetectorError, detector

        try:
            detector("particul", device="cpu", **block["particul"])
        except DetectorError as exc:
            raise ConfigError(f"{where}.particul: {exc}") from exc
    if "particul_search" in block:
        from .detectors import DetectorError
        from .particul_search import check_search

        try:
            search = check_search(block["particul_search"])
        except DetectorError as exc:
            raise ConfigError(f"{where}.particul_search: {exc}") from exc
        if isinstance(block.get("attack_suite"), dict) and block["attack_suite"] and search["selection_attack"] not in block["attack_suite"]:
            raise ConfigError(f"{where}.particul_search.selection_attack {search['selection_attack']!r} is not in the "
                              f"attack suite; valid: {', '.join(block['attack_suite'])}")
    if "combination" in block:
        from .combination import CombinationError, settings

        try:
            combo = settings(block["combination"])
        except CombinationError as exc:
            raise ConfigError(f"{where}.combination: {exc}") from exc
        suite_names = block.get("attack_suite") if isinstance(block.get("attack_suite"), dict) else {}
        stray = [a for a in combo["selection_attacks"] or [] if suite_names and a not in suite_names]
        if stray:
            raise ConfigError(f"{where}.combination.selection_attacks {stray} are not in the attack suite; "
                              f"valid: {', '.join(suite_names)}")
    if require_all:
        missing = [k for k in SHARED_TYPES if k not in block and k not in OPTIONAL_SHARED]
        if missing:
            raise ConfigError(f"{where} lacks {', '.join(missing)}; it must set: {', '.join(k for k in SHARED_TYPES if k not in OPTIONAL_SHARED)}")
    from . import data, models

    for key, registry in (("dataset", data.available()), ("model", models.available())):
        if key in block and block[key] not in registry:
            raise ConfigError(f"{where}.{key}: unknown {key} {block[key]!r}; valid choices: {', '.join(registry)}")
    return block


def load(path: Path = CONFIG_PATH, notebooks_dir: Path = NOTEBOOKS_DIR) -> StudyConfig:
    """Read and validate the study configuration against the notebooks' parameters cells."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"study configuration {path} not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must be a mapping with keys: {', '.join(TOP_KEYS)}")
    for key in raw:
        if key not in TOP_KEYS:
            raise ConfigError(f"unknown key {key!r} in {path.name}; valid keys: {', '.join(TOP_KEYS)}")
    shared = _check_shared(raw.get("shared", {}), "shared", require_all=True)

    notebooks, shared_declared = {}, {}
    for nb in list_notebooks(notebooks_dir):
        declared = notebook_parameters(nb)
        shared_declared[nb.stem] = [k for k in SHARED_TYPES if k in declared and k not in REQUIRED_SHARED]
        missing = [k for k in (*REQUIRED_SHARED, *RUNNER_KEYS) if k not in declared]
        if missing:
            raise ConfigError(f"the parameters cell of {nb.name} lacks {', '.join(missing)} (every notebook declares the shared parameters)")
        notebooks[nb.stem] = {k: v for k, v in declared.items() if k not in SHARED_TYPES}

    profiles = raw.get("profiles")
    if not isinstance(profiles, dict) or not profiles:
        raise ConfigError(f"{path.name} needs a 'profiles' mapping (for example ci, cpu, gpu)")
    for name, prof in profiles.items():
        prof = prof or {}
        if not isinstance(prof, dict):
            raise ConfigError(f"profile {name!r} must be a mapping")
        for key, block in prof.items():
            where = f"profiles.{name}.{key}"
            if key == "shared":
                _check_shared(block, where, require_all=False)
                continue
            if key not in notebooks:
                raise ConfigError(f"unknown key {key!r} in profile {name!r}; valid keys: shared, {', '.join(notebooks)}")
            if not isinstance(block, dict):
                raise ConfigError(f"{where} must be a mapping of parameters; valid keys: {', '.join(sorted(notebooks[key]))}")
            valid = {k: v for k, v in notebooks[key].items() if k not in RUNNER_KEYS}
            for pkey, value in block.items():
                if pkey not in valid:
                    raise ConfigError(f"unknown parameter {pkey!r} in {where}; valid parameters: {', '.join(sorted(valid))}")
                if not _type_ok(value, valid[pkey]):
                    raise ConfigError(f"{where}.{pkey} must be {_names(valid[pkey])}, got {value!r}")
            _check_names(block, where)
    default = raw.get("default_profile", "cpu")
    if default not in profiles:
        raise ConfigError(f"default_profile {default!r} is not a profile; valid profiles: {', '.join(profiles)}")
    sweeps = raw.get("sweeps") or {}
    if not isinstance(sweeps, dict):
        raise ConfigError(f"'sweeps' in {path.name} must map sweep names to their blocks (keys: {', '.join(SWEEP_KEYS)})")
    for name, block in sweeps.items():
        if not isinstance(block, dict):
            raise ConfigError(f"sweep {name!r} must be a mapping; valid keys: {', '.join(SWEEP_KEYS)}")
        for key in block:
            if key not in SWEEP_KEYS:
                raise ConfigError(f"unknown key {key!r} in sweep {name!r}; valid keys: {', '.join(SWEEP_KEYS)}")
        if "profile" in block and block["profile"] not in profiles:
            raise ConfigError(f"sweep {name!r}: unknown profile {block['profile']!r}; valid profiles: {', '.join(profiles)}")
    return StudyConfig(shared, default, profiles, notebooks, shared_declared, sweeps)


def study(profile: str | None = None, overrides: Mapping[str, Any] | None = None, path: Path = CONFIG_PATH) -> dict:
    """The shared parameters of ``profile`` (default: the config's default profile), as the
    book's chapters get them: library code called with these hits the book's cache."""
    cfg = load(path)
    profile = cfg.check_profile(profile or cfg.default_profile)
    for key in overrides or {}:
        if key.split(".", 1)[0] not in SHARED_TYPES:
            raise ConfigError(f"unknown shared parameter {key!r}; valid: {', '.join(SHARED_TYPES)}")
    params = cfg._merged(profile, None, overrides, lambda root: True)
    _check_shared({k: v for k, v in params.items() if k in SHARED_TYPES}, f"study ({profile})", require_all=True)
    return params
