"""A sweep file (``expertpar sweep jobs/sweep.yaml``): read strictly, checked before Ray starts.

The file names a base job, the metric to judge trials by, how many to sample, the ASHA
scheduler's rungs and the search space: dotted config keys, each with one search spec. Every
error names the offending key and value, as config.py's do: an unknown key, a spec that is not
one, a space key that is not a config key (walked through Config's sections), a combination of
the space's values that makes no valid job (the base job is built with each), a metric the
reports will not carry. No Ray here: app/sweep.py runs what this module has checked.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional


# The strict builder, number reader and key setter every config file goes through, so a sweep
# file's errors read like a job file's.
from ..config import (Config, ConfigError, build_section, config_to_dict, convert_value,
                      load_config, parse_override, read_yaml_mapping, set_path)
from ..data.catalog import find_dataset_info

KINDS = ("choice", "uniform", "loguniform", "randint")
SPEC_HELP = ("one of {choice: [a, b, ...]}, {uniform: [lo, hi]}, {loguniform: [lo, hi]}, "
             "{randint: [lo, hi]} (lo and hi included)")

# Set by the sweep for every trial, so not knobs: each trial's run directory and name, the Ray
# path, and the step budget the scheduler's rungs count in.
MANAGED = {"run.name": "each trial's run is OUT/trials/<trial id>",
           "run.out_dir": "each trial's run is OUT/trials/<trial id>",
           "distributed.backend": "every trial runs on Ray",
           "distributed.address": "use --address or the base job",
           "train.steps": "the scheduler's rungs count steps up to the base job's train.steps; "
                          "set it in the base job, under set:, or with --set"}

# Metrics every report carries (train/loop.py reports at each checkpoint).
TRAIN_METRICS = ("loss/total", "loss/clip", "loss/aux")

# Combinations of the space's values checked one by one before anything starts; a larger
# space is checked one knob at a time (each value with the other knobs at their first).
MAX_COMBINATIONS = 4096


@dataclass(frozen=True)
class SearchDim:
    """One knob of the space: a dotted config key and its search spec."""
    key: str
    kind: Literal["choice", "uniform", "loguniform", "randint"]
    values: tuple  # choice: the values; otherwise (lo, hi), both included

    def extremes(self) -> tuple:
        """The values a trial can take that bound what it needs: every choice, both ends of
        a range (as floats for uniform and loguniform: a sample is never a whole number)."""
        if self.kind in ("uniform", "loguniform"):
            return tuple(float(v) for v in self.values)
        return self.values


@dataclass(frozen=True)
class SchedulerConfig:
    # ASHA (asynchronous successive halving): at each rung (grace_period x reduction_factor^k
    # steps), a trial whose metric is below the best 1/reduction_factor of the trials that
    # reached that rung before it stops there
    early_stopping: bool = True  # false: every trial runs the base job's train.steps
    grace_period: int = 100  # steps every trial runs before it may be stopped
    reduction_factor: float = 2.0

    def check(self) -> list[tuple[str, str]]:
        bad = []
        if self.grace_period < 1:
            bad.append(("grace_period", "must be >= 1"))
        if not self.reduction_factor > 1:
            bad.append(("reduction_factor", "must be > 1"))
        return bad


@dataclass(frozen=True)
class SweepConfig:
    base: str = ""  # the job file every trial starts from, relative to the sweep file
    metric: str = "zero_shot/top1"  # what a trial is judged by, as its reports name it
    mode: Literal["max", "min"] = "max"  # max: higher is better
    num_samples: int = 8  # trials, each a sample of the space
    # trials at once; null: as many as the cluster's free CPUs and GPUs hold (never more)
    max_concurrent: Optional[int] = None
    seed: int = 0  # seeds the sampling of the space
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    # not read by the strict builder (their keys are config keys): see load_sweep
    set: tuple[tuple[str, Any], ...] = ()  # fixed overrides of the base job, for every trial
    space: tuple[SearchDim, ...] = ()

    def check(self) -> list[tuple[str, str]]:
        bad = []
        if not self.base:
            bad.append(("base", "is required (the job file every trial starts from)"))
        if not self.metric:
            bad.append(("metric", "is required (e.g. zero_shot/top1 or loss/total)"))
        if self.num_samples < 1:
            bad.append(("num_samples", "must be >= 1"))
        if self.max_concurrent is not None and self.max_concurrent < 1:
            bad.append(("max_concurrent", "must be >= 1 or null"))
        return bad


@dataclass(frozen=True)
class Sweep:
    """A sweep file, checked against its base job."""
    path: Path
    config: SweepConfig
    base: Config  # the base job with set:, --set and the Ray backend applied
    # every combination of the space's extremes (or one knob at a time, for a large space),
    # with its job: what app/sweep.py sizes the trials by
    extremes: tuple[tuple[dict, Config], ...]

    @property
    def knobs(self) -> list[str]:
        return [d.key for d in self.config.space]


def load_sweep(path: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> Sweep:
    """Read and check the sweep file ``path``; ``overrides`` (``--set``) apply to the base job."""
    path = Path(path)
    data = read_yaml_mapping(path, "sweep file")
    space, fixed = data.pop("space", None), data.pop("set", None) or {}
    try:
        cfg = build_section(SweepConfig, data, what="sweep key")
        if not isinstance(fixed, dict):
            raise ConfigError(f"sweep key 'set': {fixed!r} is not a mapping of config keys to "
                              f"values")
        cfg = dataclasses.replace(cfg, set=tuple(fixed.items()), space=_space(space, fixed))
        _check_overrides(overrides, cfg.space)
        base = _base_job(path, cfg, overrides)
        _check_metric(cfg, base)
        if cfg.scheduler.early_stopping and cfg.scheduler.grace_period > base.train.steps:
            raise ConfigError(f"sweep key 'scheduler.grace_period': {cfg.scheduler.grace_period}"
                              f" must be <= the base job's train.steps ({base.train.steps})")
        extremes = _check_space(cfg.space, config_to_dict(base))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    return Sweep(path, cfg, base, extremes)


def _space(space: Any, fixed: dict) -> tuple[SearchDim, ...]:
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"sweep key 'space': {space!r} must map config keys to search specs "
                          f"({SPEC_HELP}), at least one")
    dims = []
    for key, spec in space.items():
        if not isinstance(key, str):
            raise ConfigError(f"sweep key 'space': {key!r} is not a dotted config key")
        where = f"sweep key 'space.{key}'"
        if key in MANAGED:
            raise ConfigError(f"{where}: {spec!r}: '{key}' is not a knob ({MANAGED[key]})")
        if key in fixed:
            raise ConfigError(f"{where}: {spec!r}: '{key}' is also under set: (fixed); keep it "
                              f"in one place")
        if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in KINDS):
            raise ConfigError(f"{where}: {spec!r} is not a search spec; use {SPEC_HELP}")
        kind, values = next(iter(spec.items()))
        if kind == "choice":
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{where}: {spec!r}: choice needs a non-empty list of values")
            # A YAML 1.1 reader leaves 1e-3 (no dot) a string; a number is meant.
            values = tuple(_number(v) for v in values)
        else:
            if not isinstance(values, list) or len(values) != 2:
                raise ConfigError(f"{where}: {spec!r}: {kind} needs [lo, hi]")
            tp = int if kind == "randint" else float
            lo, hi = (convert_value(tp, v, f"space.{key}.{kind}[{i}]", "sweep key")
                      for i, v in enumerate(values))
            if not lo < hi:
                raise ConfigError(f"{where}: {spec!r}: needs lo < hi")
            if kind == "loguniform" and not lo > 0:
                raise ConfigError(f"{where}: {spec!r}: loguniform needs lo > 0")
            values = (lo, hi)
        dims.append(SearchDim(key, kind, values))
    return tuple(dims)


def _check_overrides(overrides, space: tuple[SearchDim, ...]) -> None:
    """A ``--set`` of a knob would be replaced by every trial's sample: refused, not ignored."""
    knobs = {d.key for d in space}
    for item in overrides:
        key, _ = parse_override(item)
        if key in knobs:
            raise ConfigError(f"--set {item}: '{key}' is a knob of the sweep (sweep key "
                              f"'space.{key}'); every trial sets its own value, so a fixed one "
                              f"would be ignored; drop it from --set or from the space")


