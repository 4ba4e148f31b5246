"""Search spaces: the one place that turns a `search_spaces/*.yaml` file into a typed, checked SearchSpace.

Everything a sweep could trip over later (an unknown key or setting, a wrong type, a value out of range, a
distribution in grid mode, a grid with no trials, a model that does not fit the images) is caught here,
before Ray starts, as one ConfigError line naming the file, the key and what is allowed.
See search_spaces/README.md for the format.
"""
from __future__ import annotations

import itertools
import math
import os
import sysconfig
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from tune_cnn.config import MAX_SEED, MODEL_SETTINGS, SETTINGS, InputShape, TrainConfig, float_text
from tune_cnn.errors import ConfigError


def _shipped_spaces() -> Path:
    """search_spaces/ beside the package in a checkout (and an editable install); where pip installed a wheel,
    the copy pyproject's data-files put under the environment's data path."""
    beside = Path(__file__).resolve().parents[1] / "search_spaces"
    return beside if beside.is_dir() else Path(sysconfig.get_path("data")) / "share" / "tune_cnn" / "search_spaces"


SPACES_DIR = _shipped_spaces()
TOP_KEYS = ("search", "metric", "mode", "samples", "scheduler", "resources", "fixed", "space", "subset", "seed")
# Searches choose on training or validation metrics only: test metrics are reported, never used to choose.
METRIC_MODES = {"val_acc": "max", "val_loss": "min", "train_acc": "max", "train_loss": "min"}
DISTRIBUTIONS = ("uniform", "loguniform", "int")
SCHEDULER_KEYS = ("type", "grace_period", "reduction_factor", "max_t")
# `gpu: auto` packs 8 trials per GPU: under CUDA MPS eight train nearly 4x one trial's images/s (benchmarks/README.md).
AUTO_GPU_PER_TRIAL = 0.125
MAX_INT_PROBES = 64  # an int range up to this long is checked value by value
MAX_GRID_TRIALS = 10_000  # beyond it, checking and queuing the trials takes minutes before any trains


@dataclass(frozen=True)
class Distribution:
    """An Optuna distribution: uniform or loguniform over [low, high], or int over low..high inclusive."""

    kind: Literal["uniform", "loguniform", "int"]
    low: float
    high: float

    def probes(self) -> list[Any]:
        """The values worth checking before a sampler may draw any value of the range."""
        if self.kind != "int":
            return [self.low, self.high]
        low, high = int(self.low), int(self.high)
        if high - low < MAX_INT_PROBES:
            return list(range(low, high + 1))
        return [low, low + 1, high - 1, high]  # the ends and their neighbours: a rule on parity (odd conv_width) shows

    def describe(self) -> str:
        return f"{self.kind}[{self.low:g}, {self.high:g}]"


Values = tuple[Any, ...] | Distribution


@dataclass(frozen=True)
class Scheduler:
    type: Literal["fifo", "asha"] = "fifo"
    grace_period: int = 1
    reduction_factor: float = 2.0
    max_t: int | None = None  # None: the trials' epochs


@dataclass(frozen=True)
class Resources:
    cpu: float = 1.0
    gpu: float | Literal["auto"] = 0.0

    def resolve_gpu(self, cluster_gpus: float) -> float:
        """GPUs per trial on a cluster that has (or can scale to) `cluster_gpus`: none when it has none."""
        if cluster_gpus <= 0:
            return 0.0
        return AUTO_GPU_PER_TRIAL if self.gpu == "auto" else float(self.gpu)


