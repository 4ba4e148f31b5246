"""Search spaces: the shipped spaces, the YAML format's rules, and a one-line error for every bad space."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tune_cnn.config import InputShape
from tune_cnn.errors import ConfigError
from tune_cnn.space import SPACES_DIR, Distribution, Resources, load_space, space_names

from conftest import write_space

CIFAR_SHAPE = InputShape(3, 32, 32, 10)


def test_shipped_spaces_are_all_there_and_valid_on_cifar():
    assert {"seed", "regularization", "optuna", "quick", "frontier"} <= set(space_names())
    for name in space_names():
        load_space(name).check_models(CIFAR_SHAPE)


def test_a_wheel_ships_the_spaces_where_space_py_looks_for_them(tmp_path: Path):
    """A non-editable install has no search_spaces/ beside the package: pyproject's data-files put them under the
    environment's data path, share/tune_cnn/search_spaces."""
    pytest.importorskip("setuptools")
    root = SPACES_DIR.parent
    for part in ("tune_cnn", "search_spaces"):  # a copy, so that the build leaves nothing in the checkout
        shutil.copytree(root / part, tmp_path / "src" / part, ignore=shutil.ignore_patterns("__pycache__"))
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(root / part, tmp_path / "src" / part)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
                    str(tmp_path / "src")], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("tune_cnn-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {Path(n).name for n in names if "/data/share/tune_cnn/search_spaces/" in n}
    assert shipped == {f"{name}.yaml" for name in space_names()} | {"README.md"}
    modules = {p.relative_to(root).as_posix() for p in (root / "tune_cnn").rglob("*.py")}
    assert modules <= set(names)  # every subpackage's modules too


def test_seed_space_is_the_seeds_experiment():
    space = load_space("seed")
    assert space.search == "grid" and space.metric == "val_acc" and space.mode == "max"
    assert space.swept == ["pooling", "conv_width"]
    assert {(t["pooling"], t["conv_width"]) for t in space.listed_trials()} == {(p, w) for p in ("max", "avg") for w in (3, 5, 7)}
    assert space.trial_count == 6
    fixed = space.fixed
    assert (fixed["epochs"], fixed["checkpoint_every"], fixed["batch_size"], fixed["optimizer"], fixed["lr"]) == (30, 10, 32, "adam", 0.001)
    assert space.checkpoint_epochs == [10, 20, 30]


def test_regularization_and_quick_spaces():
    reg = load_space("regularization")
    assert reg.trial_count == 6 and reg.swept == ["batch_norm", "dropout"]
    quick = load_space("quick")
    assert quick.trial_count == 4 and quick.epochs == 2 and quick.subset is not None


def test_optuna_space_has_distributions_and_asha():
    space = load_space("optuna")
    assert space.search == "optuna" and space.scheduler.type == "asha" and space.samples > 1
    assert set(space.swept) == {"pooling", "conv_width", "batch_norm", "dropout", "weight_decay", "lr"}
    assert space.space["lr"] == Distribution("loguniform", 1e-4, 3e-3)
    assert space.scheduler.max_t == 30


def test_a_space_by_path_and_by_name_are_the_same(tmp_path: Path):
    copy = write_space(tmp_path, (SPACES_DIR / "seed.yaml").read_text())
    assert load_space(copy).listed_trials() == load_space("seed").listed_trials()


def test_overrides_merge_fixed_and_resources():
    space = load_space("quick", {"fixed": {"epochs": 5}, "resources": {"gpu": 0.5}, "subset": 100, "seed": 3})
    assert space.fixed["epochs"] == 5 and space.fixed["lr"] == 0.001
    assert space.resources == Resources(cpu=1.0, gpu=0.5)
    assert (space.subset, space.seed) == (100, 3)


def test_checkpoint_epochs_include_the_last_epoch_of_every_trial(tmp_path: Path):
    path = write_space(tmp_path, """
        fixed: {checkpoint_every: 4}
        space: {epochs: [6, 10]}
    """)
    assert load_space(path).checkpoint_epochs == [4, 6, 8, 10]


def test_gpu_auto_packs_eight_trials_per_gpu_and_is_dropped_without_gpus():
    auto = Resources(gpu="auto")
    assert auto.resolve_gpu(cluster_gpus=2) == 0.125
    assert auto.resolve_gpu(cluster_gpus=0) == 0
    assert Resources(gpu=0.5).resolve_gpu(cluster_gpus=0) == 0
    assert Resources(gpu=0.5).resolve_gpu(cluster_gpus=1) == 0.5


def test_numbers_written_as_yaml_reads_1e_3_are_numbers_everywhere(tmp_path: Path):
    # PyYAML reads 1e-3 as the string '1e-3' (a YAML float needs a dot); the space stores the float it means
    grid = load_space(write_space(tmp_path, """
        fixed: {weight_decay: 5e-4, lr: 1, optimizer: sgd}
        space: {momentum: [0.5, 9e-1]}
    """, "grid.yaml"))
    assert grid.fixed == {"weight_decay": 0.0005, "lr": 1.0, "optimizer": "sgd"} and grid.space["momentum"] == (0.5, 0.9)
    assert all(type(v) is float for v in (grid.fixed["weight_decay"], grid.fixed["lr"], *grid.space["momentum"]))
    optuna = load_space(write_space(tmp_path, """
        search: optuna
        scheduler: {type: asha, reduction_factor: 3e0}
        space: {lr: {loguniform: [1e-4, 1e-2]}}
    """, "optuna.yaml"))
    assert optuna.space["lr"] == Distribution("loguniform", 0.0001, 0.01) and optuna.scheduler.reduction_factor == 3.0


def test_a_space_sweeping_the_training_recipes_settings_loads_them_typed(tmp_path: Path):
    grid = load_space(write_space(tmp_path, """
        fixed: {optimizer: nesterov, lr: 0.1, warmup: 2e-1}
        space:
          schedule: [constant, triangular, onecycle]
          label_smoothing: [0, 0.2]
          augment: [translate, flip_translate]
    """, "recipe.yaml"))
    assert grid.fixed == {"optimizer": "nesterov", "lr": 0.1, "warmup": 0.2} and grid.trial_count == 12
    assert grid.space["label_smoothing"] == (0.0, 0.2) and type(grid.space["label_smoothing"][0]) is float
    assert grid.space["schedule"] == ("constant", "triangular", "onecycle") and grid.space["augment"] == ("translate", "flip_translate")
    optuna = load_space(write_space(tmp_path, """
        search: optuna
        fixed: {schedule: onecycle}
        space: {warmup: {uniform: [0.0, 0.5]}, label_smoothing: {uniform: [0.0, 0.3]}, optimizer: [sgd, nesterov]}
    """, "recipe_optuna.yaml"))
    assert optuna.space["warmup"] == Distribution("uniform", 0.0, 0.5) and optuna.optimizers == {"sgd", "nesterov"}


def test_a_steps_space_runs_one_trial_per_step_each_with_every_change_before_it(tmp_path: Path):
    path = write_space(tmp_path, """
        search: steps
        fixed: {epochs: 3, padding: same}
        space:
          - {}
          - {batch_norm: true, dropout: 0.25}
          - {augment: flip}
          - {dropout: 0.1, lr: 3e-3}
    """)
    space = load_space(path)
    assert space.trial_count == space.samples == 4 and space.lists_trials
    assert space.swept == ["batch_norm", "dropout", "augment", "lr"]
    assert space.steps == ({}, {"batch_norm": True, "dropout": 0.25}, {"augment": "flip"}, {"dropout": 0.1, "lr": 0.003})
    base = {"epochs": 3, "padding": "same"}
    assert space.listed_trials() == [
        {**base, "batch_norm": False, "dropout": 0.0, "augment": "none", "lr": 0.001},
        {**base, "batch_norm": True, "dropout": 0.25, "augment": "none", "lr": 0.001},
        {**base, "batch_norm": True, "dropout": 0.25, "augment": "flip", "lr": 0.001},
        {**base, "batch_norm": True, "dropout": 0.1, "augment": "flip", "lr": 0.003},
    ]
    assert space.space == {"batch_norm": (False, True), "dropout": (0.0, 0.25, 0.1), "augment": ("none", "flip"), "lr": (0.001, 0.003)}
    space.check_models(CIFAR_SHAPE)


def test_a_steps_space_checks_each_trials_model_not_every_combination(tmp_path: Path):
    """A step to another family leaves the earlier family's settings behind: each trial's model fits, though mixing the
    values of different steps (seed_cnn at width_multiplier 0.5) would not."""
    path = write_space(tmp_path, """
        search: steps
        space: [{}, {model: fast_resnet, width_multiplier: 0.5}]
    """)
    space = load_space(path)
    space.check_models(CIFAR_SHAPE)
    assert [t["model"] for t in space.listed_trials()] == ["seed_cnn", "fast_resnet"]


def test_int_distributions_are_inclusive_and_checked_value_by_value(tmp_path: Path):
    ok = write_space(tmp_path, """
        search: optuna
        space: {dense_units: {int: [8, 64]}}
    """, "ok.yaml")
    assert load_space(ok).space["dense_units"].probes()[-1] == 64
    even = write_space(tmp_path, """
        search: optuna
        space: {conv_width: {int: [3, 7]}}
    """, "even.yaml")
    with pytest.raises(ConfigError, match=r"even\.yaml: space\.conv_width: conv_width 4 is not allowed"):
        load_space(even)


THOUSAND_LRS, THOUSAND_SEEDS = ", ".join(f"{i + 1}.0e-5" for i in range(1000)), ", ".join(map(str, range(1000)))
BAD_SPACES = {
    "unknown top-level key": ("serach: grid\n", r"serach: unknown key; allowed keys: search, metric"),
    "unknown setting in space": ("space: {colour: [red]}\n", r"space\.colour: unknown key; allowed: .*pooling"),
    "unknown setting in fixed": ("fixed: {learning_rate: 0.1}\n", r"fixed\.learning_rate: unknown key"),
    "wrong type": ("fixed: {epochs: ten}\n", r"fixed\.epochs: epochs 'ten' has the wrong type; expected an integer"),
    "wrong type in a grid": ("space: {batch_norm: [true, 'yes']}\n", r"space\.batch_norm: batch_norm 'yes' has the wrong type"),
    "dropout out of range": ("space: {dropout: [0.0, 1.5]}\n", r"space\.dropout: dropout 1\.5 is out of range; use 0 <= dropout < 1"),
    "negative gpu": ("resources: {gpu: -1}\n", r"resources\.gpu: -1 is not allowed; use 0, a fraction of one GPU \(0\.25, 0\.5\), a whole number, or auto"),
    "gpu neither number nor auto": ("resources: {gpu: lots}\n", r"resources\.gpu: .lots. is not allowed"),
    "gpu over one, not whole": ("resources: {gpu: 1.5}\n", r"resources\.gpu: 1\.5 is not allowed"),
    "gpu not a number": ("resources: {gpu: .nan}\n", r"resources\.gpu: nan is not allowed"),
    "gpu infinite": ("resources: {gpu: .inf}\n", r"resources\.gpu: inf is not allowed"),
    "cpu infinite": ("resources: {cpu: .inf}\n", r"resources\.cpu: inf is not allowed; use a finite number > 0"),
    "zero cpu": ("resources: {cpu: 0}\n", r"resources\.cpu: 0 is not allowed; use a finite number > 0"),
    "distribution in grid mode": ("space: {lr: {loguniform: [0.0001, 0.01]}}\n", r"space\.lr: distributions are for optuna search"),
    "a grid with no trials": ("space: {pooling: []}\n", r"space\.pooling: an empty list yields no trials"),
    "a grid of a million trials": (
        f"space: {{lr: [{THOUSAND_LRS}], seed: [{THOUSAND_SEEDS}]}}\n",
        r"space: the grid has 1,000,000 trials \(1000 lr x 1000 seed\), more than 10,000; sweep fewer values, or use search: optuna",
    ),
    "a single value in space": ("space: {pooling: max}\n", r"space\.pooling: 'max' is one value; list the values"),
    "fixed and swept": ("fixed: {pooling: max}\nspace: {pooling: [max, avg]}\n", r"space\.pooling: is both fixed and swept"),
    "unknown search": ("search: random\n", r"search: 'random' is not allowed; use one of: grid, optuna"),
    "test metric": ("metric: test_acc\n", r"metric: 'test_acc' is not allowed; use one of: val_acc"),
    "samples in grid mode": ("samples: 4\n", r"samples: applies to optuna search only"),
    "optuna without a space": ("search: optuna\n", r"space: optuna needs at least one swept setting"),
    "zero samples": ("search: optuna\nsamples: 0\nspace: {pooling: [max]}\n", r"samples: 0 is not allowed; use an integer >= 1"),
    "unknown distribution": ("search: optuna\nspace: {lr: {normal: [0, 1]}}\n", r"space\.lr: a distribution is one of"),
    "reversed bounds": ("search: optuna\nspace: {lr: {uniform: [0.1, 0.01]}}\n", r"space\.lr: uniform takes \[low, high\] with low < high"),
    "loguniform from zero": ("search: optuna\nspace: {weight_decay: {loguniform: [0, 0.1]}}\n", r"loguniform needs low > 0"),
    "infinite bound": ("search: optuna\nspace: {lr: {loguniform: [1.0e-4, .inf]}}\n", r"space\.lr: loguniform takes \[low, high\] with low < high"),
    "long int range with even values": ("search: optuna\nspace: {conv_width: {int: [1, 65]}}\n", r"space\.conv_width: conv_width 2 is not allowed"),
    "infinite lr": ("fixed: {lr: .inf}\n", r"fixed\.lr: lr inf is out of range"),
    "sweep seed too large": ("seed: 4294967296\n", r"seed: 4294967296 is not allowed; use an integer >= 0 and <= 4294967295"),
    "cuda without a GPU per trial": ("fixed: {device: cuda}\n", r"resources\.gpu: device cuda needs a GPU per trial"),
    "swept cuda without a GPU per trial": ("space: {device: [cpu, 'cuda:0']}\n", r"resources\.gpu: device cuda needs a GPU per trial"),
    "a value listed twice": ("space: {lr: [0.001, 1e-3]}\n", r"space\.lr: lists 0\.001 twice; list each value once"),
    "a GPU index a trial cannot see": (
        "resources: {gpu: 0.5}\nfixed: {device: 'cuda:1'}\n", r"fixed\.device: 'cuda:1': a trial sees only the 1 GPU\(s\) Ray gives it, as cuda:0 to cuda:0",
    ),
    "max_t short of the epochs": ("fixed: {epochs: 30}\nscheduler: {type: asha, max_t: 10}\n", r"scheduler\.max_t: 10 is less than epochs 30"),
    "two swept settings that clash": (
        "search: optuna\nspace: {batch_norm: [false, true], batch_size: {int: [1, 100]}}\n",
        r"space\.batch_norm and space\.batch_size: batch_norm needs batch_size 2 or more",
    ),
    "distribution out of range": ("search: optuna\nspace: {dropout: {uniform: [0.0, 1.5]}}\n", r"space\.dropout: dropout 1\.5 is out of range"),
    "unknown scheduler": ("scheduler: hyperband\n", r"scheduler: 'hyperband' is not allowed; use one of: fifo, asha"),
    "asha setting on fifo": ("scheduler: {type: fifo, grace_period: 2}\n", r"scheduler\.grace_period: applies to the asha scheduler only"),
    "grace period past the end": ("fixed: {epochs: 3}\nscheduler: {type: asha, grace_period: 5}\n", r"scheduler\.grace_period: 5 is more than max_t 3"),
    "not a mapping": ("- pooling\n- conv_width\n", r"a search space is a YAML mapping"),
    "empty": ("", r"bad\.yaml: holds no settings \(empty, or comments only\); a search space is a YAML mapping of search, .* at least `fixed` or `space`"),
    "comments only": ("# pooling: [max, avg]\n\n", r"bad\.yaml: holds no settings \(empty, or comments only\)"),
    "subset zero": ("subset: 0\n", r"subset: 0 is not allowed; use an integer >= 1"),
    "a fast_resnet setting for the seed model": ("fixed: {width_multiplier: 0.5}\n",
                                                 r"fixed\.width_multiplier: width_multiplier does not apply to model 'seed_cnn'"),
    "a seed setting for fast_resnet": ("fixed: {model: fast_resnet, dropout: 0.25}\n",
                                       r"fixed\.dropout: dropout does not apply to model 'fast_resnet'"),
    "momentum swept for adam only": ("space: {momentum: [0.0, 0.9]}\n", r"space\.momentum: every trial uses optimizer adam, which ignores momentum"),
    "a warm-up for the cosine schedule": ("fixed: {schedule: cosine}\nspace: {warmup: [0.0, 0.1]}\n",
                                          r"space\.warmup: warmup does not apply to schedule cosine, which sets one rate per epoch"),
    "label smoothing out of range": ("space: {label_smoothing: [0.1, 1.0]}\n", r"space\.label_smoothing: label_smoothing 1\.0 is out of range"),
    "steps not a list": ("search: steps\nspace: {lr: [0.1]}\n", r"space: a steps search lists its steps, each a mapping"),
    "a step not a mapping": ("search: steps\nspace: [{}, dropout]\n", r"space\[1\]: 'dropout' is not a mapping"),
    "a step changing a fixed setting": ("search: steps\nfixed: {lr: 0.01}\nspace: [{}, {lr: 0.1}]\n", r"space\[1\]\.lr: is fixed"),
    "a step changing nothing": ("search: steps\nspace: [{dropout: 0.1}, {dropout: 0.1}]\n", r"space\[1\]: changes nothing from the step before"),
    "a step out of range": ("search: steps\nspace: [{}, {dropout: 1.5}]\n", r"space\[1\]: dropout 1\.5 is out of range"),
    "a step clashing with the steps before": ("search: steps\nspace: [{model: fast_resnet}, {dropout: 0.2}]\n",
                                              r"space\[1\]: dropout does not apply to model 'fast_resnet'"),
    "samples in a steps search": ("search: steps\nsamples: 2\nspace: [{}]\n", r"samples: applies to optuna search only; a steps search runs"),
    "nesterov without momentum": ("fixed: {optimizer: nesterov}\nspace: {momentum: [0.0, 0.9]}\n", r"space\.momentum: optimizer nesterov needs momentum > 0"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPACES))
def test_bad_space_is_one_line_naming_file_and_key(tmp_path: Path, case: str):
    text, expected = BAD_SPACES[case]
    path = write_space(tmp_path, text, "bad.yaml")
    with pytest.raises(ConfigError) as caught:
        load_space(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert re.search(expected, message), message


def test_momentum_swept_beside_adam_trials_is_a_notice(tmp_path: Path):
    mixed = load_space(write_space(tmp_path, "space: {optimizer: [adam, sgd], momentum: [0.0, 0.9]}\n", "mixed.yaml"))
    assert mixed.notices == ["notice: Adam ignores momentum: trials with optimizer adam that differ only in momentum train alike"]
    sgd = load_space(write_space(tmp_path, "fixed: {optimizer: sgd}\nspace: {momentum: [0.0, 0.9]}\n", "sgd.yaml"))
    assert sgd.notices == [] and load_space("seed").notices == []


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path):
    path = write_space(tmp_path, "search: grid\nspace:\n  pooling: [max, avg\n  conv_width: [3]\n", "broken.yaml")
    with pytest.raises(ConfigError, match=r"broken\.yaml: line \d+: YAML syntax error") as caught:
        load_space(path)
    assert "\n" not in str(caught.value)


def test_a_binary_file_is_not_a_space(tmp_path: Path):
    path = tmp_path / "weights.yaml"
    path.write_bytes(bytes(range(256)))
    with pytest.raises(ConfigError, match=r"weights\.yaml: not a text file; a search space is a YAML file"):
        load_space(path)


def test_a_folder_is_not_a_space(tmp_path: Path):
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(tmp_path))} is a folder; give a search space YAML file, or one of: .*seed"):
        load_space(tmp_path)


def test_unknown_space_name_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match=r"search space 'nope' not found; .*one of: .*quick.*seed"):
        load_space("nope")


def test_a_model_that_does_not_fit_the_images_is_caught_before_training(tmp_path: Path):
    path = write_space(tmp_path, "space: {conv_width: [3, 7]}\n", "valid.yaml")  # valid padding: 7 is too wide for 32x32
    space = load_space(path)
    with pytest.raises(ConfigError, match=r"valid\.yaml: conv_width=7: conv_width 7 with valid padding shrinks a 32x32"):
        space.check_models(CIFAR_SHAPE)
    space.check_models(InputShape(3, 64, 64, 10))


def test_overrides_do_not_hide_a_malformed_section(tmp_path: Path):
    path = write_space(tmp_path, "fixed: [epochs, 3]\n", "list.yaml")
    with pytest.raises(ConfigError, match=r"list\.yaml: fixed: expected a mapping"):
        load_space(path, {"fixed": {"epochs": 2}})
