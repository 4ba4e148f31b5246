import itertools
import re

import pytest
import torch
from torch import nn

from tune_cnn.config import InputShape, ModelConfig
from tune_cnn.errors import ConfigError
from tune_cnn.models import FAMILIES, Family, ModelSize, build_model, count_parameters, family, fits_any_shape

CIFAR = InputShape(channels=3, height=32, width=32, classes=10)


def test_default_config_is_the_seed_keras_model():
    model = build_model(ModelConfig(), CIFAR)
    assert count_parameters(model) == 122_570
    assert [type(m).__name__ for m in model if not isinstance(m, nn.ReLU)] == [
        "Conv2d", "MaxPool2d", "Conv2d", "MaxPool2d", "Conv2d", "Flatten", "Linear", "Linear",
    ]


@pytest.mark.parametrize("batch_norm", [False, True])
def test_max_pooling_before_relu_computes_the_keras_order_exactly(batch_norm):
    model = build_model(ModelConfig(batch_norm=batch_norm), CIFAR)
    keras_order = list(model)
    for i, layer in enumerate(keras_order[:-1]):
        if isinstance(layer, nn.MaxPool2d):
            keras_order[i], keras_order[i + 1] = keras_order[i + 1], layer  # back to ReLU, then MaxPool
    assert [type(m) for m in model].index(nn.MaxPool2d) < [type(m) for m in keras_order].index(nn.MaxPool2d)
    x = torch.randn(8, 3, 32, 32)
    outputs, grads = [], []
    for layers in (list(model), keras_order):
        model.zero_grad()
        out = nn.Sequential(*layers)(x)
        out.square().sum().backward()
        outputs.append(out)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-7)


def test_parameter_count_follows_the_keras_formula_for_same_padding():
    # conv k x k: (k*k*in + 1) * out; after two 2x2 poolings of a 32x32 'same' map: 8x8x64 into Dense64.
    k = 5
    convs = (k * k * 3 + 1) * 32 + (k * k * 32 + 1) * 64 + (k * k * 64 + 1) * 64
    dense = (8 * 8 * 64 + 1) * 64 + (64 + 1) * 10
    model = build_model(ModelConfig(conv_width=k, padding="same"), CIFAR)
    assert count_parameters(model) == convs + dense


@pytest.mark.parametrize(
    "pooling, conv_width, batch_norm, dropout",
    list(itertools.product(["max", "avg"], [1, 3, 5], [False, True], [0.0, 0.5])),
)
def test_every_combination_builds_and_trains_one_step(pooling, conv_width, batch_norm, dropout):
    config = ModelConfig(pooling=pooling, conv_width=conv_width, batch_norm=batch_norm, dropout=dropout)
    model = build_model(config, CIFAR)
    x = torch.randn(4, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (4, 10)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 3])).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model) == batch_norm
    assert any(isinstance(m, nn.Dropout) for m in model) == (dropout > 0)
    assert any(isinstance(m, nn.AvgPool2d) for m in model) == (pooling == "avg")


def test_input_shape_comes_from_the_data():
    gray = InputShape(channels=1, height=28, width=28, classes=5)
    assert build_model(ModelConfig(), gray)(torch.randn(2, 1, 28, 28)).shape == (2, 5)


def test_a_feature_map_below_1x1_is_rejected_before_training():
    with pytest.raises(ConfigError, match="conv_width 7 with valid padding shrinks a 32x32 image below 1x1"):
        build_model(ModelConfig(conv_width=7), CIFAR)
    assert count_parameters(build_model(ModelConfig(conv_width=7, padding="same"), CIFAR)) > 0


def tiny(config: ModelConfig, shape: InputShape) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(shape.channels * shape.height * shape.width, shape.classes))


def tiny_size(config: ModelConfig, shape: InputShape) -> ModelSize:
    return ModelSize(parameters=(shape.channels * shape.height * shape.width + 1) * shape.classes, activations=shape.classes)


def test_registry_builds_new_families_by_name(monkeypatch: pytest.MonkeyPatch):
    # One entry: its check, its size and its builder.
    monkeypatch.setitem(FAMILIES, "tiny_test_net", Family(fits_any_shape, tiny_size, f"{__name__}:tiny"))
    model = build_model(ModelConfig(model="tiny_test_net"), CIFAR)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize("shape", [CIFAR, InputShape(channels=1, height=28, width=40, classes=7)])
