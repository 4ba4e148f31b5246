"""The multi-host path on one machine: three hosts in network namespaces of their own, a Ray cluster across them
and moto's S3 server as the shared storage, and the faults a cluster meets.

The harness (the `hosts` fixture, root only): a Linux bridge in the root namespace with a private /24
(10.231.7.0/24 unless another run holds it), the bridge at .1; namespaces tcnn-<pid>-head, -w1 and -w2, each
joined to the bridge by a veth pair (.11, .12, .13) with `lo` up; moto's S3 server in the root namespace on the
bridge address, so every host reaches it, with a bucket; `ray start --head --num-cpus 0` in the head namespace and
`ray start --address HEAD:6379 --num-cpus 1` in each worker's, with token authentication on (RAY_AUTH_MODE=token
and a token of this run's own in RAY_AUTH_TOKEN, not ~/.ray/auth_token) and AWS_* pointing at moto for every Ray
process, so trials write to s3://BUCKET/runs from whichever host runs them, as on the README's cluster. Every Ray
node keeps its own temporary folder. The namespaces share the file system, so the data folder and the venv are the
same paths on every host.

Cleanup, also after a failed test or a fixture that stopped halfway: every process in each of this run's
namespaces (`ip netns pids`: only processes this run put there) is killed, then the namespaces, the veth pairs and
the bridge are deleted and moto is stopped. Not `ray stop`: it matches Ray's processes by name across the whole
machine (the pid namespace is shared), so inside one namespace it would stop the other hosts and any other Ray
session on the machine too.

The tests: a sweep from the head host whose trials all run on the two worker hosts; a worker host lost mid-trial
(every process on it SIGKILLed, only its raylet SIGKILLed, or its link taken down), after which its trial goes on
on the other worker from its last checkpoint (Tune's retry) and the sweep exits 0 with every epoch once; and the
driver on the head host SIGKILLed mid-sweep, then `--resume` from the head host. About 4 min 40 s on the 2-core
machine for all five: the harness 17-22 s, the sweep 28-45 s, each lost worker 36-74 s (the link-down one waits for
the GCS's health check), the driver kill and resume 80-100 s.

Run with: .venv/bin/python -m pytest -m slow tests/test_hosts.py -q
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tune_cnn import analysis

from conftest import SWEEP_ENV, Sweep, epochs_per_trial, make_image_folder, read_file, reports, saved_trials, wait_for, write_file, write_space

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("decode_cache")]

BUCKET = "hosts"
REGION = "us-east-1"
GCS_PORT = 6379  # each namespace has its own ports, so Ray's default cannot clash with another Ray on the machine
WORKERS = ("w1", "w2")
ROLES = ("head", *WORKERS)
HOST_NUMBER = {"head": 11, "w1": 12, "w2": 13}
RAY = str(Path(sys.executable).parent / "ray")
MOTO = str(Path(sys.executable).parent / "moto_server")
SWEEP_TIMEOUT_S = 300
RAY_START_TIMEOUT_S = 120  # 5-10 s here; a worker whose head does not answer retries for minutes
# How soon the head's GCS gives up on a host that stopped answering: Ray's defaults, a 3 s period and 5 misses of
# up to 10 s each, take 15-65 s; these keep the fault tests short and change nothing else.
HEAD_ENV = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "3000", "RAY_health_check_failure_threshold": "5"}
# Trials with a checkpoint after every epoch, so that a fault lands between two of them.
SPACE = "resources: {{cpu: 1}}\nfixed: {{epochs: {epochs}, checkpoint_every: 1, padding: same, batch_size: 8}}\nspace: {space}\n"
NODES = ("import json, sys, ray; ray.init(address=sys.argv[1], logging_level='ERROR'); "
         "print(json.dumps([[n['NodeID'], n['NodeManagerAddress'], n['Alive']] for n in ray.nodes()]))")


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


class Hosts:
    """Three hosts (network namespaces) on a bridge, moto's S3 on the bridge and a Ray cluster across the hosts.
    Everything it makes it records first, so that close() undoes what exists of it at any point."""

    def __init__(self, folder: Path):
        self.folder = folder  # logs
        self.tag = f"tcnn-{os.getpid()}"
        short = f"tc{os.getpid()}"  # interface names: 15 characters at most
        self.bridge = f"{short}b"
        self.namespaces = {role: f"{self.tag}-{role}" for role in ROLES}
        self.veths = {role: f"{short}{role[0]}{role[-1]}" for role in ROLES}  # tcPIDhd, tcPIDw1, tcPIDw2
        self.made_namespaces: list[str] = []
        self.made_links: list[str] = []
        self.moto: subprocess.Popen | None = None
        self.ray_temp = Path(tempfile.mkdtemp(prefix=f"{self.tag}-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
        self.token = secrets.token_hex(32)
        self.subnet = ""
        self.endpoint = ""

    # --- addresses and environment ---

    def ip_of(self, role: str) -> str:
        return f"{self.subnet}.{HOST_NUMBER[role]}"

    @property
    def address(self) -> str:
        return f"{self.ip_of('head')}:{GCS_PORT}"

    def aws(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": REGION,
                "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": str(self.folder / "no-aws-config"),
                "AWS_SHARED_CREDENTIALS_FILE": str(self.folder / "no-aws-credentials")}

    def env(self) -> dict[str, str]:
        """The environment of every Ray process and sweep on the hosts: the cluster's token, moto's S3."""
        base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))}
        return {**base, **SWEEP_ENV, **self.aws(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, "RAY_USAGE_STATS_ENABLED": "0"}

    def on(self, role: str, *command: str) -> list[str]:
        """`command` run on a host."""
        return ["ip", "netns", "exec", self.namespaces[role], *command]

    # --- bringing it up ---

    def start(self) -> None:
        self.make_network()
        self.start_moto()
        self.start_ray()

    def make_network(self) -> None:
        made = ip("link", "add", self.bridge, "type", "bridge", check=False)
        if made.returncode:
            pytest.skip(f"`ip link add ... type bridge` fails here: {made.stderr.strip()}")
        self.made_links.append(self.bridge)
        used = ip("-o", "-4", "addr").stdout + ip("-4", "route").stdout
        self.subnet = next((f"10.231.{n}" for n in range(7, 40) if f"10.231.{n}." not in used), "")
        if not self.subnet:
            pytest.skip("every 10.231.7-39.0/24 is in use on this machine")
        ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for role in ROLES:
            namespace, veth = self.namespaces[role], self.veths[role]
            ip("netns", "add", namespace)
            self.made_namespaces.append(namespace)
            ip("link", "add", veth, "type", "veth", "peer", "name", f"{veth}n")
            self.made_links.append(veth)
            ip("link", "set", f"{veth}n", "netns", namespace)
            ip("-n", namespace, "link", "set", f"{veth}n", "name", "eth0")
            ip("-n", namespace, "addr", "add", f"{self.ip_of(role)}/24", "dev", "eth0")
            ip("-n", namespace, "link", "set", "eth0", "up")
            ip("-n", namespace, "link", "set", "lo", "up")
            ip("link", "set", veth, "master", self.bridge, "up")

    def start_moto(self) -> None:
        import boto3

        bridge_ip = f"{self.subnet}.1"
        with socket.socket() as probe:
            probe.bind((bridge_ip, 0))
            port = probe.getsockname()[1]
        self.endpoint = f"http://{bridge_ip}:{port}"
        with open(self.folder / "moto.log", "a") as log:
            self.moto = subprocess.Popen([MOTO, "-H", bridge_ip, "-p", str(port)], stdout=log, stderr=log, start_new_session=True)
        client = boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id="test", aws_secret_access_key="test")

        def answers() -> bool:
            """moto's S3 server answers"""
            try:
                client.list_buckets()
            except Exception:  # noqa: BLE001 - not up yet
                return False
            return True

        wait_for(answers, timeout=60)
        client.create_bucket(Bucket=BUCKET)
        # Every host reaches it through the bridge (an S3 request from inside each namespace).
        for role in ROLES:
            probe = subprocess.run(self.on(role, sys.executable, "-c", f"import urllib.request; urllib.request.urlopen('{self.endpoint}/{BUCKET}')"),
                                   capture_output=True, text=True, timeout=60)
            assert probe.returncode == 0, f"{role} cannot reach S3 at {self.endpoint}: {probe.stderr[-2000:]}"

    def start_ray(self) -> None:
        self.ray_start("head", "--head", "--port", str(GCS_PORT), "--num-cpus", "0", "--include-dashboard", "false")
        for worker in WORKERS:
            self.start_worker(worker)
        self.wait_for_nodes()

    def start_worker(self, worker: str) -> None:
        self.ray_start(worker, "--address", self.address, "--num-cpus", "1")

    def ray_start(self, role: str, *options: str) -> None:
        env = {**self.env(), **(HEAD_ENV if role == "head" else {})}
        temp = self.ray_temp / role
        temp.mkdir(exist_ok=True)
        with open(self.folder / f"ray-start-{role}.log", "a") as log:
            done = subprocess.run(
                self.on(role, RAY, "start", *options, "--node-ip-address", self.ip_of(role), "--temp-dir", str(temp),
                        "--object-store-memory", str(200 * 2**20), "--disable-usage-stats"),
                env=env, stdout=log, stderr=subprocess.STDOUT, timeout=RAY_START_TIMEOUT_S, start_new_session=True,
            )
        assert done.returncode == 0, f"ray start on {role} failed:\n" + (self.folder / f"ray-start-{role}.log").read_text()[-3000:]

    def nodes(self) -> list[dict[str, Any]]:
        """The cluster's nodes as its GCS lists them, asked from the head."""
        done = subprocess.run(self.on("head", sys.executable, "-c", NODES, self.address), env=self.env(), capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        listed = json.loads(done.stdout.strip().splitlines()[-1])
        return [{"id": node_id, "ip": node_ip, "alive": alive} for node_id, node_ip, alive in listed]

    def alive(self) -> dict[str, str]:
        """role -> node id of each host's live Ray node."""
        by_ip = {node["ip"]: node["id"] for node in self.nodes() if node["alive"]}
        return {role: by_ip[self.ip_of(role)] for role in ROLES if self.ip_of(role) in by_ip}

    def wait_for_nodes(self) -> dict[str, str]:
        def all_three() -> dict[str, str] | None:
            """the head and both workers alive in the Ray cluster"""
            alive = self.alive()
            return alive if len(alive) == len(ROLES) else None

        return wait_for(all_three, timeout=180)

    def ensure_workers(self) -> dict[str, str]:
        """Each worker host with its Ray node running (a test before may have killed one); role -> node id."""
        for worker in WORKERS:
            if "raylet" not in self.commands(worker):
                self.kill_host(worker)
                self.start_worker(worker)
        return self.wait_for_nodes()

    # --- processes on a host ---

    def pids(self, role: str) -> list[int]:
        done = ip("netns", "pids", self.namespaces[role], check=False)
        return [int(pid) for pid in done.stdout.split()]

    def commands(self, role: str) -> dict[str, int]:
        names = {}
        for pid in self.pids(role):
            try:
                names[Path(f"/proc/{pid}/comm").read_text().strip()] = pid
            except OSError:  # gone
                pass
        return names

    def kill_host(self, role: str, sig: signal.Signals = signal.SIGKILL) -> list[int]:
        """Signal every process on the host (a host that loses power: nothing of it gets to say goodbye)."""
        killed = self.pids(role)
        for pid in killed:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if sig == signal.SIGKILL:
            deadline = time.monotonic() + 30
            while self.pids(role) and time.monotonic() < deadline:
                time.sleep(0.1)
        return killed

    # --- taking it down ---

    def close(self) -> None:
        """Undo what exists of the harness; each step on its own, so one that fails does not leave the rest."""
        errors = []
        for namespace in self.made_namespaces:
            role = next(r for r, n in self.namespaces.items() if n == namespace)
            self.kill_host(role, signal.SIGTERM)
        time.sleep(1 if self.made_namespaces else 0)
        for namespace in self.made_namespaces:
            role = next(r for r, n in self.namespaces.items() if n == namespace)
            self.kill_host(role, signal.SIGKILL)
            if self.pids(role):
                errors.append(f"processes left in {namespace}: {self.pids(role)}")
        if self.moto is not None:
            self.moto.terminate()
            try:
                self.moto.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.moto.kill()
                self.moto.wait()
        for namespace in reversed(self.made_namespaces):
            done = ip("netns", "del", namespace, check=False)
            if done.returncode and namespace in ip("netns", "list", check=False).stdout:
                errors.append(f"ip netns del {namespace}: {done.stderr.strip()}")
        for link in reversed(self.made_links):  # the veths go with their namespaces, as the kernel gets to it; the bridge stays
            done = ip("link", "del", link, check=False)
            deadline = time.monotonic() + 10
            while ip("link", "show", link, check=False).returncode == 0 and time.monotonic() < deadline:
                time.sleep(0.2)
                done = ip("link", "del", link, check=False)
            if ip("link", "show", link, check=False).returncode == 0:
                errors.append(f"ip link del {link}: {done.stderr.strip()}")
        self.made_namespaces, self.made_links = [], []
        shutil.rmtree(self.ray_temp, ignore_errors=True)
        assert not errors, errors


def can_make_namespaces() -> str | None:
    """Why this machine cannot run the harness; None where it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, a bridge)"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip`"
    probe = f"tcnn-{os.getpid()}-probe"
    done = ip("netns", "add", probe, check=False)
    if done.returncode:
        return f"`ip netns add` fails here: {done.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    return None


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Hosts]:
    reason = can_make_namespaces()
    if reason:
        pytest.skip(reason)
    harness = Hosts(tmp_path_factory.mktemp("hosts"))
    request.addfinalizer(harness.close)  # first: a fixture that fails halfway leaves nothing either
    harness.start()
    with pytest.MonkeyPatch.context() as env:  # this process reads the bucket through the same variables
        for name in [n for n in os.environ if n.startswith("AWS_")]:
            env.delenv(name)
        for name, value in harness.aws().items():
            env.setenv(name, value)
        yield harness


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Epochs of a good fraction of a second on one thread (600 training images)."""
    return make_image_folder(tmp_path_factory.mktemp("data") / "images", per_class={"train": 200, "test": 20}, size=(20, 20))


class HostSweep(Sweep):
    """The sweep command run on the head host, in its own process group (the driver, and its plot workers)."""

    def __init__(self, hosts: Hosts, *args: str):
        self.log = open(hosts.folder / f"sweep-{time.monotonic_ns()}.log", "w+")
        self.process = subprocess.Popen(
            hosts.on("head", sys.executable, "-m", "tune_cnn.sweep", *args), env=hosts.env(),
            stdout=self.log, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )


def sweep_command(hosts: Hosts, images: Path, folder: Path, name: str, epochs: int, space: str, *options: str) -> tuple[list[str], str]:
    """The sweep's arguments and the experiment's URI."""
    path = write_space(folder, SPACE.format(epochs=epochs, space=space), f"{name}.yaml")
    args = [str(path), "--address", hosts.address, "--storage", f"s3://{BUCKET}/runs", "--data", str(images), "--name", name, *options]
    return args, f"s3://{BUCKET}/runs/{name}"


def poll(condition: Callable[[], Any], run: Sweep, timeout: float = SWEEP_TIMEOUT_S, every: float = 0.5) -> Any:
    """conftest's wait_for at a gentler pace: each look reads the bucket, and moto shares the two cores with the hosts."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if not run.running():
            pytest.fail("the sweep ended before the fault could be injected:\n" + run.finish()[1][-3000:])
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:g} s waiting for {condition.__doc__}")


def trial_folders(experiment: str) -> list[str]:
    return sorted(t["folder"] for t in saved_trials(experiment))


def s3_client() -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name=REGION)


def checkpoint_reports(experiment: str) -> dict[str, list[dict]]:
    """trial folder -> the reports its latest uploaded checkpoint holds (written by the trial itself, on its host)."""
    prefix = experiment.removeprefix(f"s3://{BUCKET}/") + "/"
    client = s3_client()
    keys = [item["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
            for item in page.get("Contents", [])]
    latest: dict[str, str] = {}
    for key in keys:
        parts = key.removeprefix(prefix).split("/")
        if len(parts) == 3 and parts[1].startswith("checkpoint_") and parts[2] == "reports.json":
            latest[parts[0]] = max(latest.get(parts[0], ""), key)
    found = {}
    for folder, key in latest.items():
        try:
            found[folder] = json.loads(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())["reports"]
        except (ValueError, KeyError):  # being written
            pass
    return found


def check_finished(experiment: str, trials: int, epochs: int) -> analysis.Sweep:
    """The analysis reads the experiment back from S3: every trial finished, every epoch once."""
    loaded = analysis.load(experiment)
    assert loaded.frame["trial_id"].nunique() == trials and set(loaded.frame["status"]) == {"finished"}, loaded.frame[["trial_id", "status"]]
    assert not loaded.context.incomplete
    assert epochs_per_trial(loaded.frame) == [list(range(1, epochs + 1))] * trials
    assert (read_file(experiment, "analysis/report.md") or "").startswith("# Analysis of ")
    return loaded


def raw_epochs(experiment: str) -> dict[str, list[int]]:
    """Each trial's epochs as its result.json (the driver's log of its reports) holds them, repeats included."""
    return {folder: [r["epoch"] for r in reports(experiment, folder)] for folder in trial_folders(experiment)}


# --- The tests ------------------------------------------------------------------------------------------------


def test_a_sweep_from_the_head_host_runs_every_trial_on_the_worker_hosts_into_s3(hosts: Hosts, images: Path, tmp_path: Path):
    nodes = hosts.ensure_workers()
    epochs, trials = 3, 4
    args, experiment = sweep_command(hosts, images, tmp_path, "spread", epochs, "{pooling: [max, avg], conv_width: [3, 5]}")
    code, output = HostSweep(hosts, *args).finish(SWEEP_TIMEOUT_S)
    assert code == 0, output[-3000:]
    assert f"experiment: {experiment}\n" in output
    workers = {nodes[w]: hosts.ip_of(w) for w in WORKERS}
    results = {folder: reports(experiment, folder) for folder in trial_folders(experiment)}
    assert len(results) == trials
    for folder, history in results.items():
        assert [r["epoch"] for r in history] == list(range(1, epochs + 1)), folder  # every epoch reported once
        assert all(r["node_id"] in workers and r["node_ip"] == workers[r["node_id"]] for r in history), (folder, nodes, history[-1])
    # One CPU per worker and none on the head: the first two trials ran at once, one on each worker host.
    assert {r["node_ip"] for history in results.values() for r in history} == set(workers.values())
    check_finished(experiment, trials, epochs)


def lose_a_worker_mid_trial(hosts: Hosts, fault: str) -> None:
    """w1 goes as `fault` says."""
    if fault == "host killed":  # every process on the host, SIGKILL: a host that lost power
        hosts.kill_host("w1")
    elif fault == "raylet killed":
        os.kill(hosts.commands("w1")["raylet"], signal.SIGKILL)
    elif fault == "link down":  # a network partition: w1's processes run on, cut off from the head and from S3
        ip("link", "set", hosts.veths["w1"], "down")
    else:
        raise ValueError(fault)


@pytest.mark.parametrize("fault", ["host killed", "raylet killed", "link down"])
def test_a_worker_host_lost_mid_sweep_its_trial_continues_on_the_other_from_its_checkpoint(hosts: Hosts, images: Path, tmp_path: Path, fault: str):
    nodes = hosts.ensure_workers()
    epochs = 8
    name = "lost-" + fault.replace(" ", "-")
    args, experiment = sweep_command(hosts, images, tmp_path, name, epochs, "{pooling: [max, avg]}")
    run = HostSweep(hosts, *args)
    try:
        def a_trial_on_w1_checkpointed() -> tuple[str, list[dict]] | None:
            """a trial on w1 that has uploaded checkpoints of 2 epochs"""
            on_w1 = [(folder, saved) for folder, saved in checkpoint_reports(experiment).items()
                     if saved and saved[-1]["node_id"] == nodes["w1"] and 2 <= saved[-1]["epoch"] < epochs]
            return on_w1[0] if on_w1 else None

        folder, before = poll(a_trial_on_w1_checkpointed, run)
        lost_at = time.monotonic()
        lose_a_worker_mid_trial(hosts, fault)
        code, output = run.finish(SWEEP_TIMEOUT_S)
        took = time.monotonic() - lost_at
    finally:
        run.kill_all(signal.SIGKILL)
        if fault == "link down":
            ip("link", "set", hosts.veths["w1"], "up")
        hosts.kill_host("w1")  # the next test starts it afresh
    history = reports(experiment, folder)
    print(f"\n[{fault}] w1 lost after epoch {before[-1]['epoch']}; the sweep ended {took:.1f} s later with exit {code}; "
          f"the trial's epochs in result.json: {[r['epoch'] for r in history]}, hosts: {[r['node_ip'] for r in history]}; "
          f"raw epochs of all trials: {raw_epochs(experiment)}")
    print("\n".join(line for line in output.splitlines() if "rror" in line or "fail" in line.lower())[-3000:])
    assert code == 0, output[-3000:]
    check_finished(experiment, 2, epochs)
    after = [r for r in history if r["node_id"] != nodes["w1"]]
    assert after and all(r["node_ip"] == hosts.ip_of("w2") for r in after), history  # it went on on w2
    assert after[0]["epoch"] > 1, "the trial on the lost host started again from scratch"
    # From its last checkpoint, with a checkpoint after every epoch: no epoch run twice, none left out, in result.json too.
    assert raw_epochs(experiment) == {f: list(range(1, epochs + 1)) for f in trial_folders(experiment)}


def test_the_drivers_host_loses_the_driver_and_a_resume_from_the_head_host_finishes_the_sweep(hosts: Hosts, images: Path, tmp_path: Path):
    """SIGKILL of the driver (and its plot workers) on the head host once a trial has finished and another has saved
    3 epochs; the same command with --resume, from the head host, reruns no finished trial and continues the others
    from their checkpoints. The cluster stays up, as a cluster's head does when its driver's terminal goes."""
    hosts.ensure_workers()
    epochs, trials = 8, 3
    args, experiment = sweep_command(hosts, images, tmp_path, "resumed", epochs, "{conv_width: [3, 5, 7]}")
    run = HostSweep(hosts, *args)
    try:
        def one_finished_and_one_checkpointed() -> list[dict] | None:
            """a finished trial and a running one with 3 epochs saved"""
            saved = saved_trials(experiment)
            running = [t for t in saved if t["status"] == "RUNNING" and t["last"].get("epoch", 0) >= 3]
            return saved if running and any(t["status"] == "TERMINATED" for t in saved) else None

        before = poll(one_finished_and_one_checkpointed, run)
        run.kill_all(signal.SIGKILL)
        run.finish()
    finally:
        run.kill_all(signal.SIGKILL)
    finished = {t["folder"]: read_file(experiment, f"{t['folder']}/result.json") for t in before if t["status"] == "TERMINATED"}
    interrupted = [t for t in before if t["status"] == "RUNNING"]
    # As conftest's kill_driver_then_resume: the worst moment, the driver killed while it rewrote these files. Here
    # also the copies in the driver's staging folder on the head host: a resume in the same Ray session stages in the
    # same folder (artifacts/<the first run's start>/NAME/driver_artifacts) and uploads them again, which would hide
    # the cut (seen: the emptied result.json came back with the killed driver's epochs).
    staged = 0
    for trial in interrupted:
        for file in ("result.json", "progress.csv"):
            write_file(experiment, f"{trial['folder']}/{file}", "")
            for copy in (hosts.ray_temp / "head").glob(f"session_*/artifacts/*/resumed/driver_artifacts/{trial['folder']}/{file}"):
                copy.write_text("")
                staged += 1
    assert staged, "no staged copy of the interrupted trials' files on the head host"
    started = time.monotonic()
    code, output = HostSweep(hosts, *args, "--resume").finish(SWEEP_TIMEOUT_S)
    for trial in interrupted:
        print(trial["folder"], [(r["epoch"], r["pid"], r["node_ip"], r.get("timestamp")) for r in reports(experiment, trial["folder"])])
    print(f"\nkilled with {len(finished)} finished and {[(t['folder'][-30:], t['last'].get('epoch')) for t in interrupted]} running; "
          f"the resume took {time.monotonic() - started:.1f} s, exit {code}; raw epochs: {raw_epochs(experiment)}")
    assert code == 0, output[-3000:]
    for folder, text in finished.items():
        assert text and read_file(experiment, f"{folder}/result.json") == text, f"{folder} ran again"
    checkpointed = [t for t in interrupted if t["last"].get("epoch")]  # a trial that had only just started has no checkpoint
    assert checkpointed
    for trial in interrupted:
        continued = reports(experiment, trial["folder"])
        assert continued and all(r["node_ip"] in {hosts.ip_of(w) for w in WORKERS} for r in continued), continued
        if trial in checkpointed:
            first_after_resume = next((r["epoch"] for r in continued if r["pid"] != trial["last"]["pid"]), None)
            # Ray resumes from the checkpoint its saved state records, which may trail the last result by an epoch.
            assert first_after_resume is not None and first_after_resume > 1, f"{trial['folder']} started again from scratch"
    check_finished(experiment, trials, epochs)
