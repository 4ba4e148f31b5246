"""Every setting of a trial as checked, typed dataclasses, built from one flat mapping (a search space's values,
`--set NAME=VALUE`) in one place: TrainConfig, with the architecture in ModelConfig.

No torch here: a sweep's driver, its dry run and the analysis read and check settings without importing it,
and only the processes that train pay for it (tune_cnn.models builds the models these configs describe and
checks that they fit the images).
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from functools import cache
from typing import Any, Literal, get_args, get_type_hints

from pydantic import TypeAdapter, ValidationError

from tune_cnn.errors import ConfigError
from tune_cnn.models import family

Augment = Literal["none", "flip", "crop", "crop_flip", "translate", "flip_translate"]  # engine.augment_batch
AUGMENTATIONS = get_args(Augment)
Optimizer = Literal["adam", "sgd", "nesterov"]  # engine.optimizer_settings
OPTIMIZERS = get_args(Optimizer)
Padding = Literal["valid", "same"]
# The learning rate over the run: per epoch (optim.scheduled_lr), or per step (triangular, onecycle, a warm-up: optim.step_lr)
Schedule = Literal["constant", "cosine", "triangular", "onecycle"]
SCHEDULES = get_args(Schedule)
Pooling = Literal["max", "avg"]
Tta = Literal["none", "flip", "flip_translate"]  # test-time augmentation: engine.predict
TTAS = get_args(Tta)
MAX_EPOCHS = 10_000  # 100 times the longest shipped space's epochs, and days of the seed model on a GPU
MAX_SEED = 2**32 - 1  # numpy's and Optuna's samplers take seeds 0 .. 2**32 - 1
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def from_environment(name: str, default: str) -> str:
    """$`name` where it is set to something, else `default`: an empty value means unset, as XDG's variables do,
    so that `TUNE_CNN_CACHE=` cannot turn the current folder into the cache."""
    return os.environ.get(name) or default


@dataclass(frozen=True)
class InputShape:
    channels: int
    height: int
    width: int
    classes: int

    def describe(self) -> str:
        return f"{self.channels}x{self.height}x{self.width} images of {self.classes} classes"


@dataclass(frozen=True)
class ModelConfig:
    """Architecture settings. Defaults are the seed model.

    dropout is applied after each pooling layer and after the hidden dense layer (never after the last
    convolution, whose output feeds the dense layers directly, nor on the logits). batch_norm inserts a
    BatchNorm after every convolution and the hidden dense layer, before the ReLU.
    """

    model: str = "seed_cnn"
    filters: tuple[int, ...] = (32, 64, 64)
    conv_width: int = 3
    padding: Padding = "valid"
    pooling: Pooling = "max"
    dense_units: int = 64
    batch_norm: bool = False
    dropout: float = 0.0
    widths: tuple[int, ...] = (64, 256, 256)  # fast_resnet: channels of each group
    width_multiplier: float = 1.0  # fast_resnet: scales every width (0.25 for a quick run on a laptop)

    def __post_init__(self) -> None:
        self._check_family_reads_every_setting()
        if not self.widths or any(w < 1 for w in self.widths):
            raise ConfigError(f"widths {list(self.widths)} is not allowed; use one or more positive integers, such as [64, 256, 256]")
        if not 0 < self.width_multiplier < math.inf:
            raise ConfigError(f"width_multiplier {self.width_multiplier} is out of range; use a number > 0, such as 0.5")
        if self.conv_width < 1 or self.conv_width % 2 == 0:
            raise ConfigError(f"conv_width {self.conv_width} is not allowed; use an odd integer >= 1 (1, 3, 5, 7)")
        if self.padding not in ("valid", "same"):
            raise ConfigError(f"padding '{self.padding}' is unknown; use 'valid' or 'same'")
        if self.pooling not in ("max", "avg"):
            raise ConfigError(f"pooling '{self.pooling}' is unknown; use 'max' or 'avg'")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout {self.dropout} is out of range; use 0 <= dropout < 1")
        if not self.filters or any(f < 1 for f in self.filters):
            raise ConfigError(f"filters {list(self.filters)} is not allowed; use one or more positive integers, such as [32, 64, 64]")
        if self.dense_units < 1:
            raise ConfigError(f"dense_units {self.dense_units} is out of range; use an integer >= 1")

    def _check_family_reads_every_setting(self) -> None:
        """A setting the model's family does not read, changed from its default, is an error: it would change nothing
        (an unknown model name is one error listing the known ones)."""
        reads = family(self.model).settings
        for setting in fields(self):
            value = getattr(self, setting.name)
            if setting.name not in ("model", *reads) and value != setting.default:
                raise ConfigError(f"{setting.name} does not apply to model '{self.model}', which reads {', '.join(reads)}; "
                                  f"leave {setting.name} out")

    def check_fits(self, shape: InputShape) -> None:
        """A ConfigError where this model cannot take images of `shape` (a feature map shrunk below 1x1)."""
        family(self.model).fits(self, shape)


MODEL_SETTINGS = tuple(f.name for f in fields(ModelConfig))


# --- Training ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """Everything one trial needs besides the data. Defaults are the seed's Keras run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: Optimizer = "adam"
    lr: float = 1e-3
    schedule: Schedule = "constant"
    warmup: float = 0.0  # the fraction of all training steps over which the rate rises from 0: optim.step_lr
    momentum: float = 0.9
    weight_decay: float = 0.0
    label_smoothing: float = 0.0  # of the training loss only; evaluation reports plain cross-entropy
    batch_size: int = 32
    epochs: int = 10
    checkpoint_every: int = 10
    seed: int = 0
    augment: Augment = "none"
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False
    cuda_graph: bool = True  # on CUDA only; see StepGraph
    eval_batch_size: int = 1000
    ema: float = 0.0  # evaluate an exponential moving average of the weights, updated every step (0: the raw weights): engine.WeightAverage
    tta: Tta = "none"  # average the evaluated logits over flipped (and shifted) views: engine.predict
    whiten: bool = False  # the first convolution's filters fixed to whiten the training images' patches: engine.whiten_first_convolution

    def __post_init__(self) -> None:
        checks = [
            (self.optimizer in OPTIMIZERS, f"optimizer '{self.optimizer}' is unknown; use one of {', '.join(OPTIMIZERS)}"),
            (0 < self.lr < math.inf, f"lr {self.lr} is out of range; use a learning rate > 0, such as 0.001"),
            (0 <= self.momentum < 1, f"momentum {self.momentum} is out of range; use 0 <= momentum < 1"),
            (self.optimizer != "nesterov" or self.momentum > 0,
             "optimizer nesterov needs momentum > 0 (with none it is plain SGD); set momentum, such as 0.9, or use optimizer sgd"),
            (0 <= self.weight_decay < math.inf, f"weight_decay {self.weight_decay} is out of range; use a finite value >= 0"),
            (self.batch_size >= 1, f"batch_size {self.batch_size} is out of range; use an integer >= 1"),
            (self.batch_size >= 2 or not self.model.batch_norm, "batch_norm needs batch_size 2 or more; batch norm cannot train on one image"),
            (1 <= self.epochs <= MAX_EPOCHS, f"epochs {self.epochs} is out of range; use an integer from 1 to {MAX_EPOCHS:,}"),
            (self.checkpoint_every >= 1, f"checkpoint_every {self.checkpoint_every} is out of range; use an integer >= 1"),
            (0 <= self.seed <= MAX_SEED, f"seed {self.seed} is out of range; use an integer from 0 to {MAX_SEED}"),
            (DEVICE.fullmatch(self.device) is not None, f"device '{self.device}' is unknown; use auto, cpu, cuda or cuda:N"),
            (self.schedule in SCHEDULES, f"schedule '{self.schedule}' is unknown; use one of {', '.join(SCHEDULES)}"),
            (0 <= self.warmup < 1, f"warmup {self.warmup} is out of range; use a fraction of the training steps, 0 <= warmup < 1, such as 0.2"),
            (self.warmup == 0 or self.schedule != "cosine",
             "warmup does not apply to schedule cosine, which sets one rate per epoch; use schedule onecycle (a warm-up, then a cosine fall) or warmup 0"),
            (0 <= self.label_smoothing < 1, f"label_smoothing {self.label_smoothing} is out of range; use 0 <= label_smoothing < 1, such as 0.1"),
            (self.augment in AUGMENTATIONS, f"augment '{self.augment}' is unknown; use one of {', '.join(AUGMENTATIONS)}"),
            (self.precision in ("auto", "fp32", "bf16"), f"precision '{self.precision}' is unknown; use auto, fp32 or bf16"),
            (self.eval_batch_size >= 1, f"eval_batch_size {self.eval_batch_size} is out of range; use an integer >= 1"),
            (0 <= self.ema < 1, f"ema {self.ema} is out of range; use 0 <= ema < 1, such as 0.99"),
            (self.tta in TTAS, f"tta '{self.tta}' is unknown; use one of {', '.join(TTAS)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @classmethod
    def from_flat(cls, settings: Mapping[str, Any]) -> TrainConfig:
        """Build from one flat mapping of setting names (model and training settings mixed), checking types."""
        model_fields, train_fields = _field_types(ModelConfig), _field_types(cls)
        unknown = sorted(set(settings) - set(model_fields) - set(train_fields))
        if unknown:
            allowed = sorted(set(model_fields) | set(train_fields))
            raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
        typed = {name: _check_type(name, value, {**train_fields, **model_fields}[name]) for name, value in settings.items()}
        model = ModelConfig(**{k: v for k, v in typed.items() if k in MODEL_SETTINGS})
        return cls(model=model, **{k: v for k, v in typed.items() if k not in MODEL_SETTINGS})

    def flat(self) -> dict[str, Any]:
        """One flat dict of every setting: the inverse of from_flat."""
        settings = {k: v for k, v in asdict(self).items() if k != "model"}
        return {**asdict(self.model), **settings}


SETTINGS = tuple(dict.fromkeys(MODEL_SETTINGS + tuple(f.name for f in fields(TrainConfig) if f.name != "model")))


def _field_types(cls: type) -> dict[str, Any]:
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls) if not (cls is TrainConfig and f.name == "model")}