@dataclass(frozen=True)
class SearchSpace:
    """A checked search space. `fixed` holds constant settings, `space` the swept ones (flat setting names)."""

    name: str
    source: Path
    text: str
    search: Literal["grid", "optuna", "steps"] = "grid"
    metric: str = "val_acc"
    mode: Literal["max", "min"] = "max"
    samples: int = 1
    scheduler: Scheduler = field(default_factory=Scheduler)
    resources: Resources = field(default_factory=Resources)
    fixed: dict[str, Any] = field(default_factory=dict)
    space: dict[str, Values] = field(default_factory=dict)  # steps: each swept setting's values over the trials
    steps: tuple[dict[str, Any], ...] = ()  # steps: what each step changes, in order; its trial has every step's so far
    subset: int | None = None
    seed: int = 0

    @property
    def swept(self) -> list[str]:
        return list(self.space)

    @property
    def epochs(self) -> int:
        """The most epochs any trial runs."""
        return max(self._candidates("epochs"))

    @property
    def checkpoint_epochs(self) -> list[int]:
        """Epochs at which some trial keeps a checkpoint: multiples of checkpoint_every, and each last epoch."""
        epochs = set()
        for last in self._candidates("epochs"):
            for every in self._candidates("checkpoint_every"):
                epochs.update(range(every, last + 1, every))
            epochs.add(last)
        return sorted(epochs)

    @property
    def asks_for_cuda(self) -> bool:
        """Whether some trial names a CUDA device, which only a trial holding a GPU can use."""
        return any(str(device).startswith("cuda") for device in self._candidates("device"))

    @property
    def lists_trials(self) -> bool:
        """Whether every trial is known before the sweep starts (grid, steps); Optuna draws its trials as it goes."""
        return self.search != "optuna"

    @property
    def trial_count(self) -> int:
        if self.search != "grid":
            return self.samples  # steps: one trial per step
        count = 1
        for values in self.space.values():
            count *= len(values)
        return count

    def trials_at_once(self, max_concurrent: int | None = None) -> int:
        """How many trials run together on this machine: one per `resources.cpu` of its CPUs, at most `max_concurrent`."""
        threads = max(1, int(self.resources.cpu))
        return max(1, min((os.cpu_count() or 1) // threads, max_concurrent or self.trial_count, self.trial_count))

    def bounding_trials(self) -> list[dict[str, Any]]:
        """Every grid trial; for Optuna, every combination of each swept setting's first two and last two values
        (or its range's probes): where the largest trial of any kind lies."""
        if self.lists_trials:
            return self.listed_trials()
        ends = [_ends(_candidate_values(values)) for values in self.space.values()]
        return [{**self.fixed, **dict(zip(self.space, combo))} for combo in itertools.product(*ends)]

    def listed_trials(self) -> list[dict[str, Any]]:
        """Every trial of a grid search (fixed settings plus one combination of the swept values) or of a steps search
        (fixed settings plus every step's changes up to its own, each swept setting not yet changed at its default)."""
        if self.search == "steps":
            return step_trials(self.fixed, self.steps)
        names = self.swept
        return [{**self.fixed, **dict(zip(names, combo))} for combo in itertools.product(*self.space.values())]

    def check_models(self, shape: InputShape) -> None:
        """Check every model the space can ask for against images of `shape`; a misfit is a ConfigError."""
        names = [n for n in self.swept if n in MODEL_SETTINGS]
        if self.search == "steps":
            combos = list(dict.fromkeys(tuple(trial[n] for n in names) for trial in self.listed_trials()))
        else:
            combos = list(itertools.product(*[_candidate_values(self.space[n]) for n in names]))
        for combo in combos:
            settings = {**self.fixed, **dict(zip(names, combo))}
            try:
                TrainConfig.from_flat(settings).model.check_fits(shape)
            except ConfigError as error:
                keys = ", ".join(f"{n}={v}" for n, v in zip(names, combo)) or "the fixed settings"
                raise ConfigError(f"{self.source}: {keys}: {error}") from None

    @property
    def optimizers(self) -> set[str]:
        return set(self._candidates("optimizer"))

    @property
    def notices(self) -> list[str]:
        """What a user should know before the trials run, but that does not stop them."""
        if "momentum" in self.space and "adam" in self.optimizers and self.search != "steps":  # a step changes both together
            return ["notice: Adam ignores momentum: trials with optimizer adam that differ only in momentum train alike"]
        return []

    def _candidates(self, name: str) -> list[Any]:
        if name in self.space:
            return list(_candidate_values(self.space[name]))
        return [self.fixed.get(name, getattr(TrainConfig(), name))]


# --- Loading ---------------------------------------------------------------------------------------------


def space_names() -> list[str]:
    return sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))


