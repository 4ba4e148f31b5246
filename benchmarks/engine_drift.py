"""Does the machine hold still? The engine trains the same 6,000 images over and over in one process and
prints each pass's images/s: the same work each time, so any change in speed is the machine's.

    python benchmarks/engine_drift.py [--passes 12] [--flush-denormal] [--data ../shared/data/cifar10-jpeg.tar.gz]
"""
import argparse
import time

import torch

from tune_cnn.data import load_data, stratified_subset
from tune_cnn.train import TrainConfig, build_engine

IMAGES = 6000

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--passes", type=int, default=12)
parser.add_argument("--flush-denormal", action="store_true", help="torch.set_flush_denormal(True) first")
parser.add_argument("--data", default="../shared/data/cifar10-jpeg.tar.gz")
args = parser.parse_args()

data = load_data(args.data)
torch.set_flush_denormal(args.flush_denormal)
engine = build_engine(TrainConfig(batch_size=32), data.shape, data.mean, data.std)
timed = engine.put(data.train.take(stratified_subset(data.train.y, IMAGES, 0)))
engine.train_epoch(engine.put(data.train.take(stratified_subset(data.train.y, 320, 1))))  # warm-up
rates = []
for _ in range(args.passes):
    start = time.perf_counter()
    engine.train_epoch(timed)
    rates.append(IMAGES / (time.perf_counter() - start))
print(("flush-denormal " if args.flush_denormal else "") + "images/s by pass: " + " ".join(f"{r:,.0f}" for r in rates))
