"""Does the same CUDA graph train the same numbers twice? Three runs of one small training (the tests' synthetic
data, batch 64, dropout 0.3, 3 epochs) in fp32 and bf16, with cuDNN's default algorithms and with its
deterministic ones; prints whether the runs' losses and accuracies were equal, and each run's first-epoch loss.

    PYTHONPATH=$PWD python3 benchmarks/cudnn_determinism.py      # from the repository root, on a CUDA machine
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tune_cnn.config import TrainConfig
from tune_cnn.engine import build_engine

from conftest import synthetic_splits  # the tests' data, after its folder is on the path

if not torch.cuda.is_available():
    print("cudnn_determinism.py: this machine has no CUDA GPU; run it where one is", file=sys.stderr)
    sys.exit(2)
data = synthetic_splits()
for deterministic in (False, True):
    torch.backends.cudnn.deterministic = deterministic
    for precision in ("fp32", "bf16"):
        config = TrainConfig.from_flat({"batch_size": 64, "device": "cuda", "cuda_graph": True, "precision": precision, "dropout": 0.3})
        runs = []
        for _ in range(3):
            engine = build_engine(config, data.shape, data.mean, data.std)
            on_device = engine.put(data.train)
            runs.append([engine.train_epoch(on_device) for _ in range(3)])
        print(f"deterministic={deterministic} {precision}: runs equal: {runs[0] == runs[1] == runs[2]}; first-epoch losses {[r[0][0] for r in runs]}")
