"""The driver's claim on an experiment: one holder at a time, on a local folder (a lock) and on object storage
(a heartbeat; file:// URIs take pyarrow's generic path, as s3:// does), and claims that killed drivers left."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tune_cnn import claim
from tune_cnn.claim import Claim, Holder, is_held
from tune_cnn.errors import ConfigError
from tune_cnn.experiment import CLAIM_FILE, Storage


@pytest.fixture(params=["local", "object"])
def storage(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Storage:
    monkeypatch.setattr(claim, "SETTLE_SECONDS", 0.2)
    folder = tmp_path / "results" / "sweep"
    return Storage.open(folder if request.param == "local" else f"file://{folder}")


def test_a_second_claim_is_one_line_naming_the_holder_until_the_first_is_released(storage: Storage):
    with Claim(storage).take() as first:
        assert is_held(storage)
        with pytest.raises(ConfigError) as error:
            Claim(storage).take()
        message = str(error.value)
        assert message.startswith(f"experiment {storage.location} is in use by another sweep's driver (pid {first.holder.pid} on ")
        assert message.endswith("; wait for it to end or stop it before a --resume, or choose another --name") and "\n" not in message
    assert not is_held(storage)
    with Claim(storage).take():
        assert is_held(storage)


HOLD_AND_WAIT = """
import sys, time
from tune_cnn import claim
from tune_cnn.experiment import Storage
claim.SETTLE_SECONDS = 0.2
claim.Claim(Storage.open(sys.argv[1])).take()
print("held", flush=True)
time.sleep(600)
"""


def test_a_claim_whose_driver_was_killed_does_not_block_the_next(storage: Storage):
    """SIGKILL leaves no chance to release: the kernel drops a local lock, and on object storage the claim names a
    process of this host that no longer runs."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_AND_WAIT, storage.location], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    assert is_held(storage)
    with pytest.raises(ConfigError, match=f"pid {holder.pid} on "):
        Claim(storage).take()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert storage.kind(CLAIM_FILE) == "file"  # left behind
    assert not is_held(storage)
    with Claim(storage).take():
        assert is_held(storage)


def write_claim(storage: Storage, host: str, age: float) -> None:
    now = time.time()
    storage.write_text(CLAIM_FILE, json.dumps({"host": host, "pid": 1, "started": now - age, "heartbeat": now - age, "token": "theirs"}))


def test_on_object_storage_another_hosts_claim_stands_until_its_heartbeat_is_stale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(claim, "SETTLE_SECONDS", 0.2)
    storage = Storage.open(f"file://{tmp_path}/sweep")
    write_claim(storage, "elsewhere", age=claim.STALE_AFTER_SECONDS / 2)
    assert is_held(storage)
    with pytest.raises(ConfigError, match=r"in use by another sweep's driver \(pid 1 on elsewhere, started "):
        Claim(storage).take()
    write_claim(storage, "elsewhere", age=claim.STALE_AFTER_SECONDS + 1)
    assert not is_held(storage)
    with Claim(storage).take() as mine:
        assert Holder.from_text(storage.read_text(CLAIM_FILE)).token == mine.holder.token
    assert storage.kind(CLAIM_FILE) == "missing"  # released: removed


def test_on_object_storage_the_holder_keeps_its_heartbeat_fresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(claim, "SETTLE_SECONDS", 0.0)
    monkeypatch.setattr(claim, "HEARTBEAT_SECONDS", 0.05)
    storage = Storage.open(f"file://{tmp_path}/sweep")
    with Claim(storage).take() as mine:
        time.sleep(0.5)
        beat = Holder.from_text(storage.read_text(CLAIM_FILE))
        assert beat.token == mine.holder.token and beat.heartbeat > mine.holder.heartbeat + 0.1


def test_two_drivers_claiming_at_the_same_moment_leave_one_holder(storage: Storage):
    barrier, outcomes = threading.Barrier(2), []

    def race() -> None:
        barrier.wait()
        try:
            outcomes.append(Claim(storage).take())
        except ConfigError as error:
            outcomes.append(error)

    racers = [threading.Thread(target=race) for _ in range(2)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join()
    held = [o for o in outcomes if isinstance(o, Claim)]
    assert len(held) == 1 and "in use by another sweep's driver" in str(next(o for o in outcomes if isinstance(o, ConfigError)))
    held[0].release()


def test_a_claim_that_made_the_experiments_folder_removes_it_when_nothing_else_was_written(storage: Storage, tmp_path: Path):
    """A sweep refused after its claim (a cluster without the GPU it asks for) leaves no folder behind; one that wrote
    anything keeps it all."""
    with Claim(storage).take():
        assert storage.kind() == "folder"
    assert storage.kind() == "missing"
    assert storage.is_uri or not (tmp_path / "results").exists()  # a local claim made the storage folder too; S3 has no folders
    with Claim(storage).take():
        storage.write_text("tune_cnn.json", "{}")
    assert storage.listing()[0] in (["tune_cnn.json"], [CLAIM_FILE, "tune_cnn.json"])