def resolve_space_path(name_or_path: str | Path) -> Path:
    """A space by file name (`seed`) from search_spaces/, or any YAML file by path."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; give a search space YAML file, or one of: {', '.join(space_names())}")
    shipped = SPACES_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    raise ConfigError(
        f"search space '{name_or_path}' not found; give a YAML file's path or one of: {', '.join(space_names())}"
    )


def load_space(name_or_path: str | Path, overrides: Mapping[str, Any] | None = None) -> SearchSpace:
    """Read and check a space. `overrides` replace top-level keys; its `fixed` and `resources` are merged in."""
    path = resolve_space_path(name_or_path)
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file; a search space is a YAML file such as search_spaces/seed.yaml") from None
    raw = parse_yaml(path, text)
    overridden = set()
    for key, value in (overrides or {}).items():
        if key not in ("fixed", "resources"):
            raw[key] = value
            overridden.add(key)
        elif isinstance(raw.get(key) or {}, Mapping):  # otherwise the file's own error is reported
            raw[key] = {**(raw.get(key) or {}), **value}
            overridden.update(f"{key}.{name}" for name in value)
    return build_space(path, text, raw, overridden)


def parse_yaml(path: Path, text: str) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{path}:{where}: YAML syntax error ({problem}); fix the file's indentation or quoting") from None
    if raw is None:
        raise ConfigError(f"{path}: holds no settings (empty, or comments only); a search space is a YAML mapping of "
                          f"{', '.join(TOP_KEYS)}, at least `fixed` or `space`, as in search_spaces/seed.yaml")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a search space is a YAML mapping of {', '.join(TOP_KEYS)}")
    return raw


def build_space(path: Path, text: str, raw: Mapping[str, Any], overridden: set[str] | None = None) -> SearchSpace:
    """Check every key of a parsed space and return it typed; the first problem is a one-line ConfigError,
    which names the file and the key, and says where the command line set that key (`overridden`)."""
    fail = _Failer(path, overridden or set())
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        fail(unknown[0], f"unknown key; allowed keys: {', '.join(TOP_KEYS)}")
    search = _choice(fail, raw, "search", ("grid", "optuna", "steps"), "grid")
    metric = _choice(fail, raw, "metric", tuple(METRIC_MODES), "val_acc")
    mode = _choice(fail, raw, "mode", ("max", "min"), METRIC_MODES[metric])
    samples = _samples(fail, raw, search)
    fixed = _fixed(fail, raw.get("fixed"))
    steps = _steps(fail, raw.get("space"), fixed) if search == "steps" else ()
    space = step_values(fixed, steps) if steps else _space(fail, raw.get("space"), fixed, search)
    subset = None if raw.get("subset") is None else _integer(fail, "subset", raw["subset"], minimum=1)
    seed = _integer(fail, "seed", raw.get("seed", 0), minimum=0, maximum=MAX_SEED)
    result = SearchSpace(
        name=path.stem, source=path, text=text, search=search, metric=metric, mode=mode, samples=len(steps) or samples,
        resources=_resources(fail, raw.get("resources")), fixed=fixed, space=space, steps=steps, subset=subset, seed=seed,
    )
    _check_trials(fail, result)
    _check_momentum(fail, result)
    _check_cuda_devices(fail, result)
    return replace(result, scheduler=_scheduler(fail, raw.get("scheduler"), result.epochs))


class _Failer:
    def __init__(self, path: Path, overridden: set[str]):
        self.path, self.overridden = path, overridden

    def __call__(self, key: str, message: str) -> None:
        source = " (set on the command line)" if key in self.overridden else ""
        raise ConfigError(f"{self.path}: {key}{source}: {message}")


def _choice(fail: _Failer, raw: Mapping[str, Any], key: str, allowed: tuple[str, ...], default: str, label: str = "") -> Any:
    value = raw.get(key, default)
    if value not in allowed:
        fail(label or key, f"'{value}' is not allowed; use one of: {', '.join(allowed)}")
    return value


def _integer(fail: _Failer, key: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum or (maximum is not None and value > maximum):
        fail(key, f"{value!r} is not allowed; use an integer >= {minimum}" + (f" and <= {maximum}" if maximum is not None else ""))
    return value


def _number(fail: _Failer, key: str, value: Any, minimum: float, strict: bool = False) -> float:
    value = float_text(value)
    ok = _finite(value)
    if not ok or value < minimum or (strict and value == minimum):
        fail(key, f"{value!r} is not allowed; use a finite number {'>' if strict else '>='} {minimum:g}")
    return float(value)


def _mapping(fail: _Failer, key: str, value: Any, allowed: tuple[str, ...]) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        fail(key, f"expected a mapping of {', '.join(allowed)}")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        fail(f"{key}.{unknown[0]}", f"unknown key; allowed: {', '.join(allowed)}")
    return value


def _samples(fail: _Failer, raw: Mapping[str, Any], search: str) -> int:
    if search != "optuna":
        if raw.get("samples") is not None:
            fail("samples", f"applies to optuna search only; a {search} search runs each of its trials once"
                            + (" (sweep `seed: [0, 1, 2]` to repeat them)" if search == "grid" else ""))
        return 1
    return _integer(fail, "samples", raw.get("samples", 10), minimum=1)


def _resources(fail: _Failer, raw: Any) -> Resources:
    given = _mapping(fail, "resources", raw, ("cpu", "gpu"))
    cpu = _number(fail, "resources.cpu", given.get("cpu", 1), minimum=0, strict=True)
    gpu = given.get("gpu", 0)
    if gpu == "auto":
        return Resources(cpu=cpu, gpu=gpu)
    if not _finite(gpu) or gpu < 0 or (gpu > 1 and gpu != int(gpu)):
        fail("resources.gpu", f"{gpu!r} is not allowed; use 0, a fraction of one GPU (0.25, 0.5), a whole number, or auto")
    return Resources(cpu=cpu, gpu=float(gpu))


def _scheduler(fail: _Failer, raw: Any, epochs: int) -> Scheduler:
    given = {"type": raw} if isinstance(raw, str) else dict(_mapping(fail, "scheduler", raw, SCHEDULER_KEYS))
    kind = _choice(fail, given, "type", ("fifo", "asha"), "fifo", label="scheduler" if isinstance(raw, str) else "scheduler.type")
    if kind == "fifo":
        extra = sorted(set(given) - {"type"})
        if extra:
            fail(f"scheduler.{extra[0]}", "applies to the asha scheduler only; set `type: asha` or remove it")
        return Scheduler()
    max_t = _integer(fail, "scheduler.max_t", given.get("max_t", epochs), minimum=1)
    grace = _integer(fail, "scheduler.grace_period", given.get("grace_period", 1), minimum=1)
    if grace > max_t:
        fail("scheduler.grace_period", f"{grace} is more than max_t {max_t} (the trials' epochs unless set); "
                                       f"use a grace_period of 1 to {max_t}, or more epochs (--epochs {grace} or more)")
    if max_t < epochs:
        fail("scheduler.max_t", f"{max_t} is less than epochs {epochs}: ASHA would stop every trial at epoch {max_t}; "
                                f"use max_t >= {epochs} (the default) or fewer epochs")
    factor = _number(fail, "scheduler.reduction_factor", given.get("reduction_factor", 2), minimum=1, strict=True)
    return Scheduler("asha", grace, factor, max_t)


def _fixed(fail: _Failer, raw: Any) -> dict[str, Any]:
    given = _mapping(fail, "fixed", raw, SETTINGS)
    # Each setting checked with the model it is for: a family's own settings are errors for another family.
    model = {"model": _typed(fail, "fixed.model", {"model": given["model"]})["model"]} if "model" in given else {}
    fixed = {name: _typed(fail, f"fixed.{name}", {**model, name: value})[name] for name, value in given.items()}
    _typed(fail, "fixed", fixed)
    return fixed


def _space(fail: _Failer, raw: Any, fixed: Mapping[str, Any], search: str) -> dict[str, Values]:
    given = _mapping(fail, "space", raw, SETTINGS)
    if search == "optuna" and not given:
        fail("space", "optuna needs at least one swept setting; list values or give a distribution")
    space: dict[str, Values] = {}
    for name, value in given.items():
        key = f"space.{name}"
        if name in fixed:
            fail(key, "is both fixed and swept; keep it in one of `fixed` and `space`")
        values = _values(fail, key, name, value, search)
        typed = [_typed(fail, key, {**fixed, name: probe})[name] for probe in _candidate_values(values)]
        if isinstance(values, Distribution):
            space[name] = values
            continue
        twice = [v for i, v in enumerate(typed) if v in typed[:i]]
        if twice:
            fail(key, f"lists {twice[0]!r} twice; list each value once (sweep `seed: [0, 1, 2]` to repeat trials)")
        space[name] = tuple(typed)
    return space


def _steps(fail: _Failer, raw: Any, fixed: Mapping[str, Any]) -> tuple[dict[str, Any], ...]:
    """A steps search's `space`: a list of mappings, each the settings its step changes from the trial before it
    (the first from the fixed settings and the defaults; `{}` for none), every trial checked as a whole."""
    if not isinstance(raw, list) or not raw:
        fail("space", "a steps search lists its steps, each a mapping of the settings it changes, e.g. [{}, {batch_norm: true}]")
    steps: list[dict[str, Any]] = []
    defaults = TrainConfig().flat()
    for i, given in enumerate(raw):
        key = f"space[{i}]"
        if given is not None and not isinstance(given, Mapping):
            fail(key, f"{given!r} is not a mapping; a step is a mapping of the settings it changes, such as {{dropout: 0.25}}")
        step = dict(_mapping(fail, key, given, SETTINGS))
        both = sorted(set(step) & set(fixed))
        if both:
            fail(f"{key}.{both[0]}", "is fixed; a step changes a setting from the trial before it: move it out of `fixed`")
        before = step_trials(fixed, tuple(steps))[-1] if steps else None
        trial = _typed(fail, key, {**(before or fixed), **step})
        step = {name: trial[name] for name in step}
        if i and all(before.get(name, defaults[name]) == value for name, value in step.items()):
            fail(key, "changes nothing from the step before; give each step a setting it changes, or remove it")
        steps.append(step)
    return tuple(steps)


def step_trials(fixed: Mapping[str, Any], steps: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    """The trials of a steps search: each is the fixed settings and every step's changes up to its own, with every
    swept setting present (at the default until a step changes it), so that each trial's row shows all of them."""
    defaults = TrainConfig().flat()
    swept = list(dict.fromkeys(name for step in steps for name in step))
    changed: dict[str, Any] = {}
    trials = []
    for step in steps:
        changed.update(step)
        trials.append({**{name: defaults[name] for name in swept}, **fixed, **changed})
    return trials


