#!/usr/bin/env bash
# Where the whole seed sweep's wall clock goes on the lent GPU machine, under CUDA MPS, in one call:
#   1. the CUDA tests (the engine's captured steps against eager, with torch.compile, resume);
#   2. the seed space's six trials as plain processes (no Ray), six at once, for $EPOCHS epochs (default 5):
#      with the tune_cnn in $BASELINE first where that folder is carried (an earlier commit, for a before and
#      after on one machine), then this tune_cnn, then this one with compile=true;
#   3. the whole seed sweep through Ray, 30 epochs (bench --sweep yes): wall clock from command to analysis,
#      the trials' timeline and the sweep's output lines stamped with when they came.
# nvidia-smi samples the GPU's utilisation and power every 500 ms throughout, into $OUT/nvidia-smi.csv.
#
# From the repository root on the machine with the device tool (ray-bundle.sh builds .whl/site.tar.xz):
#   bash benchmarks/ray-bundle.sh; mkdir -p .data && cp ../shared/data/cifar10-jpeg.tar.gz .data/
#   optional baseline: mkdir -p .whl/old && git archive COMMIT tune_cnn | tar x -C .whl/old
#   device run, carry [".data", ".whl"], timeout_s 420:  BASELINE=.whl/old bash benchmarks/gpu-sweep.sh
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
source benchmarks/gpu-env.sh
out=${OUT:-benchmarks/results/gpu-sweep}
data=${DATA:-.data/cifar10-jpeg.tar.gz}
epochs=${EPOCHS:-5}
mkdir -p "$out"
nvidia-smi -L
nvidia-smi --query-gpu=timestamp,utilization.gpu,power.draw,memory.used --format=csv -lms 500 > "$out/nvidia-smi.csv" &
unpack_ray || { echo "gpu-sweep.sh: needs Ray: run benchmarks/ray-bundle.sh and carry .whl"; exit 1; }
echo "gpu-sweep.sh: Ray ready after ${SECONDS} s"
start_mps

timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_train.py -k cuda 2>&1 | tail -4 | tee "$out/cuda-tests.log"
echo "gpu-sweep.sh: CUDA tests done after ${SECONDS} s"

plain_trials() {  # LABEL CODE [--set ...]: the six trials at once with the tune_cnn found first in CODE
    local label=$1 code=$2
    shift 2
    PYTHONPATH=$code:$PYTHONPATH timeout 150 python3 -m tune_cnn.bench --data "$data" --images 640 --rounds 1 --variants \
        --concurrency --seed-trials yes --seed-trials-at-once 6 --sweep no --out "$out/$label" "$@" 2>&1 | tee "$out/$label.log"
    echo "gpu-sweep.sh: $label done after ${SECONDS} s"
}
[ -n "${BASELINE:-}" ] && plain_trials baseline "$BASELINE" --set epochs=$epochs
plain_trials engine "$PWD" --set epochs=$epochs
plain_trials compile "$PWD" --set epochs=$epochs compile=true

timeout 200 python3 -m tune_cnn.bench --data "$data" --images 640 --rounds 1 --variants --concurrency --seed-trials no \
    --sweep yes --out "$out/sweep" 2>&1 | tee "$out/sweep.log"
stop_mps
kill %1
echo "gpu-sweep.sh: ${SECONDS} s in all"
