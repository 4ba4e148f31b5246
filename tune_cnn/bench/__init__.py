"""The benchmark: how fast one small training is, side by side with the tutorials' pipeline, on the same data,
model and batches (benchmarks/README.md says what each row is and holds the figures).

    python -m tune_cnn.bench [--quick] [--data ...] [--images N] [--batch-size 32] [--concurrency 1 2 4 8] [--out DIR]

In one run it times (a) the reference pipeline (reference.py) in a plain process of its own; (b) tune_cnn's engine
(tune_cnn.engine's own train_epoch; on CUDA each of its variants) pass by pass beside it (side_by_side.py);
(c) N concurrent engine trials in N processes; and the floor, the model's training FLOPs per image over the
device's measured matrix rate. On a GPU it also times the `seed` space's six trials as plain processes, and with
Ray there the whole `seed` sweep (sweeps.py). clock.py holds the timing itself; __main__.py the command.
"""
