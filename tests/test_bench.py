"""The engine against the tutorials' reference loop (same function, same accuracy), and the benchmark's output."""
import dataclasses
import json
import statistics

import pytest
import torch
import torch.nn.functional as F

from tune_cnn.bench import __main__ as bench
from tune_cnn.bench import side_by_side
from tune_cnn.bench.__main__ import format_table, main, run_benchmark
from tune_cnn.bench.clock import Plan, Timing
from tune_cnn.bench.reference import ReferenceProcess, TutorialDataset, compare_accuracy, reference_model
from tune_cnn.bench.side_by_side import training_flops_per_image
from tune_cnn.bench.sweeps import sweep_timeline, time_seed_sweep, time_seed_trials
from tune_cnn.config import InputShape, TrainConfig
from tune_cnn.data import load_data
from tune_cnn.engine import build_engine
from tune_cnn.models import build_model
from tune_cnn.train import parse_settings

from conftest import make_image_folder, synthetic_splits


def test_engine_computes_the_reference_loss_and_gradients_on_the_same_batch(small_data):
    config = TrainConfig(batch_size=32)
    ref_model, _ = reference_model(config, small_data.shape)
    engine = build_engine(config, small_data.shape, small_data.mean, small_data.std)
    for a, b in zip(ref_model.state_dict().values(), engine.model.state_dict().values()):
        assert torch.equal(a, b)  # the same seeded initialisation

    dataset = TutorialDataset(small_data.train, small_data.mean, small_data.std)
    ref_x = torch.stack([dataset[i][0] for i in range(32)])
    on_device = engine.put(small_data.train)
    eng_x, y = on_device.normalise(on_device.x[:32]), on_device.y[:32]
    torch.testing.assert_close(eng_x, ref_x, atol=1e-5, rtol=1e-5)

    for model, x in ((ref_model, ref_x), (engine.model, eng_x)):
        model.train()
        F.cross_entropy(model(x), y).backward()
    for a, b in zip(ref_model.parameters(), engine.model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4)


def test_engine_trains_to_the_reference_accuracy_on_real_cifar10(cifar_archive):
    """Three seeds each, 3 epochs on 2,000 images: the mean validation accuracies agree within noise."""
    figures = compare_accuracy(TrainConfig(), load_data(cifar_archive, subset=2000), epochs=3, seeds=(0, 1, 2))
    accuracies = {name: figures[name]["val_acc"] for name in ("reference", "engine")}
    means = {k: statistics.mean(v) for k, v in accuracies.items()}
    assert min(means.values()) > 0.3, accuracies  # both learn
    spread = max(statistics.stdev(v) for v in accuracies.values())
    assert abs(means["engine"] - means["reference"]) <= max(0.03, 3 * spread), accuracies


def test_benchmark_times_every_pipeline_and_writes_well_formed_figures(tmp_path):
    data = synthetic_splits(train=400, val=40, test=40)
    plan = Plan(TrainConfig(batch_size=16), images=128, rounds=1, workers=2, concurrency=[1, 2])
    figures = run_benchmark(plan, data, quick=True)
    names = [r["name"] for r in figures["results"]]
    assert names == ["reference (2 workers)", "engine", "engine, 1 concurrent trial", "engine, 2 concurrent trials"]
    results = {r["name"]: r for r in figures["results"]}
    assert results["reference (2 workers)"]["ratio_to_reference"] == 1.0
    assert results["engine, 2 concurrent trials"]["images"] == 256 and results["engine, 2 concurrent trials"]["trials"] == 2
    for r in figures["results"]:
        assert r["images_per_second"] > 0 and r["epoch_seconds"] == pytest.approx(50_000 / r["images_per_second"])
    assert results["engine"]["ratio_to_reference_by_pass"] == [pytest.approx(results["engine"]["ratio_to_reference"])]
    assert results["engine, 2 concurrent trials"]["ratio_to_reference_by_pass"] is None  # not timed beside the reference
    assert figures["floor"]["images_per_second"] > 0 and figures["matrix_rate"]["dtype"] == "float32"
    assert {"device", "torch", "batch_size", "commit", "date"} <= set(figures) and figures["batch_size"] == 16
    evaluation = figures["evaluation"]  # the prediction diagnostics' cost: validation and test, each way
    assert evaluation["images"] == 80 and evaluation["with_diagnostics_s"] > 0 and evaluation["loss_and_accuracy_s"] > 0
    assert evaluation["training_epoch_s"] == pytest.approx(400 / results["engine"]["images_per_second"])
    json.dumps(figures)  # everything is plain JSON