def _check_type(name: str, value: Any, hint: Any) -> Any:
    """Accept a value of the setting's type (an int where a float is due, a list where a tuple is), by pydantic's
    strict validation; otherwise one clear error."""
    choices = get_args(hint) if getattr(hint, "__origin__", None) is Literal else None
    if choices is not None:
        if value not in choices:
            raise ConfigError(f"{name} '{value}' is not allowed; use one of: {', '.join(map(str, choices))}")
        return value
    value = float_text(value) if hint is float else value
    try:
        return _validator(hint).validate_python(tuple(value) if isinstance(value, list) else value, strict=True)
    except ValidationError:
        raise ConfigError(f"{name} {value!r} has the wrong type; expected {EXPECTED.get(hint, hint.__name__)}") from None


# What a setting of each type looks like, for the wrong-type error (an int written 1e9 is text to YAML).
EXPECTED = {int: "an integer, such as 30 (1e3 is text: write 1000)", float: "a number, such as 0.001",
            bool: "true or false", str: "a word", tuple[int, ...]: "a list of integers, such as [32, 64, 64]"}


@cache
def _validator(hint: Any) -> TypeAdapter:
    return TypeAdapter(hint)


def float_text(value: Any) -> Any:
    """A number written as text, as YAML reads 1e-3 (its floats need a dot: 1.0e-3), as that float."""
    if not isinstance(value, str):
        return value
    try:
        return float(value)
    except ValueError:
        return value
