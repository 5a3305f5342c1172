"""Grid configuration: one typed object, loaded from an ablation YAML and checked in full.

A grid YAML names the store, the axes whose cartesian product gives the cells, the per-cell
search space and the fixed training settings. Every problem in a file is collected and reported
in one error (key path, bad value, what is allowed) before Ray or MLflow is touched.

    from study.config import load_grid
    grid = load_grid("ablations/demo.yaml")
    for cell in grid.cells(): print(cell.name)

The types and allowed values live in study/grid_schema.py (re-exported here); this module
reads YAML and checks it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import yaml

from study.cell_axes import check_axis_settings
from study.config_batches import explicit_batch_problem
from study.grid_schema import (ADJUST_FOR, BMI_STRATA, DISTRIBUTIONS, FREEZE_MODES, GRID_AXES, MEASURES,  # noqa: F401 (re-exported)
                               OPTIMIZERS, PROTOCOLS, SCHEDULERS, SELECT_ON, SEXES, SMALL_CELLS, THRESHOLD_FITS,
                               THRESHOLDS, Cell, GridConfig, GridError, ResourcesConfig, SearchParam, SplitConfig,
                               TrainConfig)

class _GridLoader(yaml.SafeLoader):
    """YAML 1.1's SafeLoader, but `1e-3` is a number (YAML 1.2 and everyone's intuition).

    PyYAML only reads exponents with a dot (`1.0e-3`) as floats; `lr: 1e-3` would otherwise
    arrive as the string "1e-3" and be refused.
    """


_GridLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                 |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                 |\.[0-9_]+(?:[eE][-+][0-9]+)?
                 |[-+]?\.(?:inf|Inf|INF)
                 |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def load_yaml(text: str):
    """Parse grid YAML (or a --set value) with numbers such as 1e-3 read as numbers."""
    return yaml.load(text, Loader=_GridLoader)  # noqa: S506 - a SafeLoader subclass


_TOP_KEYS = {f.name for f in dataclasses.fields(GridConfig)} - {"source"}
_REQUIRED = ("question", "store", "grid")


def _check_keys(section: dict, allowed: set[str], where: str, errors: list[str]) -> None:
    for key in section:
        if key not in allowed:
            errors.append(f"{where}: unknown key {key!r}; allowed: {', '.join(sorted(allowed))}")


def _typed_section(cls, raw: Any, where: str, errors: list[str]):
    """Build a frozen dataclass from a mapping, recording unknown keys and wrong types."""
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        errors.append(f"{where}: expected a mapping, got {type(raw).__name__}")
        return cls()
    fields_ = {f.name: f for f in dataclasses.fields(cls)}
    _check_keys(raw, set(fields_), where, errors)
    kwargs = {}
    defaults = cls()
    for key, value in raw.items():
        if key not in fields_:
            continue
        default = getattr(defaults, key)
        kwargs[key] = _coerce(value, default, f"{where}.{key}", errors)
    return cls(**kwargs)


def _coerce(value: Any, default: Any, where: str, errors: list[str]) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            errors.append(f"{where}: expected true/false, got {value!r}")
        return value
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"{where}: expected a number, got {value!r}")
            return default
        return value
    if where.endswith("input_size"):
        if value is None:
            return None
        if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value)):
            errors.append(f"{where}: expected [rows, cols] positive integers or null, got {value!r}")
            return None
        return tuple(value)
    if where.endswith("slices_per_subject") or where.endswith("max_concurrent_per_cell"):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            errors.append(f"{where}: expected a positive integer or null, got {value!r}")
            return None
        return value
    if isinstance(default, str) and not isinstance(value, str):
        errors.append(f"{where}: expected a string, got {value!r}")
        return default
    return value


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# What each searchable training setting accepts, for fixed values and for every searched value.
VALUE_RULES: dict[str, tuple[Any, str]] = {
    "lr": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "momentum": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "weight_decay": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "batch_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "epochs": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "freeze": (lambda v: v in FREEZE_MODES, f"one of {', '.join(FREEZE_MODES)}"),
    "optimizer": (lambda v: v in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}"),
}
# distributions each setting may be searched with (choice always works)
_KINDS = {"lr": ("loguniform", "uniform"), "momentum": ("uniform",), "weight_decay": ("loguniform", "uniform"),
          "batch_size": ("int",), "epochs": ("int",)}


def _parse_search(raw: Any, errors: list[str]) -> tuple[SearchParam, ...]:
    if not isinstance(raw, dict) or not raw:
        errors.append("search: expected a mapping of training settings to distributions, e.g. "
                      "lr: {loguniform: [1.0e-5, 1.0e-2]}")
        return ()
    searchable = set(VALUE_RULES)
    params = []
    for name, spec in raw.items():
        where = f"search.{name}"
        if name not in searchable:
            errors.append(f"{where}: cannot be searched; searchable: {', '.join(sorted(searchable))}")
            continue
        if not isinstance(spec, dict) or len(spec) != 1:
            errors.append(f"{where}: expected one distribution {{kind: values}}, kinds: {', '.join(DISTRIBUTIONS)}")
            continue
        kind, values = next(iter(spec.items()))
        if kind not in DISTRIBUTIONS:
            errors.append(f"{where}: unknown distribution {kind!r}; allowed: {', '.join(DISTRIBUTIONS)}")
            continue
        if not isinstance(values, list) or not values:
            errors.append(f"{where}.{kind}: expected a non-empty list, got {values!r}")
            continue
        if kind in ("loguniform", "uniform", "int"):
            ok = len(values) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            if not ok or values[0] >= values[1] or (kind == "loguniform" and values[0] <= 0):
                errors.append(f"{where}.{kind}: expected [low, high] with low < high"
                              f"{' and low > 0' if kind == 'loguniform' else ''}, got {values!r}")
                continue
        if kind != "choice" and kind not in _KINDS.get(name, ()):
            allowed = ", ".join(("choice", *_KINDS.get(name, ())))
            errors.append(f"{where}: {name} cannot be searched with {kind}; allowed: {allowed}")
            continue
        ok, what = VALUE_RULES[name]
        bad = [v for v in values if not ok(v)]
        if bad:
            errors.append(f"{where}.{kind}: {name} must be {what}; got {', '.join(map(repr, bad))}")
            continue
        if kind == "choice" and len(set(map(repr, values))) != len(values):
            errors.append(f"{where}.choice: duplicate values in {values!r}")
            continue
        params.append(SearchParam(name=name, kind=kind, values=tuple(values)))
    return tuple(params)


def _parse_grid(raw: Any, errors: list[str]) -> dict[str, tuple[str, ...]]:
    if not isinstance(raw, dict) or not raw:
        errors.append(f"grid: expected a mapping of axes to value lists; axes: {', '.join(GRID_AXES)}")
        return {}
    grid: dict[str, tuple[str, ...]] = {}
    for axis, values in raw.items():
        if axis not in GRID_AXES:
            errors.append(f"grid: unknown axis {axis!r}; allowed: {', '.join(GRID_AXES)}")
            continue
        if isinstance(values, str):
            values = [values]
        if not isinstance(values, list) or not values:
            errors.append(f"grid.{axis}: expected a non-empty list, got {values!r}")
            continue
        allowed = GRID_AXES[axis]
        for v in values:
            if not isinstance(v, str):
                errors.append(f"grid.{axis}: value {v!r} must be a string (quote BMI strata like \"<25\", "
                              "input sizes like \"64x128\")")
            elif allowed is not None and v not in allowed:
                errors.append(f"grid.{axis}: unknown value {v!r}; allowed: {', '.join(allowed)}")
        if len(set(map(str, values))) != len(values):
            errors.append(f"grid.{axis}: duplicate values in {values!r}")
        grid[axis] = tuple(str(v) for v in values)
    for axis in ("cohort", "measure"):
        if axis not in grid and not any(e.startswith(f"grid.{axis}") for e in errors):
            errors.append(f"grid: axis {axis!r} is required")
    return grid


def parse_grid(raw: Any, *, source: str = "<dict>") -> GridConfig:
    """Validate a loaded YAML mapping and return the typed grid; raise GridError listing all problems."""
    errors: list[str] = []
    if not isinstance(raw, dict):
        raise GridError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    _check_keys(raw, _TOP_KEYS, "top level", errors)
    for key in _REQUIRED:
        if key not in raw:
            errors.append(f"top level: required key {key!r} is missing")
    grid = _parse_grid(raw.get("grid"), errors)
    search = _parse_search(raw.get("search"), errors)
    train = _typed_section(TrainConfig, raw.get("train"), "train", errors)
    split = _typed_section(SplitConfig, raw.get("split"), "split", errors)
    resources = _typed_section(ResourcesConfig, raw.get("resources_per_trial"), "resources_per_trial", errors)

    train_raw = raw.get("train") if isinstance(raw.get("train"), dict) else {}
    for name, (ok, what) in VALUE_RULES.items():
        value = getattr(train, name)
        if name in train_raw and not ok(value) and not (name in ("epochs", "batch_size")
                                                        and _is_number(value) and value == int(value) and ok(int(value))):
            errors.append(f"train.{name}: expected {what}, got {value!r}")
    weights = train.weights
    if isinstance(weights, str) and weights not in ("none", "imagenet"):
        if not Path(weights).is_file():
            errors.append(f"train.weights: {weights!r} is neither 'none', 'imagenet' nor an existing .pth file")
    protocol = raw.get("protocol", "holdout")
    if protocol not in PROTOCOLS:
        errors.append(f"protocol: unknown value {protocol!r}; allowed: {', '.join(PROTOCOLS)}")
    if protocol == "nested_cv":
        if isinstance(split.folds, bool) or not isinstance(split.folds, int) or split.folds < 2:
            errors.append(f"split.folds: protocol nested_cv needs an integer >= 2, got {split.folds!r}")
        if raw.get("scheduler", "none") != "none":
            errors.append("scheduler: protocol nested_cv reports once per fold, so early stopping "
                          "(asha) cannot compare epochs; use scheduler: none")
    for name, frac in (("split.val", split.val), ("split.test", split.test)):
        if name == "split.val" and protocol == "nested_cv":
            continue  # the folds play the validation set's part
        if name == "split.test" and protocol == "seed_replication":
            if frac != 0:
                errors.append(f"split.test: protocol seed_replication has no test set (the seed reported "
                              f"validation accuracy); set split.test: 0, got {frac!r}")
        elif isinstance(frac, (int, float)) and not 0 < frac < 1:
            errors.append(f"{name}: expected a fraction in (0, 1), got {frac!r}"
                          + ("; split.test: 0 is only allowed with protocol: seed_replication" if frac == 0 else ""))
    if isinstance(split.val, (int, float)) and isinstance(split.test, (int, float)) and split.val + split.test >= 0.8:
        errors.append(f"split: val + test = {split.val + split.test:.2f} leaves under 20% for training")
    if resources.cpu is not None and isinstance(resources.cpu, (int, float)) and resources.cpu <= 0:
        errors.append(f"resources_per_trial.cpu: expected > 0, got {resources.cpu!r}")

    threshold = raw.get("threshold", "cohort")
    if threshold not in THRESHOLDS:
        errors.append(f"threshold: unknown value {threshold!r}; allowed: {', '.join(THRESHOLDS)}")
    threshold_fit = raw.get("threshold_fit", "train")
    if threshold_fit not in THRESHOLD_FITS:
        errors.append(f"threshold_fit: unknown value {threshold_fit!r}; allowed: {', '.join(THRESHOLD_FITS)}")
    scheduler = raw.get("scheduler", "none")
    if scheduler not in SCHEDULERS:
        errors.append(f"scheduler: unknown value {scheduler!r}; allowed: {', '.join(SCHEDULERS)}")
    ints = {"trials_per_cell": 1, "optuna_startup_trials": 0, "min_subjects_per_cell": 6, "trial_retries": 0,
            "min_test_per_class": 1}
    for key, low in ints.items():
        v = raw.get(key, getattr(GridConfig, key, None))
        if key in raw and (isinstance(v, bool) or not isinstance(v, int) or v < low):
            errors.append(f"{key}: expected an integer >= {low}, got {v!r}")
    cpt = raw.get("configs_per_trial", "auto")
    if cpt != "auto" and (isinstance(cpt, bool) or not isinstance(cpt, int) or cpt < 1):
        errors.append(f"configs_per_trial: expected 'auto' or an integer >= 1, got {cpt!r}")
    shared_tune_run = raw.get("shared_tune_run", "auto")
    if shared_tune_run not in ("auto", True, False):
        errors.append(f"shared_tune_run: expected 'auto', true or false, got {shared_tune_run!r}")
    elif shared_tune_run is True and (scheduler != "none" or protocol == "nested_cv"):
        errors.append(f"shared_tune_run: true needs scheduler none and protocol holdout or seed_replication (got scheduler "
                      f"{scheduler!r}, protocol {protocol!r}): cells in one Tune run share its scheduler, and a "
                      "nested-CV cell is one search per outer fold")
    mc = _coerce(raw.get("max_concurrent_per_cell"), None, "max_concurrent_per_cell", errors)
    interval = raw.get("checkpoint_interval_s", GridConfig.checkpoint_interval_s)
    if not _is_number(interval) or interval < 0:
        errors.append(f"checkpoint_interval_s: expected a number of seconds >= 0 (0: every epoch), got {interval!r}")
    statistics = _parse_statistics(raw, split, protocol, threshold_fit, errors)
    statistics.update(check_axis_settings(raw, grid, search, protocol, errors))
    for key in ("question", "store"):
        if key in raw and (not isinstance(raw[key], str) or not raw[key].strip()):
            errors.append(f"{key}: expected a non-empty string, got {raw[key]!r}")
    name = raw.get("name", Path(source).stem if source != "<dict>" else "grid")
    if not isinstance(name, str) or not name:
        errors.append(f"name: expected a non-empty string, got {name!r}")

    if errors:
        raise GridError(f"{source}: {len(errors)} problem(s) in the grid file:\n  - " + "\n  - ".join(errors))

    parsed = GridConfig(  # paths (store, weights) are relative to the working directory, like CLI paths
        question=raw["question"].strip(), name=name, store=raw["store"], grid=grid, search=search,
        protocol=protocol, threshold=threshold, threshold_fit=threshold_fit, trials_per_cell=raw.get("trials_per_cell", 8),
        max_concurrent_per_cell=mc, scheduler=scheduler,
        optuna_startup_trials=raw.get("optuna_startup_trials", 3), configs_per_trial=cpt, shared_tune_run=shared_tune_run,
        min_subjects_per_cell=raw.get("min_subjects_per_cell", 20), **statistics,
        checkpoint_interval_s=float(interval), trial_retries=raw.get("trial_retries", 1),
        train=dataclasses.replace(train, epochs=int(train.epochs), batch_size=int(train.batch_size)),
        split=split, resources_per_trial=resources, source=source,
    )
    problem = explicit_batch_problem(parsed)
    if problem:
        raise GridError(f"{source}: 1 problem(s) in the grid file:\n  - {problem}")
    return parsed


def _parse_statistics(raw: dict, split: SplitConfig, protocol: str, threshold_fit: str,
                      errors: list[str]) -> dict[str, Any]:
    """select_on, small_cells, multiplicity_family, allow_threshold_fit_all, min_test_per_class
    and the split's outer_folds / stratify_* (issue 10): checked, as GridConfig keyword arguments."""
    out = {k: raw.get(k, getattr(GridConfig, k)) for k in ("select_on", "small_cells", "min_test_per_class",
                                                          "allow_threshold_fit_all")}
    if out["select_on"] not in SELECT_ON:
        errors.append(f"select_on: unknown value {out['select_on']!r}; allowed: {', '.join(SELECT_ON)}")
    if out["small_cells"] not in SMALL_CELLS:
        errors.append(f"small_cells: unknown value {out['small_cells']!r}; allowed: {', '.join(SMALL_CELLS)}")
    if not isinstance(out["allow_threshold_fit_all"], bool):
        errors.append(f"allow_threshold_fit_all: expected true/false, got {out['allow_threshold_fit_all']!r}")
    elif threshold_fit == "all" and protocol != "seed_replication" and not out["allow_threshold_fit_all"]:
        errors.append("threshold_fit: all labels test subjects by a median their own values moved; it is the "
                      "seed's rule for protocol seed_replication only. Use threshold_fit: train, or set "
                      "allow_threshold_fit_all: true to accept that")
    family = raw.get("multiplicity_family", "launch")
    if family == "launch":
        family = ()
    elif not (isinstance(family, list) and family and all(a in GRID_AXES for a in family)):
        errors.append(f"multiplicity_family: expected 'launch' (every cell of the launch is one family) or a list "
                      f"of grid axes ({', '.join(GRID_AXES)}) giving one family per value, got {family!r}")
        family = ()
    out["multiplicity_family"] = tuple(family)
    nested = protocol == "nested_cv" or out["small_cells"] == "nested_cv"
    for key in ("folds", "outer_folds") if protocol != "nested_cv" else ("outer_folds",):  # folds: checked above
        v = getattr(split, key)
        if nested and (isinstance(v, bool) or not isinstance(v, int) or v < 2):
            errors.append(f"split.{key}: nested CV needs an integer >= 2, got {v!r}")
    measure = split.stratify_measure
    if measure is not None and measure not in MEASURES:
        errors.append(f"split.stratify_measure: unknown measure {measure!r}; allowed: {', '.join(MEASURES)} or null")
    return out


