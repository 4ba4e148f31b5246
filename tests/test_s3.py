"""S3 storage against a real S3 server on 127.0.0.1 (moto's, checking credentials), reached the standard way: the
environment variables AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_REGION, as boto3, pyarrow and
the AWS CLI read them, and no option on the command line.

A sweep and its analysis into a bucket; a driver killed with SIGKILL and resumed; the analysis command and
analysis.load() of the experiment's URI; the analysis written to --out s3://...; and the faults a user meets: a bucket
that does not exist, credentials the server refuses, and the server going away mid-sweep.
"""
from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from tune_cnn import analysis
from tune_cnn.experiment import CLAIM_FILE

from conftest import (
    Sweep,
    epochs_per_trial,
    kill_driver_then_resume,
    make_image_folder,
    moto_s3,
    wait_for,
    write_space,
)
from test_sweep import QUICK_TRIALS, run_cli

pytestmark = pytest.mark.usefixtures("decode_cache")
REGION = "us-east-1"
BUCKET = "tune-runs"
# Trials long enough for a fault to land mid-trial: 0.2-0.5 s epochs, a checkpoint after each.
LONG_TRIALS = "resources: {{cpu: 1}}\nfixed: {{epochs: {epochs}, checkpoint_every: 1, padding: same, batch_size: 8}}\nspace: {{pooling: {pooling}}}\n"


@dataclass
class S3:
    """The test's S3 server, where the environment points, and a user with a key it accepts."""

    endpoint: str  # http://127.0.0.1:PORT
    key: str
    secret: str

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id=self.key, aws_secret_access_key=self.secret)

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def read(self, bucket: str, key: str) -> bytes:
        return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()


def user_with_a_key(endpoint: str) -> tuple[str, str]:
    """An IAM user allowed s3:* and its access key; then the server checks every request's credentials and signature
    (moto's reset-auth: no request goes unchecked from now on)."""
    import boto3

    iam = boto3.client("iam", endpoint_url=endpoint, region_name=REGION, aws_access_key_id="setup", aws_secret_access_key="setup")
    iam.create_user(UserName="sweeper")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName="sweeper", PolicyName="s3", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="sweeper")["AccessKey"]
    request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(request).read()
    return key["AccessKeyId"], key["SecretAccessKey"]


def point_at(env: pytest.MonkeyPatch, endpoint: str, key: str, secret: str, folder: Path) -> None:
    """The standard environment for an S3 server of one's own; nothing else of the user's AWS setup is read."""
    for name, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret, "AWS_REGION": REGION}.items():
        env.setenv(name, value)
    for name in ("AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        env.delenv(name, raising=False)
    env.setenv("AWS_CONFIG_FILE", str(folder / "no-aws-config"))
    env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(folder / "no-aws-credentials"))
    env.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3]:
    """moto's S3 server, checking credentials, with the environment pointing at it for this module's tests."""
    folder = tmp_path_factory.mktemp("s3")
    with moto_s3(folder / "moto.log") as port, pytest.MonkeyPatch.context() as env:
        endpoint = f"http://127.0.0.1:{port}"
        server = S3(endpoint, *user_with_a_key(endpoint))
        point_at(env, endpoint, server.key, server.secret, folder)
        server.client().create_bucket(Bucket=BUCKET)
        yield server


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Enough images that an epoch of LONG_TRIALS takes a good fraction of a second on one thread."""
    return make_image_folder(tmp_path_factory.mktemp("data") / "images", per_class={"train": 200, "test": 20}, size=(20, 20))


@pytest.fixture(scope="module")
def finished(s3: S3, images: Path) -> str:
    """The quick space swept into s3://BUCKET/runs; the experiment's URI."""
    run = run_cli("quick", "--data", str(images), "--subset", "30", "--storage", f"s3://{BUCKET}/runs")
    assert run.returncode == 0, run.stderr[-3000:]
    experiment = f"s3://{BUCKET}/runs/quick"
    assert f"experiment: {experiment}\n" in run.stdout and f"analysis: {experiment}/analysis\n" in run.stdout
    return experiment


# --- A sweep, its analysis and a resume, through the environment ---------------------------------------------


def test_a_sweep_with_s3_storage_writes_its_experiment_into_the_bucket(s3: S3, finished: str):
    keys = s3.keys(BUCKET, "runs/quick/")
    files = {key.removeprefix("runs/quick/") for key in keys}
    assert {"tune_cnn.json", "tuner.pkl", "analysis/report.md", "analysis/results.parquet"} <= files
    assert any(name.startswith("experiment_state-") for name in files) and CLAIM_FILE not in files  # the claim is given up
    trials = sorted({name.split("/")[0] for name in files if "/params.json" in name})
    assert len(trials) == QUICK_TRIALS
    for trial in trials:
        results = [json.loads(line) for line in s3.read(BUCKET, f"runs/quick/{trial}/result.json").decode().splitlines()]
        assert [r["epoch"] for r in results] == [1, 2]
        for checkpoint in ("checkpoint_000000", "checkpoint_000001"):  # uploaded by the trials themselves
            assert {f"{trial}/{checkpoint}/checkpoint.pt", f"{trial}/{checkpoint}/reports.json"} <= files
    assert json.loads(s3.read(BUCKET, "runs/quick/tune_cnn.json"))["swept"] == ["pooling", "conv_width"]
    assert not Path("s3:").exists()  # nothing went to a local folder named like the URI


