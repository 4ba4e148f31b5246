"""Every mistake a learner can make at the three commands ends in one `error:` line and exit code 2.

Each case runs the real command in a subprocess (so a traceback or a hang cannot hide) and checks that
nothing was created where the command would have written: the sweep's storage, the training's checkpoints,
the analysis's output folder. A property-based test holds the search-space loader to the same contract.
"""
from __future__ import annotations

import io
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tune_cnn.config import SETTINGS, TrainConfig
from tune_cnn.errors import ConfigError
from tune_cnn.space import TOP_KEYS, load_space

from conftest import make_image_folder

pytestmark = pytest.mark.usefixtures("decode_cache")
TINY_SPACE = "fixed: {epochs: 1, padding: same}\nspace: {pooling: [max]}\n"
COMMAND_TIMEOUT_S = 120  # a hang (e.g. on an unreachable cluster) fails the test instead of the suite


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data") / "images")


# --- Building the bad inputs ----------------------------------------------------------------------------


def space_file(tmp: Path, text: str) -> str:
    path = tmp / "space.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def broken_copy(images: Path, tmp: Path, damage: Callable[[Path], object]) -> str:
    """A copy of the good image folder with one thing wrong."""
    copy = Path(shutil.copytree(images, tmp / "data"))
    damage(copy)
    return str(copy)


