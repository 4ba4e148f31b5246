"""The model registry: every CNN family by name, with its check that a config fits the images and the module
that builds it, in one table (FAMILIES), as timm keeps one registry of models built from names.

No torch here: a sweep's driver checks every model a space can ask for without importing it, and only a trial
that builds a model imports its family's module. A new family is one file in this package (its builder) and one
entry in FAMILIES.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tune_cnn.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from tune_cnn.config import InputShape, ModelConfig

ShapeCheck = Callable[["ModelConfig", "InputShape"], None]


@dataclass(frozen=True)
class Family:
    """A model family: `fits` raises a ConfigError where a config cannot take images of a shape, before anything is
    built; `builder` names the function that builds the nn.Module, as "module:function"."""

    fits: ShapeCheck
    builder: str

    def build(self, config: ModelConfig, shape: InputShape) -> nn.Module:
        module, _, function = self.builder.partition(":")
        return getattr(importlib.import_module(module), function)(config, shape)


def seed_feature_sizes(config: ModelConfig, size: int) -> list[int]:
    """Side length of the feature map after each convolution and pooling of the seed family."""
    shrink = 0 if config.padding == "same" else config.conv_width - 1
    sizes = []
    for i in range(len(config.filters)):
        size -= shrink
        sizes.append(size)
        if i < len(config.filters) - 1:
            size //= 2
            sizes.append(size)
    return sizes


def seed_cnn_fits(config: ModelConfig, shape: InputShape) -> None:
    if min(seed_feature_sizes(config, min(shape.height, shape.width))) < 1:
        fix = "fewer filters (layers)" if config.padding == "same" else "padding 'same', a smaller conv_width or fewer filters"
        raise ConfigError(
            f"conv_width {config.conv_width} with {config.padding} padding shrinks a {shape.height}x{shape.width} "
            f"image below 1x1 in {len(config.filters)} convolutions and the poolings between them; use {fix}"
        )


def fits_any_shape(config: ModelConfig, shape: InputShape) -> None:
    """The check of a family whose builder adapts to any image size (a global pooling before its classifier)."""


FAMILIES: dict[str, Family] = {
    "seed_cnn": Family(seed_cnn_fits, "tune_cnn.models.seed_cnn:build"),
}


def family(name: str) -> Family:
    """The family named `name`; an unknown name is one ConfigError listing the known ones."""
    if name not in FAMILIES:
        raise ConfigError(f"model '{name}' is unknown; choose one of: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def build_model(config: ModelConfig, shape: InputShape) -> nn.Module:
    """Build the model that `config.model` names for inputs and classes of `shape`."""
    chosen = family(config.model)
    chosen.fits(config, shape)
    return chosen.build(config, shape)


def count_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())
