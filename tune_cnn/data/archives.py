"""Archives of a data set (.tar.gz, .tgz, .tar.bz2, .tar.xz, .tar, .zip), extracted once into the cache, keyed by
their content; members may not leave that folder, nor be links, nor add up to more than the limits below."""
from __future__ import annotations

import hashlib
import shutil
import tarfile
import zipfile
from pathlib import Path

from filelock import FileLock

from tune_cnn.errors import DataError, byte_size

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar", ".zip")
ARCHIVES_TEXT = "/".join(ARCHIVE_SUFFIXES)
TAR_COMPRESSION = {"gz": (".tar.gz", ".tgz"), "bz2": (".tar.bz2",), "xz": (".tar.xz",)}
# Image data sets compress 1-10x (CIFAR-10's python batches 1.1x); a zip bomb, 1000x and more.
MAX_EXPANSION = 200  # extracted bytes per byte of archive
MAX_EXTRACTED = 64 * 2**30  # bytes in all


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
                _check_size(archive, sum(info.file_size for info in z.infolist()), target)
                z.extractall(target)
        else:
            with tarfile.open(archive, _tar_mode(archive.name.lower())) as t:
                members = t.getmembers()
                for member in members:
                    _check_member(archive, member.name)
                    if member.issym() or member.islnk():
                        raise DataError(f"{archive} holds a link ({member.name}); archives may hold only files and folders")
                _check_size(archive, sum(member.size for member in members), target)
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


def _check_size(archive: Path, extracted: int, target: Path) -> None:
    """Refuse, before anything is written, an archive whose members add up to more than the limits or the disk's
    free space (the sizes its headers give; a zip member larger than its header says fails its checksum)."""
    limit = min(MAX_EXTRACTED, MAX_EXPANSION * archive.stat().st_size)
    if extracted > limit:
        raise DataError(f"{archive} would extract to {byte_size(extracted)}, over tune_cnn's limit of {byte_size(limit)} for it ({MAX_EXPANSION}x "
                        f"the archive's size, at most {byte_size(MAX_EXTRACTED)}); it may be an archive bomb: unpack it yourself and pass the folder")
    free = shutil.disk_usage(target).free
    if extracted > free:
        raise DataError(f"{archive} would extract to {byte_size(extracted)}, and the cache's disk has {byte_size(free)} free; "
                        "free some space or set TUNE_CNN_CACHE to a folder on a larger disk")


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
