#!/usr/bin/env bash
# Ray for the lent GPU machines, which have PyTorch but not Ray and cannot download: builds .whl/site.tar.xz
# (about 32 MB), a site-packages folder holding Ray 2.60 for CPython 3.12 and the needs of ray[tune] that
# the machines lack. Ray's wheel (79 MB) is over the 64 MiB a device call may carry, so the parts that a
# local Tune sweep never loads are left out: the Java jars, RLlib and the dashboard's web client (the
# sweeps start Ray with include_dashboard=False; two of tests/test_sweep.py's sweeps passed without them).
# gpu.sh unpacks it when the call carries .whl, and then also times the whole seed sweep through Ray.
#
# From the repository root, on a machine with pip and a package registry (takes about 2 minutes):
#   bash benchmarks/ray-bundle.sh
#   device run, carry [".data", ".whl"], timeout_s 560:  bash benchmarks/gpu.sh
set -eu
wheels=$(mktemp -d) site=$(mktemp -d)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$wheels" \
    ray==2.60.0 jsonschema jsonschema-specifications referencing rpds-py tensorboardX \
    pydantic pydantic-core annotated-types typing-inspection typing-extensions
for wheel in "$wheels"/*.whl; do (cd "$site" && unzip -q -o "$wheel"); done
rm -rf "$site/ray/jars" "$site/ray/rllib" "$site/ray/dashboard/client/build"
mkdir -p .whl
tar cJf .whl/site.tar.xz -C "$site" .
rm -rf "$wheels" "$site"
ls -l .whl/site.tar.xz
