"""Crash-safe file operations, one way for the whole project: fsync of files and directories, atomic
writes (temp file, fsync, rename, directory fsync) of bytes, JSON and copies, and an advisory lock."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from pocketfleet.faults import fault_point


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file under `root`, then every directory bottom-up, then `root` itself."""
    root = Path(root)
    dirs = []
    for dirpath, _dirnames, filenames in os.walk(root):
        dirs.append(dirpath)
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for d in reversed(dirs):
        fsync_dir(d)


@contextlib.contextmanager
def atomic_file(
    path: str | Path, fault: str = "", mode: int | None = None, owner: tuple[int, int] | None = None
) -> Iterator[BinaryIO]:
    """A binary file that becomes `path` only when the block ends without error: a unique temp file
    beside it, fsync, os.replace, fsync of the directory. On an error the temp file is removed.

    `fault` names the crash-test points `{fault}.after_tmp` (temp file complete, not yet renamed) and
    `{fault}.after_replace` (renamed, directory not yet fsynced); see pocketfleet.faults. The file is
    created 0600 (mkstemp) unless `mode` says otherwise; `owner` (uid, gid) chowns it before the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            if mode is not None:
                os.fchmod(fh.fileno(), mode)
            if owner is not None:
                os.fchown(fh.fileno(), *owner)
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        if fault:
            fault_point(f"{fault}.after_tmp")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if fault:
        fault_point(f"{fault}.after_replace")
    fsync_dir(path.parent)


def atomic_write_bytes(
    path: str | Path, data: bytes, fault: str = "", mode: int | None = None, owner: tuple[int, int] | None = None
) -> None:
    """Write `data` to `path` crash-safely: readers see the old bytes or the new ones, never half."""
    with atomic_file(path, fault, mode, owner) as fh:
        fh.write(data)


def atomic_write_json(path: str | Path, data: Any, fault: str = "") -> None:
    """`data` as indented, key-sorted JSON, written like atomic_write_bytes."""
    atomic_write_bytes(path, json.dumps(data, indent=2, sort_keys=True).encode(), fault)


def atomic_copy(src: str | Path, dst: str | Path, chunk: int = 1 << 20) -> None:
    """Copy `src` to `dst` crash-safely (streamed, fsynced, renamed into place)."""
    with open(src, "rb") as fin, atomic_file(dst) as fout:
        while block := fin.read(chunk):
            fout.write(block)


class FileLock:
    """An exclusive flock on a file (released by the kernel if the holder dies, even by SIGKILL)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def __enter__(self) -> FileLock:
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