def load_grid(path: str | Path, overrides: dict[str, Any] | None = None) -> GridConfig:
    """Read a grid YAML (optionally with dotted-key overrides such as {"train.epochs": 2})."""
    path = Path(path)
    if not path.is_file():
        raise GridError(f"grid file {str(path)!r} does not exist")
    try:
        raw = load_yaml(path.read_text())
    except yaml.YAMLError as exc:
        raise GridError(f"{path}: not valid YAML: {exc}") from exc
    if raw is None:
        raw = {}  # an empty file: parse_grid lists the required keys
    if not isinstance(raw, dict):
        raise GridError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for depth, p in enumerate(parents):
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise GridError(f"--set {dotted}: {'.'.join(parents[:depth + 1])} is {child!r}, not a section")
            node = child
        node[leaf] = value
    return parse_grid(raw, source=str(path))


def parse_override(text: str) -> tuple[str, Any]:
    """`train.epochs=2` → ("train.epochs", 2); the value is parsed as YAML."""
    if "=" not in text:
        raise GridError(f"--set {text!r}: expected KEY=VALUE, e.g. train.epochs=2")
    key, value = text.split("=", 1)
    if not key.strip():
        raise GridError(f"--set {text!r}: empty key; expected KEY=VALUE, e.g. train.epochs=2")
    try:
        return key.strip(), load_yaml(value)
    except yaml.YAMLError as exc:
        raise GridError(f"--set {text!r}: the value is not valid YAML ({exc})") from exc


def search_space_size(grid: GridConfig) -> float:
    """Number of distinct configurations (inf for continuous parameters), for the launch summary."""
    size = 1.0
    for p in grid.search:
        size *= len(p.values) if p.kind == "choice" else math.inf
    return size
