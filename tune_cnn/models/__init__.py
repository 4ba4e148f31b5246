"""The model registry: every CNN family by name, with its check that a config fits the images, its size (for the
memory estimate before anything trains) and the module that builds it, in one table (FAMILIES), as timm keeps one
registry of models built from names.

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
class ModelSize:
    """What a model holds, counted without building it: its parameters, and the values its layers output for one
    image in training (what backward keeps)."""

    parameters: int
    activations: int


SizeCount = Callable[["ModelConfig", "InputShape"], ModelSize]
# The ModelConfig settings each family reads besides `model`; any other left at its default (ModelConfig checks).
SEED_CNN_SETTINGS = ("filters", "conv_width", "padding", "pooling", "dense_units", "batch_norm", "dropout")
FAST_RESNET_SETTINGS = ("widths", "width_multiplier", "pooling")
FAST_RESNET_STEM_CHANNELS = 8  # per image channel: a few features at full resolution, where every channel costs the most


@dataclass(frozen=True)
class Family:
    """A model family: `fits` raises a ConfigError where a config cannot take images of a shape, before anything is
    built; `size` counts the model of a config that fits; `builder` names the function that builds the nn.Module,
    as "module:function"; `settings` are the ModelConfig settings it reads."""

    fits: ShapeCheck
    size: SizeCount
    builder: str
    settings: tuple[str, ...] = SEED_CNN_SETTINGS

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


def seed_cnn_size(config: ModelConfig, shape: InputShape) -> ModelSize:
    heights, widths = seed_feature_sizes(config, shape.height), seed_feature_sizes(config, shape.width)
    parameters = activations = 0
    in_channels, k, norm = shape.channels, config.conv_width, 2 if config.batch_norm else 0
    for i, channels in enumerate(config.filters):
        area = heights[2 * i] * widths[2 * i]
        parameters += channels * (in_channels * k * k + 1 + norm)
        activations += channels * area * (2 if config.batch_norm else 1)  # the convolution's output, and batch norm's
        if i < len(config.filters) - 1:
            activations += channels * heights[2 * i + 1] * widths[2 * i + 1] * (2 if config.dropout else 1)  # pooled, dropped
        in_channels = channels
    flat = in_channels * heights[-1] * widths[-1]
    parameters += config.dense_units * (flat + 1 + norm) + shape.classes * (config.dense_units + 1)
    activations += config.dense_units * (1 + (1 if config.batch_norm else 0) + (1 if config.dropout else 0)) + shape.classes
    return ModelSize(parameters, activations)


def fits_any_shape(config: ModelConfig, shape: InputShape) -> None:
    """The check of a family whose builder adapts to any image size (a global pooling before its classifier)."""


def fast_resnet_widths(config: ModelConfig) -> list[int]:
    """Each group's channels: `widths` times `width_multiplier`, rounded, at least 1."""
    return [max(1, round(width * config.width_multiplier)) for width in config.widths]


def fast_resnet_fits(config: ModelConfig, shape: InputShape) -> None:
    """Each group halves the feature map: the images must keep at least 1x1 through all of them."""
    groups = len(config.widths)
    if min(shape.height, shape.width) < 2**groups:
        raise ConfigError(f"fast_resnet's {groups} groups halve a {shape.height}x{shape.width} image {groups} times, below 1x1; "
                          f"use fewer widths (groups) or images of at least {2**groups}x{2**groups}")


def fast_resnet_size(config: ModelConfig, shape: InputShape) -> ModelSize:
    """Stem conv (FAST_RESNET_STEM_CHANNELS per image channel) -> BN -> GELU, then per group
    conv -> pool -> BN -> GELU -> conv -> BN -> GELU, global pooling, linear.
    Activations: each layer's output that backward keeps (the convolutions', the pooled map, BN's and GELU's)."""
    height, width_px = shape.height, shape.width
    in_channels = FAST_RESNET_STEM_CHANNELS * shape.channels
    parameters = shape.channels * 9 * in_channels + 2 * in_channels
    activations = 3 * in_channels * height * width_px
    for width in fast_resnet_widths(config):
        parameters += in_channels * 9 * width + width * 9 * width + 4 * width
        activations += width * height * width_px + 6 * width * (height // 2) * (width_px // 2)
        height, width_px, in_channels = height // 2, width_px // 2, width
    parameters += in_channels * shape.classes
    return ModelSize(parameters, activations + in_channels + shape.classes)


FAMILIES: dict[str, Family] = {
    "seed_cnn": Family(seed_cnn_fits, seed_cnn_size, "tune_cnn.models.seed_cnn:build"),
    "fast_resnet": Family(fast_resnet_fits, fast_resnet_size, "tune_cnn.models.fast_resnet:build", FAST_RESNET_SETTINGS),
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
