"""The experiment folder: its metadata record and format version, a folder written before the version existed,
and what counts as an experiment."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from tune_cnn import analysis
from tune_cnn.config import SETTINGS, TrainConfig
from tune_cnn.errors import StorageError
from tune_cnn.experiment import DIAGNOSTICS, FORMAT_VERSION, METADATA_FILE, ExperimentFolder, Metadata, Storage

FORMAT_1 = Path(__file__).parent / "fixtures" / "format-1"


@pytest.fixture
def format_1(tmp_path: Path) -> Path:
    """A copy of the fixture, so that nothing a test does writes into the checkout."""
    return Path(shutil.copytree(FORMAT_1, tmp_path / "format-1"))


def test_a_folder_written_before_the_format_version_loads_with_the_same_dataframe(format_1: Path):
    sweep = analysis.load(format_1)
    before = pd.read_parquet(format_1 / "analysis" / "results.parquet")  # what that code's analysis loaded
    pd.testing.assert_frame_equal(sweep.frame[before.columns], before)
    added = [c for c in sweep.frame.columns if c not in before.columns]  # settings and metrics that code did not have yet
    diagnostics = [f"{split}_{name}" for split in ("val", "test") for name in DIAGNOSTICS]
    settings = added[: len(added) - len(diagnostics)]
    assert added == [*settings, *diagnostics] and sweep.frame[diagnostics].isna().all().all()
    assert "schedule" in settings and set(settings) <= set(SETTINGS)
    defaults = TrainConfig().flat()  # each new setting at its default: how that code trained
    assert all((sweep.frame[name].map(lambda value, name=name: value == defaults[name])).all() for name in settings)
    context = sweep.context
    assert (context.swept, context.snapshot_epochs, context.metric, context.mode, context.incomplete) == (
        ["pooling", "conv_width"], [2, 3], "val_acc", "max", {})  # as that code's DataFrame.attrs held them
    assert context.metadata.format == 1 and context.metadata.samples == 1 and context.metadata.search == "grid"
    folder = ExperimentFolder(Storage.open(format_1))
    assert folder.holds_a_sweep() and folder.can_resume()
    assert (analysis.write_analysis(format_1) / "report.md").read_text().startswith("# Analysis of format-1\n")


def test_the_metadata_records_its_format_and_reads_back_as_written(tmp_path: Path):
    metadata = Metadata(space="seed", search="grid", swept=["pooling"], fixed={"epochs": 3, "filters": [32, 64, 64]},
                        checkpoint_epochs=[1, 3], data="cifar10", samples=1, sweep_seed=0)
    folder = ExperimentFolder(Storage.open(tmp_path / "exp"))
    folder.write_metadata(metadata)
    written = json.loads((tmp_path / "exp" / METADATA_FILE).read_text())
    assert written["format"] == FORMAT_VERSION == 2 and written["swept"] == ["pooling"]
    assert folder.metadata() == metadata


@pytest.mark.parametrize("text, words", [
    ('{"format": 3}', "was written by a newer tune_cnn (format 3; this one reads formats 1 to 2); upgrade tune_cnn"),
    ("[1, 2]", f"{METADATA_FILE} is not a JSON object; restore it, or delete it to read the trials alone"),
    ('{"swept": ["poo', f"{METADATA_FILE} is not a JSON object"),
])
def test_metadata_this_version_cannot_read_is_one_line(format_1: Path, text: str, words: str):
    (format_1 / METADATA_FILE).write_text(text)
    with pytest.raises(StorageError) as error:
        analysis.load(format_1)
    assert words in str(error.value) and "\n" not in str(error.value)


def test_a_resume_compares_what_a_format_1_folder_recorded(format_1: Path):
    stored = ExperimentFolder(Storage.open(format_1)).metadata()
    same = Metadata(**{**stored.__dict__, "format": FORMAT_VERSION})
    assert same.change_from(stored) is None
    assert Metadata(**{**same.__dict__, "subset": 20}).change_from(stored) == "subset None, now 20"
    unrecorded = Metadata(**{**stored.__dict__, "samples": None})  # folders from before `samples` was recorded
    assert Metadata(**{**same.__dict__, "samples": 8}).change_from(unrecorded) is None


def test_a_folder_holding_only_the_metadata_is_not_an_experiment(tmp_path: Path):
    """Ctrl-C between the metadata and Tune's first save: a new run may take the name; --resume had nothing to resume."""
    experiment = ExperimentFolder.for_sweep(str(tmp_path), "early")
    experiment.write_metadata(Metadata(space="quick"))
    assert not experiment.holds_a_sweep()
    (tmp_path / "early" / "experiment_state.json").write_text("{}")
    assert experiment.holds_a_sweep()
