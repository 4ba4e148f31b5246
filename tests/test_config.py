import subprocess
import sys

import pytest

from tune_cnn.config import InputShape, ModelConfig, TrainConfig
from tune_cnn.errors import ConfigError
from tune_cnn.space import load_space
from tune_cnn.train import parse_settings

from conftest import ROOT, write_space

CIFAR = InputShape(channels=3, height=32, width=32, classes=10)


@pytest.mark.parametrize(
    "settings, words",
    [
        ({"lr": 0}, "lr 0.0 is out of range"),
        ({"epochs": 0}, "epochs 0 is out of range"),
        ({"dropout": 1.5}, "dropout 1.5 is out of range"),
        ({"batch_size": "big"}, "batch_size 'big' has the wrong type; expected an integer, such as 30"),
        ({"epochs": "1e9"}, "epochs '1e9' has the wrong type; expected an integer, such as 30 (1e3 is text: write 1000)"),
        ({"epochs": 2.0}, "epochs 2.0 has the wrong type; expected an integer"),
        ({"batch_norm": "yes"}, "batch_norm 'yes' has the wrong type; expected true or false"),
        ({"optimizer": "rmsprop"}, "optimizer 'rmsprop' is not allowed; use one of: adam, sgd, nesterov"),
        ({"optimizer": "nesterov", "momentum": 0.0}, "optimizer nesterov needs momentum > 0 (with none it is plain SGD); set momentum, such as 0.9"),
        ({"label_smoothing": 1.0}, "label_smoothing 1.0 is out of range; use 0 <= label_smoothing < 1, such as 0.1"),
        ({"label_smoothing": -0.1}, "label_smoothing -0.1 is out of range"),
        ({"label_smoothing": "some"}, "label_smoothing 'some' has the wrong type; expected a number"),
        ({"warmup": 1}, "warmup 1.0 is out of range; use a fraction of the training steps, 0 <= warmup < 1, such as 0.2"),
        ({"warmup": float("nan")}, "warmup nan is out of range"),
        ({"schedule": "cosine", "warmup": 0.1}, "warmup does not apply to schedule cosine, which sets one rate per epoch; use schedule onecycle"),
        ({"schedule": "linear"}, "schedule 'linear' is not allowed; use one of: constant, cosine, triangular, onecycle"),
        ({"augment": "rotate"}, "augment 'rotate' is not allowed; use one of: none, flip, crop, crop_flip, translate, flip_translate"),
        ({"learning_rate": 0.1}, "unknown setting(s) learning_rate; allowed:"),
        ({"device": "gpu"}, "device 'gpu' is unknown; use auto, cpu, cuda or cuda:N"),
        ({"seed": -1}, "seed -1 is out of range; use an integer from 0 to 4294967295"),
        ({"weight_decay": float("inf")}, "weight_decay inf is out of range"),
        ({"lr": "fast"}, "lr 'fast' has the wrong type; expected a number, such as 0.001"),
        ({"filters": "(32, 64)"}, "filters '(32, 64)' has the wrong type; expected a list of integers, such as [32, 64, 64]"),
        ({"ema": 1}, "ema 1.0 is out of range; use 0 <= ema < 1, such as 0.99"),
        ({"ema": -0.5}, "ema -0.5 is out of range"),
        ({"ema": float("nan")}, "ema nan is out of range"),
        ({"ema": "slow"}, "ema 'slow' has the wrong type; expected a number"),
        ({"tta": "rotate"}, "tta 'rotate' is not allowed; use one of: none, flip, flip_translate"),
        ({"tta": True}, "tta 'True' is not allowed; use one of: none, flip, flip_translate"),
    ],
)
def test_bad_settings_raise_one_clear_error(settings, words):
    with pytest.raises(ConfigError) as error:
        TrainConfig.from_flat(settings)
    assert words in str(error.value) and "\n" not in str(error.value)


def test_a_number_written_as_text_is_a_float_where_a_float_is_due():
    """YAML reads 1e-3 (no dot) as text, in a space file and in --set lr=1e-3 alike."""
    config = TrainConfig.from_flat({"lr": "1e-3", "weight_decay": "5e-4"})
    assert (config.lr, config.weight_decay) == (0.001, 0.0005)


