"""What exists: ``python -m tamperbench list``.

Notebooks with their parameters, profiles, attacks with their budgets and valid ranges,
detectors with their parameters, datasets with their roles, OOD benchmarks and perturbations. Read from the registries
themselves, so it never drifts from the code.
"""

from __future__ import annotations

import inspect

from . import adaptive, attacks, config, data, detectors, model_tampering, openood, perturbations


def _detector_parameters(name: str) -> str:
    factory = detectors.DETECTORS[name]
    target = getattr(factory, "func", factory)  # functools.partial for the pytorch-ood family
    skip = {"self", "kw", "kwargs"} | ({"method"} if hasattr(factory, "func") else set())  # pytorch-ood's method is the name
    params = {}  # name → "name=default", subclass first, each name once
    for cls in getattr(target, "__mro__", [target]):
        init = cls.__dict__.get("__init__") if isinstance(cls, type) else cls
        if init is None:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.name not in skip and p.name not in params and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                params[p.name] = f"{p.name}={p.default!r}" if p.default is not p.empty else p.name
    return ", ".join(params.values())


def describe(cfg: config.StudyConfig | None = None) -> str:
    cfg = cfg or config.load()
    lines = ["NOTEBOOKS (parameters, with their value in the default profile; shared ones are set for all)"]
    lines.append("  shared: " + ", ".join(f"{k} ({config._names(t)})" for k, t in config.SHARED_TYPES.items()))
    for name, declared in cfg.notebooks.items():
        values = {**config.notebook_defaults(config.NOTEBOOKS_DIR / f"{name}{config.NOTEBOOK_SUFFIX}"),
                  **cfg.parameters(cfg.default_profile, name)}
        own = [f"{k}={values.get(k)!r}" for k in declared if k not in config.RUNNER_KEYS]
        lines.append(f"  {name}: " + (", ".join(own) if own else "(shared parameters only)"))
    lines.append("")
    lines.append(f"PROFILES (default: {cfg.default_profile}): " + ", ".join(cfg.profiles))
    lines.append("")
    lines.append("ATTACKS (budget parameter = default [valid range])")
    for name, spec in attacks.ATTACKS.items():
        budget = ", ".join(f"{k}={p.default!r}" + (f" [{p.rule}]" if p.rule else "") for k, p in spec.budget.items())
        lines.append(f"  {name} ({spec.box} box, ART {spec.art_class}): {budget}")
    lines.append("")
    lines.append("DETECTORS (parameters; * = supervised: fits on adversarial examples too)")
    for name in detectors.available():
        star = " *" if name in detectors.SUPERVISED else ""
        lines.append(f"  {name}{star}: {_detector_parameters(name)}")
    lines.append("")
    lines.append("DATASETS (role: id = a classifier is trained on it, ood = a shift or outlier set)")
    for name in data.available():
        spec = data.DATASETS[name]
        lines.append(f"  {name} [{spec.role}]: {spec.description}")
    lines.append("")
    lines.append("OOD BENCHMARKS (ID dataset: group = sets; chapter 6, tamperbench.openood)")
    for id_name, groups in openood.BENCHMARKS.items():
        lines.append(f"  {id_name}: " + "; ".join(f"{g} = {', '.join(sets)}" for g, sets in groups.items()))
    lines.append("")
    lines.append("PERTURBATIONS (magnitude; the CODE sweeps and the covariate-shift sets)")
    for name, meaning in perturbations.KINDS.items():
        lines.append(f"  {name}: {meaning}")
    lines.append("")
    lines.append("ADAPTIVE ATTACKS (chapter 7, tamperbench.adaptive; run as a cascade in this order, naive apart)")
    lines.append("  " + ", ".join(adaptive.BATTERY) + "; naive (λ-weighted loss)")
    lines.append("")
    lines.append("MODEL TAMPERING (chapter 8, tamperbench.model_tampering)")
    lines.append("  tamperings: " + ", ".join(model_tampering.TAMPERINGS))
    lines.append("  marker strategies: " + ", ".join(model_tampering.MARKERS))
    return "\n".join(lines)
