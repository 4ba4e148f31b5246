#!/usr/bin/env bash
# Every GPU figure in one call on the lent GPU machine (no Ray or Optuna there, no internet):
#   1. the CUDA tests (whole-step CUDA graph against the eager engine, with torch.compile, resume);
#   2. the benchmark side by side: reference and every engine variant (bench.side_by_side.VARIANTS), into $OUT/side;
#   3. under CUDA MPS (so that trials in separate processes can run kernels at the same time), 1, 2, 4 and 8
#      concurrent trials and the seed space's six trials at once, into $OUT/mps; where the call carries Ray
#      (.whl/site.tar.xz, built by benchmarks/ray-bundle.sh), also the whole seed sweep through Ray, command
#      to analysis written. Skipped without MPS.
# The benchmark writes its JSON after each part, so a run cut short by the time limit keeps what it measured.
#
# From the repository root on the machine with the device tool:
#   mkdir -p .data && cp ../shared/data/cifar10-jpeg.tar.gz .data/
#   device run, carry [".data"], timeout_s 450:  bash benchmarks/gpu.sh
# With Ray (bash benchmarks/ray-bundle.sh first):
#   device run, carry [".data", ".whl"], timeout_s 560:  BUDGET_S=530 bash benchmarks/gpu.sh
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
source benchmarks/gpu-env.sh
out=${OUT:-benchmarks/results/gpu}
data=${DATA:-.data/cifar10-jpeg.tar.gz}
budget_s=${BUDGET_S:-420}
mkdir -p "$out/side" "$out/mps"
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
unpack_ray || echo "gpu.sh: no Ray carried: no sweep through Ray"

timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_train.py tests/test_engine.py tests/test_optim.py -k cuda 2>&1 | tee "$out/cuda_tests.log"
echo "gpu.sh: CUDA tests exit ${PIPESTATUS[0]} after ${SECONDS} s"

timeout $((budget_s - SECONDS)) python3 -m tune_cnn.bench --data "$data" --concurrency --seed-trials no --sweep no --out "$out/side" 2>&1 \
    | tee "$out/side/bench.log"
echo "gpu.sh: side by side done after ${SECONDS} s"

if start_mps; then
    timeout $((budget_s - SECONDS)) python3 -m tune_cnn.bench --data "$data" --variants --images 22500 --rounds 1 \
        --concurrency 1 2 4 8 --seed-trials yes --seed-trials-at-once 6 --out "$out/mps" 2>&1 | tee "$out/mps/bench.log"
    stop_mps
else
    echo "gpu.sh: no nvidia-cuda-mps-control here: no MPS stage"
fi
echo "gpu.sh: ${SECONDS} s in all"