def test_flat_round_trips():
    config = TrainConfig.from_flat({"pooling": "avg", "conv_width": 5, "epochs": 3, "filters": [16, 32, 32]})
    assert TrainConfig.from_flat(config.flat()) == config
    assert config.model.filters == (16, 32, 32)


def test_the_training_recipes_settings_are_off_by_default_and_set_as_any_other():
    """Off by default (every earlier run trains as it did); --set gives them as YAML reads them (an int where a float is due)."""
    default = TrainConfig()
    assert (default.optimizer, default.schedule, default.warmup, default.label_smoothing, default.augment) == ("adam", "constant", 0.0, 0.0, "none")
    settings = {"optimizer": "nesterov", "schedule": "onecycle", "warmup": "2e-1", "label_smoothing": 0, "augment": "flip_translate"}
    config = TrainConfig.from_flat(settings)
    assert (config.warmup, config.label_smoothing) == (0.2, 0.0) and type(config.label_smoothing) is float
    assert TrainConfig.from_flat(config.flat()) == config
    for schedule in ("constant", "triangular", "onecycle"):
        assert TrainConfig.from_flat({"schedule": schedule, "warmup": 0.3}).warmup == 0.3


def test_the_weight_average_and_test_time_augmentation_are_off_by_default_and_set_from_the_command_line_and_a_space(tmp_path):
    assert (TrainConfig().ema, TrainConfig().tta) == (0.0, "none")
    config = TrainConfig.from_flat(parse_settings(["ema=0.99", "tta=flip"]))
    assert (config.ema, config.tta) == (0.99, "flip") and TrainConfig.from_flat(config.flat()) == config
    assert type(TrainConfig.from_flat({"ema": 0}).ema) is float
    space = load_space(write_space(tmp_path, """
        fixed: {ema: 9.9e-1}
        space: {tta: [none, flip, flip_translate]}
    """))
    assert space.fixed == {"ema": 0.99} and space.space["tta"] == ("none", "flip", "flip_translate") and space.trial_count == 3
    with pytest.raises(ConfigError, match=r"ema 1\.5 is out of range"):
        TrainConfig(ema=1.5)
    with pytest.raises(ConfigError, match=r"^tta 'mirror' is unknown; use one of none, flip, flip_translate$"):
        TrainConfig(tta="mirror")


@pytest.mark.parametrize(
    "settings, words",
    [
        ({"conv_width": 2}, "odd integer"),
        ({"conv_width": 0}, "odd integer"),
        ({"dropout": 1.5}, "0 <= dropout < 1"),
        ({"pooling": "min"}, "'max' or 'avg'"),
        ({"padding": "full"}, "'valid' or 'same'"),
        ({"model": "resnet9000"}, "choose one of: fast_resnet, seed_cnn"),
    ],
)
def test_invalid_settings_are_rejected(settings, words):
    with pytest.raises(ConfigError, match=words):
        ModelConfig(**settings)


def test_a_model_that_does_not_fit_the_images_is_found_without_building_it():
    with pytest.raises(ConfigError, match="conv_width 7 with valid padding shrinks a 32x32 image below 1x1"):
        ModelConfig(conv_width=7).check_fits(CIFAR)
    ModelConfig(conv_width=7, padding="same").check_fits(CIFAR)
    with pytest.raises(ConfigError, match=r"shrinks a 32x32 image below 1x1 in 7 convolutions and the poolings between them; use fewer filters"):
        ModelConfig(filters=(8,) * 7, padding="same").check_fits(CIFAR)


def test_a_sweeps_driver_and_the_analysis_never_import_torch(image_folder, decode_cache):
    """Reading a space, loading and checking the data, and loading the analysis: only trials need torch."""
    code = ("import sys; from tune_cnn.analysis import load; from tune_cnn.data import load_data; import tune_cnn.sweep as s; "
            "space = s.load_space('seed'); data = load_data(sys.argv[1]); space.check_models(data.shape); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    run = subprocess.run([sys.executable, "-c", code, str(image_folder)], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[]"  # after the first load's "decoding ..." line
