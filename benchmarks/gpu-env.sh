# Sourced by gpu.sh and gpu-sweep.sh on the lent GPU machine: Ray from the carried bundle, and CUDA MPS.

unpack_ray() {  # .whl/site.tar.xz (built by ray-bundle.sh) into /tmp/site, on PYTHONPATH; false where not carried
    [ -f .whl/site.tar.xz ] || return 1
    mkdir -p /tmp/site && tar xJf .whl/site.tar.xz -C /tmp/site
    # pip compiles the .pyc files when it installs; without them every process of a sweep compiles Ray's sources.
    python3 -m compileall -q -j 0 /tmp/site >/dev/null 2>&1
    export PYTHONPATH=/tmp/site:$PYTHONPATH
    python3 -c "import ray, ray.tune; print('ray', ray.__version__)"
}

start_mps() {  # trials in separate processes can then run kernels on the GPU at the same time; false without MPS
    command -v nvidia-cuda-mps-control >/dev/null || return 1
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps_pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps_log
    mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
    nvidia-cuda-mps-control -d && echo "MPS started"
}

stop_mps() {
    echo quit | nvidia-cuda-mps-control
    tail -5 $CUDA_MPS_LOG_DIRECTORY/control.log 2>/dev/null
}
