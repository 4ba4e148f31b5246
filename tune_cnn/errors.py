"""The one error type a user can cause, and the way every command reports it."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from functools import wraps
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


class CommandParser(argparse.ArgumentParser):
    """argparse for every command, but a mistyped option is one line, like every other user error (argparse
    prints its whole usage block first), and exit code 2."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message}; see {self.prog} --help", file=sys.stderr)
        raise SystemExit(2)


def exit_on_user_error(main: F) -> F:
    """Run a command's main(); a user error ends it with one line on stderr and exit code 2."""

    @wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except TuneCnnError as error:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper  # type: ignore[return-value]
