"""The one error type a user can cause, and the way every command reports it."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import NoReturn, TypeVar

F = TypeVar("F", bound=Callable[..., object])


class TuneCnnError(ValueError):
    """Bad input from the user: the message is one line that says what is wrong and how to fix it."""


class ConfigError(TuneCnnError):
    """A model, training or search-space setting is invalid."""


class DataError(TuneCnnError):
    """A data set cannot be found, read or used."""


class StorageError(TuneCnnError):
    """The experiment's storage cannot be written (permissions, a full disk, a bucket without access)."""


def byte_size(count: int) -> str:
    """A size in bytes as a message gives it: GiB from one GiB up, MiB below."""
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def first_line(error: BaseException) -> str:
    """An exception's message cut to one line, for a one-line error that quotes its cause."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def write_probe(folder: Path) -> None:
    """Make a folder in `folder` and remove it; an OSError where that fails. Permission bits alone miss read-only
    file systems and root's limits (/sys)."""
    os.rmdir(tempfile.mkdtemp(prefix=".tune_cnn_probe_", dir=folder))


def nearest_existing(path: Path) -> Path:
    """The path itself or its nearest parent that exists: what decides whether a folder can be made there."""
    return next(p for p in (path, *path.parents) if p.exists())


def check_folder_can_be_made(folder: Path, label: str, fix: str) -> None:
    """A ConfigError, before any work, where a file stands at `folder` or at one of its parents, or where the
    nearest folder that exists cannot be written (permissions, a read-only file system)."""
    nearest = nearest_existing(folder)
    if not nearest.is_dir():
        raise ConfigError(f"{label}: {nearest} is a file; {fix}")
    try:
        write_probe(nearest)
    except OSError:
        raise ConfigError(f"{label}: {nearest} is not writable; {fix}") from None


class CommandParser(argparse.ArgumentParser):
    """argparse for every command, but a mistyped option is one line, like every other user error (argparse
    prints its whole usage block first), and exit code 2."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message}; see {self.prog} --help", file=sys.stderr)
        raise SystemExit(2)


def exit_on_user_error(main: F) -> F:
    """Run a command's main(); a user error ends it with one line on stderr and exit code 2, Ctrl-C with one line
    and 130 (the shell's code for it), and a closed pipe (`| head`) quietly."""

    @wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except TuneCnnError as error:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None
        except BrokenPipeError:  # Python's advice: point stdout at devnull, so the flush at exit does not fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise SystemExit(141) from None

    return wrapper  # type: ignore[return-value]