def refused_port() -> int:
    """A local port nothing listens on: connecting to it is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def evil_checkpoint(tmp: Path) -> str:
    """A checkpoint whose unpickling would run a command: safe loading must refuse it."""

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {tmp / 'pwned'}",))

    folder = tmp / "evil"
    folder.mkdir()
    (folder / "checkpoint.pt").write_bytes(pickle.dumps({"epoch": RunsCode()}))
    return str(folder)


def evil_tar(tmp: Path, member: str, link: bool = False) -> str:
    """An archive with one member that would land outside the cache folder if extracted naively."""
    archive = tmp / "evil.tar.gz"
    info = tarfile.TarInfo(member)  # TarInfo keeps the name as given, where tar.add would strip a leading /
    with tarfile.open(archive, "w:gz") as tar:
        if link:
            info.type, info.linkname = tarfile.SYMTYPE, "/etc"
            tar.addfile(info)
        else:
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    return str(archive)


def empty_folder(tmp: Path) -> str:
    (tmp / "empty").mkdir()
    return str(tmp / "empty")


def one_class(tmp: Path) -> str:
    return str(make_image_folder(tmp / "single", classes=("cat",), per_class={"train": 2, "test": 1}))


def garbage_archive(tmp: Path) -> str:
    (tmp / "data.tar.gz").write_bytes(b"garbage")
    return str(tmp / "data.tar.gz")


def link_loop(tmp: Path) -> str:
    (tmp / "loop1").symlink_to("loop2")
    (tmp / "loop2").symlink_to("loop1")
    return str(tmp / "loop1")


def not_an_experiment(tmp: Path) -> str:
    folder = tmp / "photos"
    folder.mkdir()
    (folder / "holiday.txt").write_text("not a sweep")
    return str(folder)


# Each case: (command, a function of (tmp, images) returning the arguments, a fragment of the expected line).
# `OUT` in the arguments is replaced by the folder the command must not create.
Case = tuple[str, Callable[[Path, Path], list[str]], str]
CASES: dict[str, Case] = {
    # Search spaces
    "yaml syntax error": ("sweep", lambda t, i: [space_file(t, "space: {pooling: [max\n"), "--data", str(i)], "YAML syntax error"),
    "unknown key": ("sweep", lambda t, i: [space_file(t, "serach: grid\n"), "--data", str(i)], "serach: unknown key"),
    "unknown setting": ("sweep", lambda t, i: [space_file(t, "space: {poolng: [max]}\n"), "--data", str(i)], "space.poolng: unknown key"),
    "wrong type": ("sweep", lambda t, i: [space_file(t, "fixed: {epochs: ten}\n"), "--data", str(i)], "wrong type"),
    "dropout 1.5": ("sweep", lambda t, i: [space_file(t, "space: {dropout: [0.0, 1.5]}\n"), "--data", str(i)], "dropout 1.5 is out of range"),
    "lr 0": ("sweep", lambda t, i: [space_file(t, "fixed: {lr: 0}\nspace: {pooling: [max]}\n"), "--data", str(i)], "fixed.lr"),
    "epochs 0": ("sweep", lambda t, i: ["quick", "--epochs", "0", "--data", str(i)], "epochs 0 is out of range"),
    "gpu -1": ("sweep", lambda t, i: ["quick", "--gpus-per-trial", "-1", "--data", str(i)], "resources.gpu (set on the command line): -1.0 is not allowed"),
    "distribution in grid mode": (
        "sweep", lambda t, i: [space_file(t, "space: {lr: {loguniform: [0.0001, 0.01]}}\n"), "--data", str(i)],
        "distributions are for optuna search",
    ),
    "loguniform from 0": (
        "sweep", lambda t, i: [space_file(t, "search: optuna\nspace: {lr: {loguniform: [0, 0.01]}}\n"), "--data", str(i)],
        "loguniform needs low > 0",
    ),
    "conv_width too wide for the images": (
        "sweep", lambda t, i: [space_file(t, "space: {conv_width: [3, 9]}\n"), "--data", str(i)], "conv_width 9 with valid padding",
    ),
    "unknown space name": ("sweep", lambda t, i: ["nope", "--data", str(i)], "search space 'nope' not found"),
    "cpus per trial 0": ("sweep", lambda t, i: ["quick", "--cpus-per-trial", "0", "--data", str(i)],
                         "resources.cpu (set on the command line): 0.0 is not allowed"),
    # Data
    "data path that does not exist": ("sweep", lambda t, i: [space_file(t, TINY_SPACE), "--data", str(t / "nowhere")], "does not exist"),
    "empty data folder": ("train", lambda t, i: ["--data", empty_folder(t)], "is empty"),
    "partial image folder (no test split)": (
        "train", lambda t, i: ["--data", broken_copy(i, t, lambda d: shutil.rmtree(d / "test"))], "test",
    ),
    "class folder without images": (
        "sweep", lambda t, i: [space_file(t, TINY_SPACE), "--data", broken_copy(i, t, lambda d: (d / "train" / "bird").mkdir())],
        "train/bird has no images (.bmp, .jpeg, .jpg, .png, .tif, .tiff, .webp)",
    ),
    "corrupt image": (
        "sweep", lambda t, i: [space_file(t, TINY_SPACE), "--data", broken_copy(i, t, lambda d: (d / "train" / "dog" / "0003.png").write_bytes(b"junk"))],
        "cannot read image",
    ),
    "mixed image sizes": (
        "train", lambda t, i: ["--data", broken_copy(i, t, lambda d: Image.new("RGB", (24, 20)).save(d / "train" / "cat" / "0001.png"))],
        "image sizes differ",
    ),
    "train and test classes differ": (
        "sweep", lambda t, i: [space_file(t, TINY_SPACE), "--data", broken_copy(i, t, lambda d: shutil.rmtree(d / "test" / "frog"))],
        "classes differ from train",
    ),
    "archive that is not one": ("train", lambda t, i: ["--data", garbage_archive(t)], "not a readable archive"),
    "archive member escaping the cache": ("train", lambda t, i: ["--data", evil_tar(t, "../../escaped.txt")], "unsafe path '../../escaped.txt'"),
    "archive member with an absolute path": ("train", lambda t, i: ["--data", evil_tar(t, "/tmp/escaped.txt")], "unsafe path '/tmp/escaped.txt'"),
    "archive member that links outside": ("train", lambda t, i: ["--data", evil_tar(t, "train", link=True)], "holds a link (train)"),
    "subset larger than the data": ("train", lambda t, i: ["--data", str(i), "--subset", "999"], "subset 999 is out of range"),
    "subset smaller than the classes": ("train", lambda t, i: ["--data", str(i), "--subset", "2"], "use 3 (one image of each class)"),
    "a data set of one class": ("train", lambda t, i: ["--data", one_class(t)], "has one class (cat); a classifier needs two or more"),
    "a sweep on a data set of one class": (
        "sweep", lambda t, i: [space_file(t, TINY_SPACE), "--data", one_class(t)], "has one class (cat); a classifier needs two or more",
    ),
    # Training settings
    "GPU requested where there is none": ("train", lambda t, i: ["--data", str(i), "--set", "device=cuda"], "has no CUDA GPU"),
    "unknown training setting": ("train", lambda t, i: ["--data", str(i), "--set", "epoch=3"], "unknown setting(s) epoch"),
    "--set with a value that is not YAML": ("train", lambda t, i: ["--data", str(i), "--set", "pooling=["], "'[' is not a value"),
    "unknown device": ("train", lambda t, i: ["--data", str(i), "--set", "device=gpu"], "device 'gpu' is unknown"),
    "--set without a value": ("train", lambda t, i: ["--data", str(i), "--set", "epochs"], "write NAME=VALUE"),
    "--set without a name": ("train", lambda t, i: ["--data", str(i), "--set", "=5"], "--set =5: write NAME=VALUE"),
    "a model too large for the machine's memory": ("train", lambda t, i: ["--data", str(i), "--set", "dense_units=100000000"],
                                                   "this trial: needs about "),
    "a sweep whose largest trial cannot fit the machine's memory": (
        "sweep", lambda t, i: [space_file(t, "fixed: {epochs: 1}\nspace: {dense_units: [8, 100000000]}\n"), "--data", str(i)],
        "the largest trial (dense_units=100000000): 2 trials at once need",
    ),
    "--set naming a setting twice": ("train", lambda t, i: ["--data", str(i), "--set", "epochs=1", "epochs=2"],
                                     "--set epochs: named twice; give each setting once"),
    "--set of an integer in e-notation": ("train", lambda t, i: ["--data", str(i), "--set", "epochs=1e9"],
                                          "epochs '1e9' has the wrong type; expected an integer"),
    "a space file with comments only": ("sweep", lambda t, i: [space_file(t, "# space: {pooling: [max]}\n"), "--data", str(i)],
                                        "holds no settings (empty, or comments only)"),
    "an empty --data": ("train", lambda t, i: ["--data", ""], "--data is empty; pass cifar10, a folder or an archive"),
    "a data link that leads nowhere": ("train", lambda t, i: ["--data", link_loop(t)], "is a link to loop2, which leads nowhere"),
    "epochs beyond any real run": ("train", lambda t, i: ["--data", str(i), "--set", "epochs=100000000"],
                                   "epochs 100000000 is out of range; use an integer from 1 to 10,000"),
    "no filters": ("train", lambda t, i: ["--data", str(i), "--set", "filters=[]"], "filters [] is not allowed; use one or more positive integers"),
    "no dense units": ("train", lambda t, i: ["--data", str(i), "--set", "dense_units=0"], "dense_units 0 is out of range"),
    "a GPU asked for before the data loads": ("train", lambda t, i: ["--data", str(t / "nowhere"), "--set", "device=cuda"], "has no CUDA GPU"),
    "--set with nothing after it": ("train", lambda t, i: ["--data", str(i), "--set"], "argument --set: expected at least one argument"),
    "resume from a missing checkpoint": ("train", lambda t, i: ["--data", str(i), "--resume", str(t / "nowhere")], "checkpoint"),
    "checkpoint that would run code": ("train", lambda t, i: ["--data", str(i), "--resume", evil_checkpoint(t)], "checkpoint"),
    # Experiments and clusters
    "--resume of an experiment that does not exist": (
        "sweep", lambda t, i: [space_file(t, TINY_SPACE), "--data", str(i), "--resume"], "no experiment to resume",
    ),
    "empty experiment name": ("sweep", lambda t, i: [space_file(t, TINY_SPACE), "--data", str(i), "--name", ""], "--name '' is not a folder name"),
    "experiment name that leaves the storage folder": (
        "sweep", lambda t, i: [space_file(t, TINY_SPACE), "--data", str(i), "--name", "../escaped"], "--name",
    ),
    "--max-concurrent 0 in a dry run": (
        "sweep", lambda t, i: [space_file(t, TINY_SPACE), "--data", str(i), "--max-concurrent", "0", "--dry-run"], "--max-concurrent",
    ),
    "--max-concurrent 0": ("sweep", lambda t, i: [space_file(t, TINY_SPACE), "--data", str(i), "--max-concurrent", "0"], "--max-concurrent"),
    "--address of a cluster that does not answer": (
        "sweep", lambda t, i: [space_file(t, TINY_SPACE), "--data", str(i), "--address", f"127.0.0.1:{refused_port()}"],
        "no Ray cluster answers",
    ),
    "analysis of a folder that is not an experiment": ("analysis", lambda t, i: [not_an_experiment(t)], "photos"),
    "analysis of a path that does not exist": ("analysis", lambda t, i: [str(t / "nowhere")], "does not exist"),
    "analysis of an empty path": ("analysis", lambda t, i: [""], "the experiment path is empty"),
    # Mistyped options (argparse's own errors)
    "unknown option": ("sweep", lambda t, i: ["quick", "--data", str(i), "--verbose"],
                       "unrecognized arguments: --verbose; see python -m tune_cnn.sweep --help"),
    "option value of the wrong type": ("train", lambda t, i: ["--data", str(i), "--subset", "many"], "argument --subset: invalid int value: 'many'"),
    "analysis without its folder": ("analysis", lambda t, i: [], "the following arguments are required"),
}

# Where each command would write: the test checks it stays absent.
OUTPUT_OPTION = {"sweep": "--storage", "train": "--checkpoints", "analysis": "--out"}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_exit_2(case: str, images: Path, tmp_path: Path):
    command, build, fragment = CASES[case]
    out = tmp_path / "out"
    args = [*build(tmp_path, images), OUTPUT_OPTION[command], str(out)]
    done = subprocess.run(
        [sys.executable, "-m", f"tune_cnn.{command}", *args], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S,
    )
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-2000:]
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in done.stdout + done.stderr
    assert not out.exists(), f"{command} left {out} behind"
    assert not (tmp_path / "pwned").exists(), "a checkpoint ran code"
    assert not Path("/tmp/escaped.txt").exists() and not list(tmp_path.parent.rglob("escaped.txt")), "an archive escaped the cache"


# --- The search-space loader, property-based -------------------------------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 40), st.floats(-2, 2, allow_nan=False),
    st.sampled_from(["max", "avg", "same", "valid", "adam", "sgd", "grid", "optuna", "asha", "fifo", "auto", "val_acc", "x"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["uniform", "loguniform", "int", "type", "cpu", "gpu", "max_t"]), inner, max_size=2),
    ),
    max_leaves=6,
)
settings_maps = st.dictionaries(st.sampled_from(list(SETTINGS) + ["poolng"]), values, max_size=3)
documents = st.dictionaries(st.sampled_from([*TOP_KEYS, "serach"]), st.one_of(values, settings_maps), max_size=5)
texts = st.one_of(documents.map(yaml.safe_dump), values.map(yaml.safe_dump), st.text(max_size=40))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=texts)
def test_any_document_loads_or_fails_with_a_config_error(text: str):
    """A space file either loads into a valid config or raises ConfigError (one line), never anything else."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "space.yaml"
        path.write_text(text)
        try:
            space = load_space(path)
        except ConfigError as error:
            assert "\n" not in str(error)
            return
    assert space.trial_count >= 1
    for trial in space.listed_trials() if space.lists_trials else []:
        TrainConfig.from_flat(trial)


