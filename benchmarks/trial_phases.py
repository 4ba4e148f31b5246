"""Where a trial's seconds go before and during its epochs: the seed space's trials, N processes at once (as a
sweep packs them on one GPU), each timing its phases: importing torch and tune_cnn, starting CUDA, loading the
data, building the engine, putting the data on the device, then each epoch's training pass and evaluation.
Prints one line per trial and writes the figures as JSON.

    python benchmarks/trial_phases.py [--at-once 6] [--epochs 3] [--cudnn-benchmark] [--set NAME=VALUE ...]
                                      [--code DIR] [--data ...] [--out FILE]

--set changes every trial's settings: `--at-once 1 --set padding=valid` is one trial of the seed model itself.

--code DIR times the tune_cnn package found in DIR (an earlier commit's, from `git archive COMMIT tune_cnn`)
instead of this checkout's: a before and after on one machine.
"""
import json
import subprocess
import sys
import time
from pathlib import Path

from tune_cnn.errors import CommandParser, ConfigError, exit_on_user_error

ROOT = Path(__file__).resolve().parents[1]


def trial(settings: dict, source: str, epochs: int, cudnn_benchmark: bool, started: float) -> dict:
    """One trial's phases, in seconds, as train() would run them."""
    phases = {"start_python": time.time() - started}
    mark = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        phases[name] = now - mark
        mark = now

    import torch

    from tune_cnn.config import TrainConfig
    from tune_cnn.data import load_data

    try:
        from tune_cnn.engine import build_engine
    except ImportError:  # an older package (--code), whose engine was in tune_cnn.train
        from tune_cnn.train import build_engine
    lap("import")
    torch.zeros(1, device="cuda" if torch.cuda.is_available() else "cpu")
    lap("start_cuda")
    data = load_data(source)
    lap("load_data")
    config = TrainConfig.from_flat(settings)
    engine = build_engine(config, data.shape, data.mean, data.std)
    torch.backends.cudnn.benchmark = cudnn_benchmark
    lap("build_engine")
    splits = {name: engine.put(getattr(data, name)) for name in ("train", "val", "test")}
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    lap("data_to_device")
    for epoch in range(1, epochs + 1):
        engine.train_epoch(splits["train"])
        lap(f"epoch_{epoch}_train")
        engine.evaluate(splits["val"]), engine.evaluate(splits["test"])
        lap(f"epoch_{epoch}_evaluate")
    return {"tune_cnn": str(Path(sys.modules["tune_cnn"].__file__).parent), "phases": phases}


@exit_on_user_error
def main() -> None:
    parser = CommandParser(prog="python benchmarks/trial_phases.py", description=__doc__.splitlines()[0])
    parser.add_argument("--at-once", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--cudnn-benchmark", action="store_true", help="have cuDNN time its algorithms instead of choosing by heuristics")
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="settings for every trial, as for tune_cnn.train")
    parser.add_argument("--code", type=Path, default=None, help="import tune_cnn from this folder instead")
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/cifar10-jpeg.tar.gz"))
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the figures")
    args = parser.parse_args()
    if args.at_once < 1 or args.epochs < 1:
        raise ConfigError(f"--at-once {args.at_once} or --epochs {args.epochs} is out of range; use 1 or more")
    from tune_cnn.config import TrainConfig
    from tune_cnn.data import load_data
    from tune_cnn.space import load_space
    from tune_cnn.train import parse_settings

    overrides = parse_settings(args.set)
    load_data(args.data)  # a bad --data is one line here, and the trials find the archive decoded in the cache
    trials = [TrainConfig.from_flat({**t, **overrides}).flat() for t in load_space("seed").grid_trials()[: args.at_once]]
    code = (f"import json, sys; sys.path.insert(0, {str(args.code.resolve()) if args.code else ''!r}); "
            "from benchmarks.trial_phases import trial; print(json.dumps(trial(*json.loads(sys.argv[1]))))")
    started = time.time()
    runs = [subprocess.Popen([sys.executable, "-c", code, json.dumps([t, args.data, args.epochs, args.cudnn_benchmark, started])],
                             cwd=ROOT, stdout=subprocess.PIPE, text=True) for t in trials]
    figures = {"at_once": args.at_once, "cudnn_benchmark": args.cudnn_benchmark, "trials": []}
    for settings, run in zip(trials, runs):
        output = run.communicate()[0].strip().splitlines()
        if run.returncode != 0 or not output:
            raise RuntimeError(f"the trial {settings['pooling']}/{settings['conv_width']} failed with exit code {run.returncode}; its error is above")
        timed = json.loads(output[-1])
        figures["trials"].append({"settings": settings, **timed})
        print(f"{settings['pooling']}/{settings['conv_width']}: " + "  ".join(f"{k} {v:.2f}" for k, v in timed["phases"].items()))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
