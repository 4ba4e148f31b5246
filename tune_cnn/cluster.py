"""The Ray cluster a sweep runs on: starting or joining it, what it has (GPUs now or to come), and the resources
each trial asks for, checked against its nodes so that no trial waits for ever.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from tune_cnn.errors import ConfigError
from tune_cnn.space import SearchSpace

AUTOSCALER_CONFIG = Path("~/ray_bootstrap_config.yaml")  # where `ray up` leaves the cluster's config on its head
CONNECT_TIMEOUT_S = 30.0  # how long joining --address may take before the sweep gives up


@contextmanager
def ray_session(address: str | None):
    """Ray for the length of the block: started here and shut down after it, or joined at `address`."""
    import ray

    # The compact CLIReporter table needs Tune's classic output engine; set before Ray starts its processes.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    started = connect_ray(address)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def not_the_token_auth_notice(record: logging.LogRecord) -> bool:
    """Ray's notice that a local session uses its default, token authentication, is no news to a sweep's user and
    would come before a one-line error; its warning where authentication is off still shows."""
    return not record.getMessage().startswith("Token authentication is enabled")


def connect_ray(address: str | None) -> bool:
    """Start Ray locally, or join the cluster at `address`; True when this call started the session."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        check_cluster_answers(address)
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(not_the_token_auth_notice)
    with interrupt_after():
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:  # no dashboard on a laptop: nothing listens on a network port (the cluster's head runs its own)
            ray.init(include_dashboard=False, logging_level=logging.WARNING)
    return True


@contextmanager
def interrupt_after() -> Iterator[None]:
    """Ctrl-C waits for the block to end: interrupted midway, ray.init left a traceback and at times a crash at exit."""
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def check_cluster_answers(address: str) -> None:
    """ray.init retries for minutes where no Ray cluster answers; find out within CONNECT_TIMEOUT_S instead."""
    try:
        _refuse_fast(address)
        # Something listening is not yet a Ray cluster: join it from a throwaway process that can be timed out.
        probe = subprocess.run(
            [sys.executable, "-c", "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR')", address],
            capture_output=True, text=True, timeout=CONNECT_TIMEOUT_S,
        )
        if probe.returncode != 0:
            raise OSError((probe.stderr.strip().splitlines() or ["ray.init failed"])[-1])
    except subprocess.TimeoutExpired:
        reason = f"no answer within {CONNECT_TIMEOUT_S:g} s"
    except (OSError, ValueError) as error:
        reason = str(error)
    else:
        return
    raise ConfigError(
        f"no Ray cluster answers at --address {address} ({reason}); check HOST:PORT of the head node "
        f"(port 6379 by default), or start a cluster there with `ray start --head`"
    )


def _refuse_fast(address: str) -> None:
    """A HOST:PORT where nothing listens fails in a TCP connect, without a Ray start-up."""
    if address == "auto" or "://" in address:  # Ray resolves these itself (the local cluster's file, Ray Client)
        return
    host, _, port = address.rpartition(":")
    socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()


def cluster_gpus() -> float:
    """GPUs the cluster has now or, where it has none, can scale to when an autoscaler is configured with GPU node types."""
    import ray

    # Asking for the autoscaler's config takes about 2 s, so only where no GPU is there yet.
    return float(ray.cluster_resources().get("GPU", 0)) or scalable_gpus()


def scalable_gpus() -> float:
    """GPUs an autoscaler may add."""
    return float((autoscaler_limits() or {}).get("GPU", 0))


def autoscaler_limits() -> dict[str, float] | None:
    """The most of each resource an autoscaler may add, from the config Ray reports (autoscaler v2, KubeRay) or
    `ray up`'s on the head (its GPUs); None where no autoscaler is configured."""
    try:
        from ray._private.state import state

        reported = state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - a private API, and absent off a cluster: then only the head's config file counts
        reported = None
    path = AUTOSCALER_CONFIG.expanduser()
    if not path.is_file():
        return reported
    node_types = (yaml.safe_load(path.read_text()) or {}).get("available_node_types", {}).values()
    configured = sum(t.get("resources", {}).get("GPU", 0) * t.get("max_workers", 0) for t in node_types)
    return {**(reported or {}), "GPU": max(float((reported or {}).get("GPU", 0)), float(configured))}


def trial_resources(space: SearchSpace) -> dict[str, float]:
    """The space's resources per trial on this cluster: GPU requests are dropped where no GPU can come."""
    requested = space.resources.gpu
    gpu = space.resources.resolve_gpu(cluster_gpus())
    if requested and not gpu and space.asks_for_cuda:
        raise ConfigError("the space sets device cuda and the Ray cluster has no GPU; set device auto to run the trials on CPUs")
    if requested and not gpu:
        print(f"notice: the Ray cluster has no GPU; running the trials on CPUs only (gpu {requested} per trial was asked for)")
    resources = {"cpu": space.resources.cpu, "gpu": gpu}
    check_a_node_fits(resources)
    return resources


def check_a_node_fits(resources: dict[str, float]) -> None:
    """Ray leaves a trial that no node can hold PENDING for ever: a ConfigError instead, unless an autoscaler may
    bring larger nodes."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    if any(all(node.get(key.upper(), 0) >= amount for key, amount in resources.items()) for node in nodes):
        return
    if autoscaler_limits() is not None:
        return
    joining = "; if nodes are still joining, start the sweep once they have"
    for key, option in (("cpu", "--cpus-per-trial"), ("gpu", "--gpus-per-trial")):
        largest = max(n.get(key.upper(), 0) for n in nodes)
        if resources[key] > largest:
            raise ConfigError(f"a trial asks for {resources[key]:g} {key.upper()}(s) and the largest node of the Ray cluster has "
                              f"{largest:g}; lower {option} (or resources.{key} in the space){joining}")
    raise ConfigError(f"a trial asks for {resources['cpu']:g} CPU(s) and {resources['gpu']:g} GPU(s) and no node of the Ray cluster "
                      f"has both; lower --cpus-per-trial or --gpus-per-trial (or resources in the space){joining}")


def warn_if_storage_is_not_shared(storage: str) -> None:
    """A local --storage on a cluster of several nodes holds only what the head's trials write."""
    import ray

    if "://" not in storage and len([n for n in ray.nodes() if n["Alive"]]) > 1:
        print(
            f"notice: storage {storage} is a local folder on a multi-node cluster; trials on other nodes "
            f"can only save there if it is shared (NFS); use --storage s3://... otherwise"
        )
