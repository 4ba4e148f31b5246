#!/usr/bin/env bash
# Where the whole seed sweep's wall clock goes on the lent GPU machine, under CUDA MPS: the seed space's six
# trials as plain processes (no Ray), the sweep through Ray (bench --sweep yes, with its timeline), and the
# sweep again with two CPUs (torch threads) per trial, the plain processes' count on 16 cores. Needs Ray:
#   bash benchmarks/ray-bundle.sh; mkdir -p .data && cp ../shared/data/cifar10-jpeg.tar.gz .data/
#   device run, carry [".data", ".whl"], timeout_s 400:  bash benchmarks/gpu-sweep.sh
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
out=${OUT:-benchmarks/results/gpu-sweep}
data=${DATA:-.data/cifar10-jpeg.tar.gz}
mkdir -p "$out" /tmp/site
tar xJf .whl/site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:$PYTHONPATH
nvidia-smi -L
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps_pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps_log
mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
nvidia-cuda-mps-control -d && echo "gpu-sweep.sh: MPS started after ${SECONDS} s"

timeout 250 python3 -m tune_cnn.bench --data "$data" --images 4500 --rounds 1 --variants --concurrency \
    --seed-trials yes --seed-trials-at-once 6 --sweep yes --out "$out" 2>&1 | tee "$out/bench.log"
echo "gpu-sweep.sh: bench done after ${SECONDS} s"

timeout 120 python3 - "$data" <<'PY' 2>&1 | tee "$out/sweep-2-cpus.log"
import json, subprocess, sys, time
from pathlib import Path
from tune_cnn.bench import sweep_timeline
command = [sys.executable, "-m", "tune_cnn.sweep", "seed", "--data", sys.argv[1], "--storage", "/tmp/sweeps", "--name", "cpus2", "--cpus-per-trial", "2"]
started_at, start = time.time(), time.perf_counter()
run = subprocess.run(command, capture_output=True, text=True)
figures = {"command": " ".join(command[1:]), "seconds": time.perf_counter() - start, "returncode": run.returncode,
           "timeline": sweep_timeline(Path("/tmp/sweeps/cpus2"), started_at), "output_tail": (run.stdout + run.stderr)[-1500:]}
print(json.dumps(figures, indent=1))
PY
echo quit | nvidia-cuda-mps-control
echo "gpu-sweep.sh: ${SECONDS} s in all"
