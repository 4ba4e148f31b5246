#!/usr/bin/env bash
# Issue 25's GPU figures in one device call (prepared by a session that was lent no GPU: not yet run):
#   1. airbench94 from PyPI (airbench 0.1.8, its train94 unchanged) side by side on this same JPEG copy of CIFAR-10:
#      a warm-up run, then 5 runs; its own log prints each run's test accuracy and training seconds;
#   2. tune_cnn's fast_resnet at full width (widths 64, 256, 256) with the recipe (frontier's settings, whitening and
#      test-time augmentation), batch 1024, $EPOCHS epochs (default 10), 5 seeds, one `python -m tune_cnn.train` each:
#      each seed's last-epoch test accuracy and its epochs' seconds summed (training and the per-epoch evaluation);
#   3. where Ray is carried (.whl/site.tar.xz, benchmarks/ray-bundle.sh), the same configuration as a 16-trial sweep
#      through Ray (lr {1.0, 1.5, 2.0, 3.0} x seed {0, 1, 2, 3}, gpu auto: 8 trials per GPU under CUDA MPS), wall clock
#      from the command to the analysis written.
# Everything lands in $OUT (at most 8 files come back from a device call): gpu-frontier.log, airbench.log, seeds.log, sweep.log.
#
# From the repository root on the machine with the device tool:
#   bash benchmarks/ray-bundle.sh; python3 -m pip download --no-deps airbench==0.1.8 -d .whl
#   mkdir -p .data && cp ../shared/data/cifar10-jpeg.tar.gz .data/
#   device run, carry [".data", ".whl"], timeout_s 540:  OUT=$OUT bash benchmarks/gpu-frontier.sh
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
source benchmarks/gpu-env.sh
out=${OUT:-benchmarks/results/gpu-frontier}
data=$(realpath "${DATA:-.data/cifar10-jpeg.tar.gz}")
epochs=${EPOCHS:-10}
mkdir -p "$out"
exec > >(tee "$out/gpu-frontier.log") 2>&1
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
recipe="model=fast_resnet width_multiplier=1 batch_size=1024 eval_batch_size=1000 epochs=$epochs optimizer=nesterov momentum=0.85
        weight_decay=0.0005 schedule=triangular warmup=0.2 label_smoothing=0.2 augment=flip_translate whiten=true tta=flip_translate"

# 1. airbench reads cifar10/{train,test}.pt (uint8 NHWC images, labels, classes): written here from the JPEG copy.
airbench_dir=/tmp/airbench && mkdir -p $airbench_dir/cifar10
python3 -m pip install -q --no-deps --no-index --target /tmp/airbench-site .whl/airbench-*.tar.gz || echo "gpu-frontier.sh: airbench not carried"
python3 - "$data" $airbench_dir/cifar10 <<'PY'
import io, sys, tarfile
import numpy as np, torch
from PIL import Image
split = {"train": ([], []), "test": ([], [])}
with tarfile.open(sys.argv[1]) as archive:
    members = sorted((m for m in archive.getmembers() if m.name.endswith(".jpg")), key=lambda m: m.name)
    classes = sorted({m.name.split("/")[-2] for m in members})
    for m in members:
        images, labels = split[m.name.split("/")[-3]]
        images.append(np.asarray(Image.open(io.BytesIO(archive.extractfile(m).read())).convert("RGB")))
        labels.append(classes.index(m.name.split("/")[-2]))
for name, (images, labels) in split.items():
    torch.save({"images": torch.tensor(np.stack(images)), "labels": torch.tensor(labels), "classes": classes}, f"{sys.argv[2]}/{name}.pt")
    print(name, len(images), "images")
PY
(cd $airbench_dir && PYTHONPATH=/tmp/airbench-site timeout 150 python3 -c \
    "import airbench; airbench.warmup94(); [airbench.train94(run=i) for i in range(5)]") > "$out/airbench.log" 2>&1
echo "gpu-frontier.sh: airbench exit $? after ${SECONDS} s"; tail -8 "$out/airbench.log"

# 2. Five seeds of one trial each; the data decoded into the cache once, before the first is timed.
python3 -c "import sys; from tune_cnn.data import load_data; print(load_data(sys.argv[1]).describe())" "$data"
for seed in 0 1 2 3 4; do
    echo "seed $seed"
    timeout 60 python3 -m tune_cnn.train --data "$data" --set $recipe lr=1.5 seed=$seed
done > "$out/seeds.log" 2>&1
awk '/^seed /{seed=$2} /^epoch /{s[seed]+=$(NF-2); acc[seed]=$10}
     END {for (k in acc) printf "seed %s: test_acc %s, %.2f s of epochs\n", k, acc[k], s[k]}' "$out/seeds.log"
echo "gpu-frontier.sh: seeds done after ${SECONDS} s"

# 3. The 16-trial sweep through Ray, under MPS.
unpack_ray || { echo "gpu-frontier.sh: no Ray carried: no sweep"; exit 0; }
start_mps
python3 - "$recipe" > /tmp/frontier16.yaml <<'PY'
import sys, yaml
fixed = dict(pair.split("=") for pair in sys.argv[1].split())
fixed = {k: yaml.safe_load(v) for k, v in fixed.items()} | {"checkpoint_every": int(fixed["epochs"])}
print(yaml.safe_dump({"search": "grid", "resources": {"cpu": 1, "gpu": "auto"}, "fixed": fixed,
                      "space": {"lr": [1.0, 1.5, 2.0, 3.0], "seed": [0, 1, 2, 3]}}))
PY
start=$SECONDS
timeout 300 python3 -m tune_cnn.sweep /tmp/frontier16.yaml --data "$data" --storage /tmp/runs --name frontier16 > "$out/sweep.log" 2>&1
echo "gpu-frontier.sh: 16-trial sweep exit $? in $((SECONDS - start)) s wall, command to analysis"
grep -A8 "^## Best trials" /tmp/runs/frontier16/analysis/report.md
stop_mps