def test_an_address_that_never_answers_times_out_with_one_line(monkeypatch: pytest.MonkeyPatch):
    from tune_cnn import cluster

    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT_S", 5)
    # TEST-NET-3 is never routed: the connection times out, is unreachable, or (behind a proxy that accepts
    # every connection) is no Ray cluster; each must end within the timeout.
    with pytest.raises(ConfigError, match=r"no Ray cluster answers at --address 203\.0\.113\.1:6379"):
        cluster.check_cluster_answers("203.0.113.1:6379")


def test_ctrl_c_and_a_closed_pipe_end_a_command_in_one_line_or_quietly(tmp_path: Path):
    """Ctrl-C before the sweep's trials start (data loading, Ray's start) is one line and exit code 130; a dry
    run piped into `head` ends quietly."""
    interrupted = subprocess.run(
        [sys.executable, "-c", "import tune_cnn.errors as e; e.exit_on_user_error(lambda: (_ for _ in ()).throw(KeyboardInterrupt))()"],
        capture_output=True, text=True)
    assert interrupted.returncode == 130 and interrupted.stderr == "interrupted\n"
    images = make_image_folder(tmp_path / "images")
    piped = subprocess.run(f"{sys.executable} -m tune_cnn.sweep seed --data {images} --dry-run | head -1", shell=True,
                           capture_output=True, text=True, env={**os.environ, "TUNE_CNN_CACHE": str(tmp_path / "cache")})
    assert piped.stdout.count("\n") == 1 and piped.stderr == ""