def step_values(fixed: Mapping[str, Any], steps: tuple[dict[str, Any], ...]) -> dict[str, Values]:
    """Each setting a steps search changes, with the values its trials take, in order."""
    trials = step_trials(fixed, steps)
    return {name: tuple(dict.fromkeys(trial[name] for trial in trials)) for name in trials[0] if name not in fixed}


def _values(fail: _Failer, key: str, name: str, value: Any, search: str) -> Values:
    if isinstance(value, Mapping):
        if search == "grid":
            fail(key, "distributions are for optuna search; in grid mode list the values, e.g. [0.001, 0.01]")
        return _distribution(fail, key, name, value)
    if not isinstance(value, list):
        fail(key, f"{value!r} is one value; list the values to sweep, e.g. [{value!r}], or move it to `fixed`")
    if not value:
        fail(key, "an empty list yields no trials; list at least one value")
    return tuple(tuple(v) if isinstance(v, list) else v for v in value)


def _distribution(fail: _Failer, key: str, name: str, value: Mapping[str, Any]) -> Distribution:
    if len(value) != 1 or next(iter(value)) not in DISTRIBUTIONS:
        fail(key, f"a distribution is one of {{uniform: [a, b]}}, {{loguniform: [a, b]}}, {{int: [a, b]}}; got {dict(value)}")
    kind, bounds = next(iter(value.items()))
    bounds = [float_text(b) for b in bounds] if isinstance(bounds, list) else bounds
    if name in ("epochs", "checkpoint_every"):
        fail(key, "sweep epochs and checkpoint_every as a list of values, not a distribution")
    numbers = isinstance(bounds, list) and len(bounds) == 2 and all(_finite(b) for b in bounds)
    if not numbers or bounds[0] >= bounds[1]:
        fail(key, f"{kind} takes [low, high] with low < high; got {bounds!r}")
    if kind == "int" and not all(isinstance(b, int) for b in bounds):
        fail(key, f"int takes integer bounds; got {bounds!r}")
    if kind == "loguniform" and bounds[0] <= 0:
        fail(key, f"loguniform needs low > 0; got {bounds!r}")
    return Distribution(kind, bounds[0], bounds[1])


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _typed(fail: _Failer, key: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Check settings together and return each as its setting's type, so numeric text (`1e-3`, which YAML
    reads as a string) reaches Ray, params.json and the analysis as the float it means."""
    try:
        flat = TrainConfig.from_flat(settings).flat()
    except ConfigError as error:
        fail(key, str(error))
    return {name: flat[name] for name in settings}


def _check_momentum(fail: _Failer, space: SearchSpace) -> None:
    """Adam ignores momentum: swept where every trial uses Adam, the sweep would train one model again and again."""
    if "momentum" in space.space and space.optimizers == {"adam"}:
        fail("space.momentum", "every trial uses optimizer adam, which ignores momentum, so these trials would train alike; "
                               "add optimizer: sgd to fixed, or sweep optimizer too")


def _check_cuda_devices(fail: _Failer, space: SearchSpace) -> None:
    """A trial sees only the GPUs Ray gives it, as cuda:0 onwards: a CUDA device needs a GPU and an index among them."""
    if not space.asks_for_cuda:
        return
    gpu = space.resources.gpu
    if gpu == 0:
        fail("resources.gpu", "device cuda needs a GPU per trial; set resources.gpu (a fraction such as 0.5, or auto) or device auto")
    visible = 1 if gpu == "auto" else max(1, int(gpu))
    for device in space._candidates("device"):
        if device.startswith("cuda") and int(device.partition(":")[2] or 0) >= visible:
            fail(f"{'space' if 'device' in space.space else 'fixed'}.device",
                 f"'{device}': a trial sees only the {visible} GPU(s) Ray gives it, as cuda:0 to cuda:{visible - 1}; use device cuda or auto")


def _candidate_values(values: Values) -> list[Any]:
    return values.probes() if isinstance(values, Distribution) else list(values)


def _ends(values: list[Any]) -> list[Any]:
    """The first two and the last two of a setting's values, each once."""
    return list(dict.fromkeys(values[:2] + values[-2:]))


def _check_trials(fail: _Failer, space: SearchSpace) -> None:
    """Settings can be valid alone and clash together (batch_norm with batch_size 1): every grid trial must make a
    valid config, and in an Optuna space every pair of swept settings, each at its values or its range's ends."""
    if space.lists_trials:
        if space.trial_count > MAX_GRID_TRIALS:
            counts = " x ".join(f"{len(values)} {name}" for name, values in space.space.items())
            fail("space", f"the grid has {space.trial_count:,} trials ({counts}), more than {MAX_GRID_TRIALS:,}; "
                          "sweep fewer values, or use search: optuna with samples")
        for trial in space.listed_trials():
            _typed(fail, "space", trial)
        return
    ends = {name: _ends(_candidate_values(values)) for name, values in space.space.items()}
    first = {name: values[0] for name, values in ends.items()}
    for a, b in itertools.combinations(ends, 2):
        for pair in itertools.product(ends[a], ends[b]):
            _typed(fail, f"space.{a} and space.{b}", {**space.fixed, **first, **dict(zip((a, b), pair))})