@pytest.mark.skipif(torch.cuda.is_available(), reason="the broken variant asks for a GPU that is missing")
def test_a_variant_that_fails_is_left_out_and_reported(monkeypatch):
    def with_a_broken_variant(config, device, keys):  # as a GPU or torch without some feature would
        return {"engine": config, "engine, broken": dataclasses.replace(config, device="cuda")}

    monkeypatch.setattr(side_by_side, "engine_variants", with_a_broken_variant)
    plan = Plan(TrainConfig(batch_size=16), images=64, rounds=1, workers=0)
    figures = run_benchmark(plan, synthetic_splits(train=200, val=20, test=20), quick=True)
    assert [r["name"] for r in figures["results"]] == ["reference (0 workers)", "engine"]
    assert figures["failed"] == {"engine, broken": "ConfigError: device 'cuda' was asked for but this machine has no CUDA GPU; use device 'auto' or 'cpu'"}
    assert "engine, broken" in format_table(figures) and "failed: ConfigError" in format_table(figures)


def test_each_cuda_variant_is_a_config():
    variants = side_by_side.engine_variants(TrainConfig(), torch.device("cuda"), ["graph", "graph-fp32"])
    graph = dataclasses.replace(TrainConfig(), compile=False, cuda_graph=True)
    assert variants == {"engine, whole-step CUDA graph": graph, "engine, whole-step CUDA graph, fp32": dataclasses.replace(graph, precision="fp32")}
    assert side_by_side.engine_variants(TrainConfig(), torch.device("cpu"), ["graph"]) == {"engine": TrainConfig()}


def test_command_prints_the_table_and_writes_json(tmp_path, capsys):
    folder = make_image_folder(tmp_path / "images", per_class={"train": 24, "test": 4})
    main(["--quick", "--data", str(folder), "--images", "48", "--batch-size", "8", "--rounds", "1", "--out", str(tmp_path / "out")])
    table = capsys.readouterr().out
    assert "reference (2 workers)" in table and "floor" in table and "48 images timed per pass" in table
    (written,) = (tmp_path / "out").glob("*-quick.json")
    figures = json.loads(written.read_text())
    assert figures["batch_size"] == 8 and figures["images_per_pass"] == 48 and figures["command"].startswith("python -m tune_cnn.bench")


def test_the_benchmark_times_the_fast_resnet_family_and_its_floor(tmp_path, capsys):
    folder = make_image_folder(tmp_path / "images", per_class={"train": 24, "test": 4}, size=(16, 16))
    settings = ["model=fast_resnet", "width_multiplier=0.125", "optimizer=nesterov", "label_smoothing=0.2", "augment=flip_translate"]
    main(["--quick", "--data", str(folder), "--images", "48", "--batch-size", "8", "--rounds", "1", "--out", str(tmp_path / "out"),
          "--set", *settings])
    assert "floor" in capsys.readouterr().out
    (written,) = (tmp_path / "out").glob("*-quick.json")
    figures = json.loads(written.read_text())
    config = TrainConfig.from_flat(parse_settings(settings))
    shape = InputShape(channels=3, height=16, width=16, classes=3)
    assert figures["config"]["model"] == "fast_resnet" and figures["floor"]["flops_per_image"] == training_flops_per_image(
        build_model(config.model, shape), shape)
    assert all(r["images_per_second"] > 0 for r in figures["results"])


def test_a_later_run_on_the_same_day_keeps_the_earlier_figures(tmp_path):
    figures = {"date": "2026-11-26T04:30:00+00:00", "device": "CPU AMD EPYC (2 cores)"}
    first = bench.result_path(tmp_path, figures, quick=False)
    assert first.name == "2026-11-26-cpu-amd-epyc-2-cores.json"
    bench.save(figures, first)
    second = bench.result_path(tmp_path, figures, quick=False)
    assert second.name == "2026-11-26-cpu-amd-epyc-2-cores-2.json"
    bench.save(figures, second)
    assert bench.result_path(tmp_path, figures, quick=False).name == "2026-11-26-cpu-amd-epyc-2-cores-3.json"
    assert bench.result_path(tmp_path, figures, quick=True).name == "2026-11-26-cpu-amd-epyc-2-cores-quick.json"


def test_seed_space_trials_run_as_plain_processes(tmp_path):
    folder = make_image_folder(tmp_path / "images")
    figures = time_seed_trials(str(folder), at_once=3, overrides={"epochs": 1})
    assert figures["trials"] == 6 and figures["at_once"] == 3 and figures["epochs"] == 1 and figures["batch_size"] == 32
    assert len(figures["val_acc"]) == 6 and all(0 <= a <= 1 for a in figures["val_acc"]) and figures["seconds"] > 0
    assert len(figures["trial_epochs_s"]) == 6 and all(0 < s < figures["seconds"] for s in figures["trial_epochs_s"])
    assert [len(e) for e in figures["epoch_seconds"]] == [1] * 6