def _number(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return convert_value(float, value, "")
        except ConfigError:
            return value
    return value


def _base_job(path: Path, cfg: SweepConfig, overrides) -> Config:
    base = (path.parent / cfg.base) if not Path(cfg.base).is_absolute() else Path(cfg.base)
    fixed = [override(k, v) for k, v in cfg.set]
    try:
        return load_config(base, [*fixed, *overrides, "distributed.backend=ray"])
    except ConfigError as err:
        raise ConfigError(f"the base job (sweep key 'base', with set: and --set): {err}"
                          ) from None


def override(key: str, value: Any) -> str:
    """``key=value`` for config.py's override parser (JSON is YAML)."""
    return f"{key}={json.dumps(value)}"


def trial_config(job: dict, values: dict[str, Any]) -> Config:
    """The job tree ``job`` (config_to_dict's) with ``values`` (dotted key -> value) set,
    checked as any job is. The values are set as they are, not parsed from text: a sweep
    builds hundreds of these (config_from_dict's YAML round trip would take seconds)."""
    tree = copy.deepcopy(job)
    for key, value in values.items():
        set_path(tree, key, value)
    return build_section(Config, tree)


def _check_metric(cfg: SweepConfig, base: Config) -> None:
    """The metric must be in every report, or Tune fails the trial at its first one."""
    ev, tc = base.eval, base.train
    evals = ([f"zero_shot/top{k}" for k in ev.zero_shot_top]
             + [f"retrieval/{way}/R@{k}" for way in ("image_to_text", "text_to_image")
                for k in ev.recall_at])
    known = [*TRAIN_METRICS, *evals]
    where = f"sweep key 'metric': {cfg.metric!r}"
    if cfg.metric not in known:
        raise ConfigError(f"{where} is not a metric every report carries; one of {known}")
    if cfg.metric in evals:
        if not base.data.eval:
            raise ConfigError(f"{where} is an evaluation metric, but the base job has no "
                              f"data.eval")
        # Checked where the split is here to read (a missing one is the run's own error).
        if cfg.metric.startswith("zero_shot/") and Path(base.data.eval).exists():
            info = find_dataset_info(base.data.eval)
            if info is None or not info.classes:
                raise ConfigError(f"{where} needs class names for zero-shot evaluation, and "
                                  f"data.eval {base.data.eval!r} has no dataset.json with "
                                  f"classes; use a retrieval metric")
        if tc.checkpoint_every and (not tc.eval_every or tc.checkpoint_every % tc.eval_every):
            raise ConfigError(
                f"{where} is an evaluation metric: each report (every train.checkpoint_every "
                f"= {tc.checkpoint_every} steps) must carry the evaluation of its step, so "
                f"train.checkpoint_every must be a multiple of train.eval_every "
                f"({tc.eval_every}); set both, e.g. under set:")


def _check_space(space: tuple[SearchDim, ...], job: dict) -> tuple[tuple[dict, Config], ...]:
    """Every knob is a config key; the base job built with each combination of the space's
    extremes is a valid job (its error names the combination and the key at fault)."""
    for d in space:
        problem = _not_a_config_key(d.key)
        if problem:
            raise ConfigError(f"sweep key 'space.{d.key}': {problem}")
    firsts = {d.key: d.extremes()[0] for d in space}
    values = [d.extremes() for d in space]
    if math.prod(len(v) for v in values) <= MAX_COMBINATIONS:
        combos = [dict(zip(firsts, c)) for c in itertools.product(*values)]
    else:
        combos = [{**firsts, d.key: v} for d in space for v in d.extremes()]
    checked = []
    for knobs in combos:
        try:
            checked.append((knobs, trial_config(job, knobs)))
        except ConfigError as err:
            raise ConfigError(f"the space's values {describe(knobs)} make no valid job: {err}"
                              ) from None
    return tuple(checked)


def _not_a_config_key(key: str) -> str | None:
    """Why ``key`` names no value of a job (None when it does), walking Config's sections."""
    section: Any = Config
    for depth, part in enumerate(key.split(".")):
        here = ".".join(key.split(".")[:depth]) or "<root>"
        if not dataclasses.is_dataclass(section):
            return f"'{key}' is not a config key ('{here}' is a value, not a section)"
        names = [f.name for f in dataclasses.fields(section)]
        if part not in names:
            return f"'{key}' is not a config key (known keys under '{here}': {names})"
        section = typing.get_type_hints(section)[part]
    if dataclasses.is_dataclass(section):
        return f"'{key}' is a section, not a config key"
    return None


def describe(knobs: dict[str, Any]) -> str:
    """``model.moe.top_k=2, model.moe.num_experts=4``."""
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in knobs.items())
