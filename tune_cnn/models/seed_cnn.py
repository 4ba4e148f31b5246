"""The seed family: the learner's Keras model, Conv32 -> Pool -> Conv64 -> Pool -> Conv64 -> Dense64 ->
Dense(classes), with batch norm and dropout where ModelConfig says. Its default config has exactly the Keras
parameter count (122,570 on 32x32x3, 10 classes).
"""
from __future__ import annotations

from torch import nn

from tune_cnn.config import InputShape, ModelConfig
from tune_cnn.models import seed_feature_sizes


def build(config: ModelConfig, shape: InputShape) -> nn.Module:
    pool = nn.MaxPool2d if config.pooling == "max" else nn.AvgPool2d
    layers: list[nn.Module] = []
    in_channels = shape.channels
    for i, out_channels in enumerate(config.filters):
        layers.append(nn.Conv2d(in_channels, out_channels, config.conv_width, padding=config.padding))
        if config.batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        if i < len(config.filters) - 1:
            layers += _activate_and_pool(pool(2))
            if config.dropout:
                layers.append(nn.Dropout(config.dropout))
        else:
            layers.append(nn.ReLU(inplace=True))
        in_channels = out_channels
    h = seed_feature_sizes(config, shape.height)[-1]
    w = seed_feature_sizes(config, shape.width)[-1]
    layers += [nn.Flatten(), nn.Linear(in_channels * h * w, config.dense_units)]
    if config.batch_norm:
        layers.append(nn.BatchNorm1d(config.dense_units))
    layers.append(nn.ReLU(inplace=True))
    if config.dropout:
        layers.append(nn.Dropout(config.dropout))
    layers.append(nn.Linear(config.dense_units, shape.classes))
    model = nn.Sequential(*layers)
    model.apply(_keras_init)
    return model


def _activate_and_pool(pool: nn.Module) -> list[nn.Module]:
    """ReLU then pooling, as Keras builds it; for max pooling the same function computed the other way round,
    which runs the ReLU and its backward on a map 4x smaller (faster on the CPU; benchmarks/README.md).

    ReLU is monotone, so max(relu(x)) == relu(max(x)) exactly, with the same gradients. Average pooling does not
    commute with ReLU and keeps the order.
    """
    relu = nn.ReLU(inplace=True)
    return [pool, relu] if isinstance(pool, nn.MaxPool2d) else [relu, pool]


def _keras_init(module: nn.Module) -> None:
    """Glorot-uniform weights and zero biases, as Keras does, so results compare with the seed's."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)
