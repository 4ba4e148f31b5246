"""The memory estimate: what it counts against what torch allocates, and the one-line refusals it makes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tune_cnn import memory
from tune_cnn.config import InputShape, TrainConfig
from tune_cnn.errors import ConfigError
from tune_cnn.memory import check_fits, check_sweep_memory, trial_memory
from tune_cnn.models import build_model, count_parameters
from tune_cnn.space import load_space

from conftest import make_image_folder

CIFAR = InputShape(channels=3, height=32, width=32, classes=10)


@pytest.mark.parametrize("settings, copies", [({"optimizer": "adam"}, 4), ({"optimizer": "sgd"}, 3), ({"optimizer": "sgd", "momentum": 0.0}, 2),
                                              ({"optimizer": "nesterov", "ema": 0.99}, 4)])
def test_weights_count_the_parameters_their_gradients_and_the_optimizers_state(settings, copies):
    config = TrainConfig.from_flat(settings)
    estimate = trial_memory(config, CIFAR, images=60_000)
    assert estimate.weights == 4 * copies * count_parameters(build_model(config.model, CIFAR))
    assert estimate.data == 60_000 * 3 * 32 * 32


MEASURE_ENGINE = """
import sys
sys.path.insert(0, sys.argv[1])
from conftest import synthetic_splits
from tune_cnn.config import TrainConfig
from tune_cnn.engine import build_engine
from tune_cnn.memory import trial_memory

def resident_bytes():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096

data = synthetic_splits(train=64, val=32, test=32, seed=1, size=32)
config = TrainConfig.from_flat({"dense_units": 40_000, "device": "cpu", "batch_size": 32, "eval_batch_size": 32})
estimate = trial_memory(config, data.shape, data.images)
before = resident_bytes()
engine = build_engine(config, data.shape, data.mean, data.std)
engine.train_epoch(engine.put(data.train))
print(resident_bytes() - before, estimate.weights, estimate.total - estimate.runtime)
"""


def test_the_estimate_is_what_an_engine_allocates_for_a_large_dense_layer():
    """On 32x32 images the seed model's dense layer takes 1024 inputs; 40,000 units make 41M weights, whose
    weights, gradients and Adam's two moments (about 630 MiB) dwarf everything else an engine holds. It is measured
    in a fresh interpreter, where no earlier test's garbage is freed while the engine grows."""
    run = subprocess.run([sys.executable, "-c", MEASURE_ENGINE, str(Path(__file__).parent)], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
    grown, weights, without_runtime = map(int, run.stdout.split())
    assert 0.8 * weights < grown < 1.25 * without_runtime, (grown, weights, without_runtime)


def test_a_trial_that_cannot_fit_is_one_line_saying_what_it_needs_and_what_to_change():
    estimate = trial_memory(TrainConfig.from_flat({"dense_units": 100_000_000}), CIFAR, images=60_000)
    with pytest.raises(ConfigError) as error:
        check_fits(estimate, 16 * 2**30, "this trial")
    message = str(error.value)
    assert message.startswith("this trial: needs about ") and "and this machine has 16.0 GiB available" in message
    assert "weights and optimizer 1542.3 GiB" in message and "fewer dense_units" in message and "\n" not in message
    check_fits(trial_memory(TrainConfig(), CIFAR, images=60_000), 16 * 2**30, "this trial")  # the seed model fits


def test_a_sweep_that_fits_one_trial_but_not_all_at_once_says_to_run_fewer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "wide.yaml").write_text("resources: {cpu: 1}\nspace: {dense_units: [64, 4000000]}\n")
    space = load_space(tmp_path / "wide.yaml")
    largest = trial_memory(TrainConfig.from_flat({"dense_units": 4_000_000}), CIFAR, images=1000).total
    monkeypatch.setattr(memory, "available_memory", lambda: int(1.5 * largest))
    monkeypatch.setattr("tune_cnn.space.os.cpu_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"wide\.yaml: the largest trial \(dense_units=4000000\): 2 trials at once need .* fewer trials at once"):
        check_sweep_memory(space, CIFAR, 1000, max_concurrent=None)
    line = check_sweep_memory(space, CIFAR, 1000, max_concurrent=1)
    assert line.startswith("memory: the largest trial needs about ") and "1 at once" in line and "available" in line


def test_an_allocation_that_fails_despite_the_estimate_is_one_line(tmp_path: Path):
    """Under an address-space limit of 300 MiB beyond what the process holds, the 1 GB dense layer fits the
    machine (the estimate lets it through) and not the process: torch's allocator fails, and the run says so in one line."""
    images = make_image_folder(tmp_path / "images")
    script = (
        "import resource, sys\n"
        "import torch\n"
        "from tune_cnn.train import main\n"
        "held = int(open('/proc/self/status').read().split('VmSize:')[1].split()[0]) * 1024\n"
        "resource.setrlimit(resource.RLIMIT_AS, (held + 300 * 2**20, resource.RLIM_INFINITY))\n"
        "main(sys.argv[1:])\n"
    )
    run = subprocess.run([sys.executable, "-c", script, "--data", str(images), "--set", "dense_units=4000000", "epochs=1"],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "TUNE_CNN_CACHE": str(tmp_path / "cache")})
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.startswith("error: this trial ran out of memory on cpu (") and run.stderr.count("\n") == 1, run.stderr
    assert "can't allocate memory" in run.stderr and "fewer dense_units" in run.stderr, run.stderr