def run_analysis(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tune_cnn.analysis", *args], capture_output=True, text=True, timeout=300)


def test_the_analysis_command_and_load_read_the_experiments_uri_alike_and_write_to_out_in_s3(s3: S3, finished: str):
    out = f"s3://{BUCKET}/reports/quick"
    run = run_analysis(finished, "--out", out)
    assert run.returncode == 0 and run.stderr == "", run.stderr[-3000:]
    assert run.stdout.splitlines()[-1] == f"analysis: {out}"
    assert s3.read(BUCKET, "reports/quick/report.md").decode().startswith("# Analysis of quick\n")
    assert {"results.csv", "summary_pooling.csv", "learning_curves.png"} <= {k.removeprefix("reports/quick/") for k in s3.keys(BUCKET, "reports/quick/")}
    loaded = analysis.load(finished)
    assert loaded.context.experiment == finished and loaded.frame["trial_id"].nunique() == QUICK_TRIALS
    assert set(loaded.frame["status"]) == {"finished"} and epochs_per_trial(loaded.frame) == [[1, 2]] * QUICK_TRIALS
    written = pd.read_parquet(io.BytesIO(s3.read(BUCKET, "reports/quick/results.parquet")))
    by_sweep = pd.read_parquet(io.BytesIO(s3.read(BUCKET, "runs/quick/analysis/results.parquet")))  # the sweep's own analysis
    expected = pd.read_parquet(io.BytesIO(loaded.frame.to_parquet(index=False)))  # the frame as a parquet file holds it
    pd.testing.assert_frame_equal(written, expected)
    pd.testing.assert_frame_equal(by_sweep, expected)


@pytest.mark.slow  # about a minute: CI's slow step
def test_a_driver_killed_mid_sweep_resumes_from_the_bucket(s3: S3, images: Path, tmp_path: Path):
    """SIGKILL of the driver and its Ray processes once a trial has finished and the next has saved three epochs;
    the same command with --resume reruns no finished trial and continues the other from its checkpoint."""
    epochs = 10
    space = write_space(tmp_path, LONG_TRIALS.format(epochs=epochs, pooling="[max, avg]"))
    args = [str(space), "--data", str(images), "--storage", f"s3://{BUCKET}/killed", "--max-concurrent", "1"]
    experiment = f"s3://{BUCKET}/killed/space"
    kill_driver_then_resume(args, experiment, checkpoints=3)
    loaded = analysis.load(experiment)
    assert set(loaded.frame["status"]) == {"finished"} and not loaded.context.incomplete
    assert epochs_per_trial(loaded.frame) == [list(range(1, epochs + 1))] * 2  # every epoch reported, once


# --- Faults: a bucket that is not there, credentials the server refuses, the server gone mid-sweep ------------


def test_a_bucket_that_does_not_exist_is_one_line_and_creates_nothing(s3: S3, images: Path):
    run = run_cli("quick", "--data", str(images), "--subset", "30", "--storage", "s3://no-such-bucket/runs")
    assert run.returncode == 2 and len(run.stderr.splitlines()) == 1, run.stderr[-3000:]
    assert "the bucket no-such-bucket does not exist; create it" in run.stderr
    assert "no-such-bucket" not in {b["Name"] for b in s3.client().list_buckets()["Buckets"]}


def test_credentials_the_server_refuses_are_one_line_and_write_nothing(s3: S3, images: Path):
    run = run_cli("quick", "--data", str(images), "--subset", "30", "--storage", f"s3://{BUCKET}/refused",
                  env={"AWS_SECRET_ACCESS_KEY": "not-the-secret"})
    assert run.returncode == 2 and len(run.stderr.splitlines()) == 1, run.stderr[-3000:]
    assert run.stderr.startswith(f"error: cannot reach the experiment folder s3://{BUCKET}/refused/quick (") and run.stderr.endswith(
        "; check --storage, the network and the credentials\n"), run.stderr
    assert s3.keys(BUCKET, "refused/") == []


class Link:
    """A TCP forwarder from a port of its own to the S3 server, as the sweep's way there: `cut` closes it and every
    connection through it (the server gone, as the sweep sees it) while the server, and what it holds, stay."""

    def __init__(self, endpoint: str):
        self.target = ("127.0.0.1", int(endpoint.rsplit(":", 1)[1]))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client = self.listener.accept()[0]
            except OSError:  # cut
                return
            server = socket.create_connection(self.target)
            self.sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def cut(self) -> None:
        self.listener.close()
        for s in self.sockets:
            s.close()


@pytest.mark.slow  # about a minute: CI's slow step
def test_the_server_gone_mid_sweep_is_one_line_and_what_was_written_stays_readable(s3: S3, images: Path, tmp_path: Path,
                                                                                   monkeypatch: pytest.MonkeyPatch):
    """The sweep reaches the server through a Link, which is cut once a trial has saved two checkpoints: the sweep ends
    with exit 2 and one line saying that the storage cannot be reached, and the experiment's epochs saved before are
    read back (the server itself never stopped)."""
    epochs = 40
    link = Link(s3.endpoint)
    space = write_space(tmp_path, LONG_TRIALS.format(epochs=epochs, pooling="[max]"))
    experiment = f"s3://{BUCKET}/gone/space"
    with monkeypatch.context() as env:
        env.setenv("AWS_ENDPOINT_URL", link.endpoint)
        run = Sweep(str(space), "--data", str(images), "--storage", f"s3://{BUCKET}/gone")
    wait_for(lambda: sum("checkpoint_000001/reports.json" in key for key in s3.keys(BUCKET, "gone/space/")) >= 1, run)
    link.cut()
    code, output = run.finish()
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, output[-3000:]
    assert f"s3://{BUCKET}/gone/space" in errors[0] and "Traceback" not in output, output
    loaded = analysis.load(experiment)
    epochs_saved = epochs_per_trial(loaded.frame)
    assert len(epochs_saved) == 1 and epochs_saved[0][:2] == [1, 2] and len(epochs_saved[0]) < epochs