@pytest.mark.parametrize("settings", [
    {}, {"batch_norm": True}, {"padding": "same", "conv_width": 5, "dropout": 0.3},
    {"filters": (8, 16), "dense_units": 7, "batch_norm": True, "pooling": "avg"}, {"filters": (4,), "conv_width": 1},
])
def test_the_seed_familys_size_counts_the_built_models_parameters_and_layer_outputs(shape, settings):
    config = ModelConfig(**settings)
    size = family("seed_cnn").size(config, shape)
    model = build_model(config, shape)
    assert size.parameters == count_parameters(model)
    outputs = []
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.append(o.numel())) for m in model
             if not isinstance(m, (nn.ReLU, nn.Flatten))]  # in place, or a view: nothing new to keep
    model.train()(torch.zeros(2, shape.channels, shape.height, shape.width))  # two: batch norm trains on no fewer
    for hook in hooks:
        hook.remove()
    assert 2 * size.activations == sum(outputs)


FAST_SHAPES = [CIFAR, InputShape(channels=1, height=28, width=28, classes=10), InputShape(channels=3, height=40, width=24, classes=7)]


@pytest.mark.parametrize("shape", FAST_SHAPES)
@pytest.mark.parametrize("settings", [{"width_multiplier": 0.125}, {"widths": (8, 16), "pooling": "avg"}, {"widths": (6, 12, 12, 12)}])
def test_fast_resnet_builds_for_any_channels_size_and_classes_and_its_size_counts_it(shape, settings):
    config = ModelConfig(model="fast_resnet", **settings)
    model = build_model(config, shape)
    size = family("fast_resnet").size(config, shape)
    assert size.parameters == count_parameters(model)
    outputs = []
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.append(o.numel())) for m in model
             if type(m).__name__ not in ("Flatten", "Scale")]  # a view, and a product nobody's backward keeps
    x = torch.rand(2, shape.channels, shape.height, shape.width)
    logits = model.train()(x)
    for hook in hooks:
        hook.remove()
    assert logits.shape == (2, shape.classes) and 2 * size.activations == sum(outputs)
    logits.logsumexp(1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_fast_resnet_widths_scale_with_the_multiplier():
    model = build_model(ModelConfig(model="fast_resnet", width_multiplier=0.25), CIFAR)
    convs = [m.out_channels for m in model if isinstance(m, nn.Conv2d)]
    assert convs == [24, 16, 16, 64, 64, 64, 64]  # the stem's 8 per image channel, then 64, 256, 256 quartered, two per group


def test_fast_resnet_convolutions_start_by_passing_their_inputs_through():
    """Each convolution's first filters are Dirac kernels, one per input channel: at initialisation those output
    channels equal the input's (with padding 1, at every pixel); a widening convolution's other filters are random."""
    model = build_model(ModelConfig(model="fast_resnet", widths=(16, 32)), CIFAR)
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    for conv in convs:
        x = torch.randn(1, conv.in_channels, 8, 8)
        passed = min(conv.in_channels, conv.out_channels)
        assert torch.equal(conv(x)[:, :passed], x[:, :passed])
    widening = [conv for conv in convs if conv.out_channels > conv.in_channels]
    assert len(widening) == 2 and all(conv.weight[conv.in_channels:].std() > 0.01 for conv in widening)


def test_fast_resnet_refuses_images_its_groups_would_shrink_below_1x1():
    message = r"fast_resnet's 3 groups halve a 6x6 image 3 times, below 1x1; use fewer widths \(groups\) or images of at least 8x8"
    with pytest.raises(ConfigError, match=message):
        build_model(ModelConfig(model="fast_resnet"), InputShape(channels=3, height=6, width=6, classes=2))


@pytest.mark.parametrize("model, settings, message", [
    ("fast_resnet", {"dropout": 0.3}, "dropout does not apply to model 'fast_resnet', which reads widths, width_multiplier, pooling; leave dropout out"),
    ("fast_resnet", {"batch_norm": True}, "batch_norm does not apply to model 'fast_resnet'"),
    ("seed_cnn", {"widths": (8, 16)}, "widths does not apply to model 'seed_cnn', which reads filters, conv_width"),
    ("fast_resnet", {"widths": ()}, "widths [] is not allowed; use one or more positive integers"),
    ("fast_resnet", {"width_multiplier": 0.0}, "width_multiplier 0.0 is out of range; use a number > 0"),
])
def test_a_setting_the_family_does_not_read_or_out_of_range_is_one_line(model, settings, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        ModelConfig(model=model, **settings)
