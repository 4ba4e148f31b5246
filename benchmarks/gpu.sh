#!/usr/bin/env bash
# Every GPU figure in one call on the lent GPU machine (no Ray or Optuna there, no internet):
#   1. the CUDA tests (whole-step CUDA graph against the eager engine, resume, replay counts);
#   2. the benchmark: reference, engine eager / torch.compile / whole-step CUDA graph, 1, 2, 4 and 8
#      concurrent trials and the seed space's six trials as plain processes. Concurrent and seed trials use
#      the CUDA graph when the tests passed, else the eager engine.
# The benchmark writes its JSON after each part, so a run cut short by the time limit keeps what it measured.
#
# From the repository root on the machine with the device tool:
#   mkdir -p .data && cp ../shared/data/cifar10-jpeg.tar.gz .data/
#   device run, carry [".data"], timeout_s 560:  bash benchmarks/gpu.sh
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
out=${OUT:-benchmarks/results}
data=${DATA:-.data/cifar10-jpeg.tar.gz}
budget_s=${BUDGET_S:-520}
mkdir -p "$out"
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"

timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_train.py -k cuda 2>&1 | tee "$out/cuda_tests.log"
tests_rc=${PIPESTATUS[0]}
echo "gpu.sh: CUDA tests exit $tests_rc after ${SECONDS} s"
mode=()
[ "$tests_rc" = 0 ] && mode=(--set cuda_graph=true)

timeout $((budget_s - SECONDS)) python3 -m tune_cnn.bench --data "$data" --concurrency 1 2 4 8 --seed-trials yes "${mode[@]}" \
    --out "$out" 2>&1 | tee "$out/bench.log"
echo "gpu.sh: ${SECONDS} s in all"