@pytest.mark.parametrize(
    "arguments, words",
    [
        (["--images", "5000"], "--images 5000 is out of range"),
        (["--images", "0"], "--images 0 is out of range"),  # 0 is a value, not "use the default"
        (["--rounds", "0"], "--rounds 0"),
        (["--batch-size", "0"], "batch_size 0 is out of range"),
        (["--concurrency", "0"], "--concurrency 0 is not allowed"),
        (["--set", "lr=-1"], "lr -1.0 is out of range"),
        (["--accuracy-seeds", "0"], "--accuracy-seeds 0 is out of range"),
        (["--seed-trials-at-once", "0"], "--seed-trials-at-once 0 is out of range"),
        pytest.param(["--variants", "graph"], "--variants chooses among CUDA engine variants",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-only error")),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, arguments, words):
    folder = make_image_folder(tmp_path / "images")
    with pytest.raises(SystemExit) as exit_:
        main(["--data", str(folder), "--out", str(tmp_path / "out"), *arguments])
    error = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(error) == 1 and words in error[0]
    assert not (tmp_path / "out").exists()


def test_an_out_folder_that_cannot_be_made_is_found_before_any_timing(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_:
        main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "notes.txt" / "results")])
    error = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and error == [f"error: --out {tmp_path / 'notes.txt' / 'results'}: {tmp_path / 'notes.txt'} is "
                                               f"a file; choose a writable folder for the figures"]


def test_ratios_pass_by_pass_pair_each_pass_with_the_reference_pass_of_its_round():
    reference = Timing("reference (2 workers)", images=1000, seconds=[1.0, 0.5, 1.0])  # the machine sped up in round 2
    engine = Timing("engine", images=1000, seconds=[0.5, 0.2, 0.4])
    assert engine.ratios_by_pass(reference) == pytest.approx([2.0, 2.5, 2.5])
    assert engine.as_dict(reference)["ratio_to_reference"] == pytest.approx(2.5 / 1.0)  # medians: 2,500 over 1,000 images/s
    lines = bench.pass_by_pass([t.as_dict(reference) for t in (reference, engine)])
    assert lines[1].split() == ["reference", "(2", "workers)", "1,000", "/", "2,000", "/", "1,000"]
    assert lines[2].split()[-5:] == ["2.00", "/", "2.50", "/", "2.50"]


def test_a_reference_process_that_fails_is_an_error_with_its_cause_not_a_hang(tmp_path):
    plan = Plan(TrainConfig(batch_size=16), images=64, rounds=1, workers=0)
    with pytest.raises(RuntimeError, match="the reference process failed: FileNotFoundError"):
        with ReferenceProcess(plan, synthetic_splits(train=100, val=10, test=10), tmp_path / "missing.npz"):
            pass


@pytest.mark.slow
def test_the_whole_seed_sweep_is_timed_from_command_to_analysis(tmp_path):
    # What `--sweep yes` runs on a GPU machine with Ray: here on tiny images, all 6 trials x 30 epochs.
    folder = make_image_folder(tmp_path / "images", size=(32, 32))
    figures = time_seed_sweep(str(folder), tmp_path / "sweeps")
    assert figures["returncode"] == 0, figures["output_tail"]
    assert figures["analysis_written"] and figures["seconds"] > 0
    assert (tmp_path / "sweeps" / "bench_seed" / "analysis" / "report.md").is_file()
    timeline = figures["timeline"]
    assert 0 < timeline["trials_started_s"][0] <= timeline["trials_started_s"][1] < timeline["trials_ended_s"][1] < figures["seconds"]
    assert all(0 < s for s in timeline["trial_epochs_s"] + timeline["trial_outside_epochs_s"])
    stamps = [at for at, _ in figures["output"]]
    assert stamps == sorted(stamps) and 0 < stamps[-1] <= figures["seconds"]
    assert any(line.startswith("analysis: ") for _, line in figures["output"])
    assert timeline["trials_ended_s"][1] < figures["analysis_written_s"] <= figures["seconds"]


def test_a_sweep_timeline_places_each_trial_from_its_results(tmp_path):
    # Two trials as Tune writes them: one result per epoch, time_total_s counting from the trial's start.
    started_at = 1_800_000_000.0
    for name, ended, epochs in (("a", 40, [3.0, 4.0]), ("b", 60, [5.0, 5.0])):
        rows = [{"epoch": i + 1, "epoch_seconds": s, "time_total_s": 10.0 + sum(epochs[: i + 1]), "timestamp": int(started_at) + ended - 5 + 5 * i}
                for i, s in enumerate(epochs)]
        results = tmp_path / name / "result.json"
        results.parent.mkdir()
        results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    timeline = sweep_timeline(tmp_path, started_at)
    assert timeline["trials_started_s"] == pytest.approx([23.0, 40.0])  # 40 - 17, 60 - 20
    assert timeline["trials_ended_s"] == pytest.approx([40.0, 60.0])
    assert timeline["trial_epochs_s"] == pytest.approx([7.0, 10.0]) and timeline["trial_outside_epochs_s"] == pytest.approx([10.0, 10.0])
    assert timeline["trial_setup_s"] == pytest.approx([10.0, 10.0])
