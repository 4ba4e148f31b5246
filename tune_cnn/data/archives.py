"""Archives of a data set (.tar.gz, .tgz, .tar.bz2, .tar.xz, .tar, .zip), extracted once into the cache, keyed by
their content; members may not leave that folder, nor be links."""
from __future__ import annotations

import hashlib
import shutil
import tarfile
import zipfile
from pathlib import Path

from filelock import FileLock

from tune_cnn.errors import DataError

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar", ".zip")
ARCHIVES_TEXT = "/".join(ARCHIVE_SUFFIXES)
TAR_COMPRESSION = {"gz": (".tar.gz", ".tgz"), "bz2": (".tar.bz2",), "xz": (".tar.xz",)}


def extract_archive(path: Path, cache: Path) -> Path:
    """Extract once into a folder of `cache` named by the archive's content; members may not leave that folder."""
    if not path.name.lower().endswith(ARCHIVE_SUFFIXES):
        raise DataError(f"{path} is a file but not an archive; --data takes a folder or a {', '.join(ARCHIVE_SUFFIXES)}")
    target = cache / file_digest(path)
    with FileLock(str(target) + ".lock"):
        if not (target / ".complete").exists():
            print(f"extracting {path} into {target} (once)", flush=True)
            partial = target.with_name(target.name + ".partial")
            _remove_tree(partial)
            partial.mkdir()
            try:
                _unpack(path, partial)
            except DataError:
                _remove_tree(partial)
                raise
            _remove_tree(target)
            partial.rename(target)
            (target / ".complete").touch()
    return target


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:20]


def _unpack(archive: Path, target: Path) -> None:
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as z:
                for name in z.namelist():
                    _check_member(archive, name)
                z.extractall(target)
        else:
            with tarfile.open(archive, _tar_mode(archive.name.lower())) as t:
                members = t.getmembers()
                for member in members:
                    _check_member(archive, member.name)
                    if member.issym() or member.islnk():
                        raise DataError(f"{archive} holds a link ({member.name}); archives may hold only files and folders")
                t.extractall(target, members=members, filter="data")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as error:
        raise DataError(f"{archive} is not a readable archive ({error}); check the file or unpack it and pass the folder") from None


def _tar_mode(name: str) -> str:
    """The compression the name says (tarfile's own guessing, r:*, reports a failure on four lines)."""
    return "r:" + next((kind for kind, ends in TAR_COMPRESSION.items() if name.endswith(ends)), "")


def _check_member(archive: Path, name: str) -> None:
    parts = Path(name).parts
    if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
        raise DataError(f"{archive} holds an unsafe path '{name}'; refusing to extract outside the cache folder")


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
