"""The driver's claim on its experiment folder: one sweep driver at a time per experiment, a new sweep or a resume.

A claim is the file driver.json in the experiment folder, saying which driver holds it (host, pid, start).
How a live claim is told from one a killed driver left behind depends on the storage:

- a local (or NFS-mounted) folder: the driver holds an exclusive flock on driver.json for as long as it runs, which
  the kernel takes atomically and releases when the process ends however it ends (kill -9 included), so a claim
  is live exactly while that lock is held;
- object storage (s3://, gs://, file://, through pyarrow): there are no locks, so the driver rewrites its claim
  every HEARTBEAT_SECONDS and a claim is live while its heartbeat is younger than STALE_AFTER_SECONDS, or, seen
  from the driver's own host, while its process still runs. Two drivers that claim at the same moment both write;
  each waits SETTLE_SECONDS and reads the claim back, and only the one whose claim stayed goes on.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tune_cnn.errors import ConfigError
from tune_cnn.experiment import CLAIM_FILE, Storage

HEARTBEAT_SECONDS = 10.0
STALE_AFTER_SECONDS = 60.0  # six missed heartbeats, and room for clocks a little apart between hosts
SETTLE_SECONDS = 2.0  # longer than any write of a claim takes, so that a racing driver's write has landed


@dataclass(frozen=True)
class Holder:
    """Who holds a claim, as driver.json records it."""

    host: str
    pid: int
    started: float
    heartbeat: float
    token: str

    @classmethod
    def this_driver(cls) -> Holder:
        now = time.time()
        return cls(socket.gethostname(), os.getpid(), now, now, uuid.uuid4().hex)

    @classmethod
    def from_text(cls, text: str | None) -> Holder | None:
        """The holder recorded in `text`; None for no text or one cut short."""
        try:
            return cls(**json.loads(text or "null"))
        except (TypeError, ValueError):
            return None

    def to_text(self) -> str:
        return json.dumps(asdict(self))

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.started))}"

    def is_live(self, now: float) -> bool:
        """Whether this claim on object storage still stands (see the module's docstring)."""
        if self.host == socket.gethostname() and not _process_runs(self.pid):
            return False
        return now - self.heartbeat < STALE_AFTER_SECONDS


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def in_use_error(location: str, holder: Holder | None) -> ConfigError:
    who = f" ({holder.describe()})" if holder else ""
    return ConfigError(f"experiment {location} is in use by another sweep's driver{who}; wait for it to end or stop it "
                       f"before a --resume, or choose another --name")


class Claim:
    """The claim this driver holds; `release()` gives it up (also when the claim is used as a context manager)."""

    def __init__(self, storage: Storage):
        self.storage = storage
        self.holder = Holder.this_driver()
        self._lock_file: int | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._made: list[Path] = []  # the local folders the claim made, removed again if nothing else was written

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def take(self) -> Claim:
        """Claim the experiment; one ConfigError where another driver holds it."""
        with self.storage.reaching():
            if self.storage.is_uri:
                self._take_object()
            else:
                self._take_local()
        return self

    def release(self) -> None:
        """Give the claim up; where the claim made the experiment's folder and nothing else was written there (a
        sweep that stopped before it started), the folder goes too, so that a refused start leaves nothing behind."""
        if self._lock_file is not None:
            if self._made and self.storage.listing() == ([CLAIM_FILE], []):
                os.unlink(Path(self.storage.root) / CLAIM_FILE)  # under the lock: see _open_locked
                for folder in reversed(self._made):
                    folder.rmdir()
            os.close(self._lock_file)  # the lock goes with it; the file stays, so that later drivers lock this one
            self._lock_file = None
        if self._heartbeat is not None:
            self._stop.set()
            self._heartbeat.join()
            self._heartbeat = None
            standing = Holder.from_text(self.storage.read_text(CLAIM_FILE))
            if standing is not None and standing.token == self.holder.token:
                self.storage.delete(CLAIM_FILE)
                if self._made and self.storage.listing() == ([], []):
                    self.storage.fs.delete_dir(self.storage.root)

    def _take_local(self) -> None:
        folder = Path(self.storage.root)
        self._made = [p for p in (folder, *folder.parents) if not p.exists()][::-1]
        folder.mkdir(parents=True, exist_ok=True)
        descriptor = self._open_locked(folder / CLAIM_FILE)
        os.ftruncate(descriptor, 0)
        os.write(descriptor, self.holder.to_text().encode())
        self._lock_file = descriptor

    def _open_locked(self, path: Path) -> int:
        """The claim file, opened and locked; one ConfigError where another driver holds the lock. A file that a
        releasing driver removed after this one opened it is opened again: a lock on a removed file claims nothing."""
        while True:
            try:
                descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # its folder removed by a driver that released it meanwhile
                path.parent.mkdir(parents=True, exist_ok=True)
                continue
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(descriptor)
                raise in_use_error(self.storage.location, self._holder_written()) from None
            if path.exists() and os.stat(path).st_ino == os.fstat(descriptor).st_ino:
                return descriptor
            os.close(descriptor)

    def _holder_written(self) -> Holder | None:
        """The holder of a lock taken a moment ago, once it has written who it is (it locks, then writes)."""
        for _ in range(20):
            holder = Holder.from_text(self.storage.read_text(CLAIM_FILE))
            if holder is not None:
                return holder
            time.sleep(0.05)
        return None

    def _take_object(self) -> None:
        self._made = [Path(self.storage.root)] if self.storage.kind() == "missing" else []
        standing = Holder.from_text(self.storage.read_text(CLAIM_FILE))
        if standing is not None and standing.is_live(time.time()):
            raise in_use_error(self.storage.location, standing)
        self.storage.write_text(CLAIM_FILE, self.holder.to_text())
        time.sleep(SETTLE_SECONDS)
        written = Holder.from_text(self.storage.read_text(CLAIM_FILE))
        if written is None or written.token != self.holder.token:
            raise in_use_error(self.storage.location, written)
        self._heartbeat = threading.Thread(target=self._beat, name="tune_cnn claim heartbeat", daemon=True)
        self._heartbeat.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                self.storage.write_text(CLAIM_FILE, replace(self.holder, heartbeat=time.time()).to_text())
            except OSError:  # storage lost for a while: the trials' own saves will say so
                continue


def is_held(storage: Storage) -> bool:
    """Whether a driver holds the experiment now: what tells a trial that is running from one whose driver died."""
    if not storage.is_uri:
        path = Path(storage.root) / CLAIM_FILE
        try:
            descriptor = os.open(path, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(descriptor)  # a shared lock taken here goes with it
    holder = Holder.from_text(storage.read_text(CLAIM_FILE))
    return holder is not None and holder.is_live(time.time())
