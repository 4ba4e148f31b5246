"""The fast_resnet family: the small network of the fast CIFAR-10 recipes (David Page's, hlb-CIFAR10, airbench).

    stem: conv3x3 to FAST_RESNET_STEM_CHANNELS channels per image channel -> BN -> GELU
    a group per width: conv3x3 -> pool 2 -> BN -> GELU -> conv3x3 -> BN -> GELU
    head: global max pool -> linear (no bias) -> logits / LOGIT_TEMPERATURE

Each convolution starts part identity: its first filters (as many as it has input channels) pass one input channel
each through unchanged (a Dirac kernel), the rest are initialised at random as usual, which lets a stack without
shortcuts train from the first step as a residual network does. Any image size of at least 2**groups pixels a side,
any channels and classes.
"""
from __future__ import annotations

import torch
from torch import nn

from tune_cnn.config import InputShape, ModelConfig
from tune_cnn.models import FAST_RESNET_STEM_CHANNELS, fast_resnet_widths

LOGIT_TEMPERATURE = 9.0  # small logits at the recipe's high learning rates, as airbench scales its output


def build(config: ModelConfig, shape: InputShape) -> nn.Module:
    widths = fast_resnet_widths(config)
    pool = nn.MaxPool2d if config.pooling == "max" else nn.AvgPool2d
    in_channels = FAST_RESNET_STEM_CHANNELS * shape.channels
    layers: list[nn.Module] = [*_conv_bn_gelu(shape.channels, in_channels)]
    for width in widths:
        layers += [_conv(in_channels, width), pool(2), nn.BatchNorm2d(width), nn.GELU(), *_conv_bn_gelu(width, width)]
        in_channels = width
    layers += [nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(in_channels, shape.classes, bias=False), Scale(1 / LOGIT_TEMPERATURE)]
    return nn.Sequential(*layers)


def _conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
    passed = min(in_channels, out_channels)
    with torch.no_grad():
        conv.weight[:passed] = _dirac(passed, in_channels)
    return conv


def _dirac(filters: int, in_channels: int) -> torch.Tensor:
    """`filters` 3x3 kernels that each pass one input channel through: filter i reads channel i."""
    kernel = torch.zeros(filters, in_channels, 3, 3)
    kernel[torch.arange(filters), torch.arange(filters), 1, 1] = 1.0
    return kernel


def _conv_bn_gelu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [_conv(in_channels, out_channels), nn.BatchNorm2d(out_channels), nn.GELU()]


class Scale(nn.Module):
    """Multiplies by a constant."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor:g}"
