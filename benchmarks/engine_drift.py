"""Does the machine hold still? The engine trains the same 3,000 images over and over in one process and
prints each pass's images/s, once per thread count asked for (alternating): the same work each time, so any
change in speed is the machine's, and the thread counts side by side show whether it is the threads'
scaling that moved.

    python benchmarks/engine_drift.py [--passes 20] [--threads 2 1] [--flush-denormal] [--data ...]
"""
import torch

from tune_cnn.bench.side_by_side import engine_runner
from tune_cnn.config import TrainConfig
from tune_cnn.data import load_data, stratified_subset
from tune_cnn.errors import CommandParser, ConfigError, exit_on_user_error

IMAGES = 3000


@exit_on_user_error
def main() -> None:
    parser = CommandParser(prog="python benchmarks/engine_drift.py", description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=20)
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1], help="torch threads, one pass each per round")
    parser.add_argument("--flush-denormal", action="store_true", help="torch.set_flush_denormal(True) first")
    parser.add_argument("--data", default="../shared/data/cifar10-jpeg.tar.gz")
    args = parser.parse_args()
    if args.passes < 1 or min(args.threads) < 1:
        raise ConfigError(f"--passes {args.passes} or --threads {' '.join(map(str, args.threads))} is out of range; use 1 or more")

    data = load_data(args.data)
    torch.set_flush_denormal(args.flush_denormal)
    sample = data.train.take(stratified_subset(data.train.y, IMAGES, 0))
    run = engine_runner(TrainConfig(batch_size=32), data, sample, data.train.take(stratified_subset(data.train.y, 320, 1)))
    run()  # the warm-up
    rates = {threads: [] for threads in args.threads}
    for _ in range(args.passes):
        for threads in args.threads:
            torch.set_num_threads(threads)
            rates[threads].append(IMAGES / run()[0])
    for threads, by_pass in rates.items():
        print(f"{threads} thread(s){' (flush-denormal)' if args.flush_denormal else ''}: " + " ".join(f"{r:,.0f}" for r in by_pass))


if __name__ == "__main__":
    main()
