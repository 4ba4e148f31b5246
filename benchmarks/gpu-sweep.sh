#!/usr/bin/env bash
# Where the whole seed sweep's wall clock goes on the lent GPU machine, under CUDA MPS, in one call:
#   1. the CUDA tests (the engine's captured steps against eager, with torch.compile, resume; the optimizers
#      against torch.optim's); TESTS=no skips them, TESTS=last runs them at the end instead;
#      with ONE_TRIAL=yes, then one trial of the seed model alone (no MPS) for 5 epochs, cuDNN's algorithms by
#      heuristics (the engine's default) and timed (benchmarks/trial_phases.py --cudnn-benchmark);
#   2. the whole seed sweep through Ray, 30 epochs, once for each name in $SWEEPS (default "this"): wall clock
#      from command to analysis, the trials' timeline and the sweep's output lines stamped with when they came
#      (bench.time_seed_sweep), into sweep.json, a list with one entry per sweep. this: this checkout's code;
#      preload: the same with RAY_preload_python_modules=torch (Ray's workers import torch as they start, before
#      a trial is theirs); baseline: the tune_cnn and search_spaces in $BASELINE (git archive COMMIT tune_cnn
#      search_spaces), with nothing of this checkout's on the Python path;
#   3. the seed space's six trials as plain processes, six at once, each timing its phases for $PHASES_EPOCHS
#      epochs (default 3; benchmarks/trial_phases.py), for each name in $PHASES (default "baseline engine fp32"):
#      baseline, the tune_cnn in $BASELINE where that folder is carried (an earlier commit's, for a before and
#      after on one machine); engine, this one; fp32, this one in fp32 (no bf16 casts: fewer kernels per step,
#      which may matter more than each kernel's speed with six trials sharing the GPU). Every phase run lets
#      cuDNN choose by heuristics, the baseline's too.
# nvidia-smi samples the GPU's utilisation and power every 500 ms throughout. At most 8 files come back from
# a device call, so everything lands in $OUT itself: with all three phase runs, exactly 8 with gpu-sweep.log.
#
# From the repository root on the machine with the device tool (ray-bundle.sh builds .whl/site.tar.xz):
#   bash benchmarks/ray-bundle.sh; mkdir -p .data && cp ../shared/data/cifar10-jpeg.tar.gz .data/
#   optional baseline: mkdir -p .whl/old && git archive COMMIT tune_cnn search_spaces | tar x -C .whl/old
#   device run, carry [".data", ".whl"], timeout_s 300:  BASELINE=.whl/old OUT=$OUT bash benchmarks/gpu-sweep.sh
#   the latest (368 s): TESTS=last PHASES="" SWEEPS="this preload baseline this preload" BASELINE=.whl/93fa4c5 ...
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
source benchmarks/gpu-env.sh
out=${OUT:-benchmarks/results/gpu-sweep}
data=${DATA:-.data/cifar10-jpeg.tar.gz}
mkdir -p "$out"
exec > >(tee "$out/gpu-sweep.log") 2>&1  # the whole log comes back, not only the reply's last 12,000 characters
nvidia-smi -L
nvidia-smi --query-gpu=timestamp,utilization.gpu,power.draw,memory.used --format=csv -lms 500 > "$out/nvidia-smi.csv" &
unpack_ray || { echo "gpu-sweep.sh: needs Ray: run benchmarks/ray-bundle.sh and carry .whl"; exit 1; }
echo "gpu-sweep.sh: Ray ready after ${SECONDS} s"
# A fresh machine decodes the archive into its cache on the first load (about 20 s): not the timings' to pay.
python3 -c "import sys; from tune_cnn.data import load_data; print(load_data(sys.argv[1]).describe())" "$data"
echo "gpu-sweep.sh: data cached after ${SECONDS} s"

cuda_tests() {
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_train.py tests/test_engine.py tests/test_optim.py -k cuda 2>&1 | tail -4 | tee "$out/cuda-tests.log"
    echo "gpu-sweep.sh: CUDA tests done after ${SECONDS} s"
}
[ "${TESTS:-yes}" = yes ] && cuda_tests
if [ "${ONE_TRIAL:-no}" = yes ]; then
    for choice in "" --cudnn-benchmark; do
        timeout 90 python3 benchmarks/trial_phases.py --data "$data" --at-once 1 --epochs 5 --set padding=valid \
            --out "/tmp/one-trial${choice:+-timed}.json" $choice
    done
    # One file for both, since a device call brings back at most 8.
    python3 -c 'import json, sys; json.dump({"heuristics": json.load(open(sys.argv[1])), "timed": json.load(open(sys.argv[2]))}, open(sys.argv[3], "w"), indent=1)' \
        /tmp/one-trial.json /tmp/one-trial-timed.json "$out/one-trial.json"
    echo "gpu-sweep.sh: one trial done after ${SECONDS} s"
fi
start_mps

timeout $((150 * $(wc -w <<< "${SWEEPS:-this}"))) python3 - "$data" "$out/sweep.json" "${BASELINE:-}" ${SWEEPS:-this} <<'PY'
import json, os, sys, tempfile
from pathlib import Path
from tune_cnn.bench.sweeps import time_seed_sweep
data, out, baseline, names = str(Path(sys.argv[1]).resolve()), Path(sys.argv[2]), sys.argv[3], sys.argv[4:]
environment = dict(os.environ)
runs = []
for name in names:
    os.environ.clear()
    os.environ.update(environment)
    if name == "preload":
        os.environ["RAY_preload_python_modules"] = "torch"
    if name == "baseline":  # Ray only: the sweep's driver and its workers find tune_cnn in the baseline's folder
        os.environ["PYTHONPATH"] = "/tmp/site"
    with tempfile.TemporaryDirectory() as folder:
        figures = time_seed_sweep(data, Path(folder), Path(baseline).resolve() if name == "baseline" else None)
    runs.append({"variant": name, **figures})
    out.write_text(json.dumps(runs, indent=1) + "\n")
    print(f"seed sweep, {name}: analysis written at {figures['analysis_written_s']} s, {figures['seconds']:.1f} s to exit {figures['returncode']}; "
          f"timeline {json.dumps(figures['timeline'])}")
    for at, line in figures["output"]:
        if not line.startswith(("Current time", "Using FIFO", "Logical resource", "Result logdir", "Current best", "|", "+")) and line.strip():
            print(f"{at:7.2f}  {line[:140]}")
PY
echo "gpu-sweep.sh: sweep done after ${SECONDS} s"

phases() {  # NAME [options]
    local name=$1
    shift
    timeout 120 python3 benchmarks/trial_phases.py --data "$data" --at-once 6 --epochs "${PHASES_EPOCHS:-3}" --out "$out/phases-$name.json" "$@"
    echo "gpu-sweep.sh: phases $name done after ${SECONDS} s"
}
for name in ${PHASES-baseline engine fp32}; do
    case $name in
        baseline) [ -n "${BASELINE:-}" ] && phases baseline --code "$BASELINE" ;;
        engine) phases engine ;;
        fp32) phases fp32 --set precision=fp32 ;;
    esac
done
[ "${TESTS:-yes}" = last ] && cuda_tests
stop_mps
kill %1
echo "gpu-sweep.sh: ${SECONDS} s in all"
