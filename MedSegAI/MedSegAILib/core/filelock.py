"""An exclusive lock on a file, released by the operating system when its holder dies.

The lock is an advisory OS lock (``flock`` on POSIX, ``msvcrt.locking`` on Windows) on a lock
file, not the file's mere existence, so a lock left behind by a process that crashed is free at
once and there is no "is it stale?" guess that two waiters could both act on. Locks taken through
separate ``open`` calls exclude each other also between threads of one process.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import MedSegAIInputError

__all__ = ["exclusive_lock"]


def _try_lock(fd: int) -> bool:
    """Take the lock on ``fd`` without waiting; False when another holder has it."""
    if sys.platform == "win32":
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _is_current(fd: int, path: Path) -> bool:
    """True when ``path`` still names the file open as ``fd`` (the holder before us may have removed it)."""
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike[str], wait_s: float, busy_message: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` for the ``with`` block.

    Args:
        path: the lock file; created when missing, removed on release (POSIX).
        wait_s: how long to wait for another holder before giving up.
        busy_message: the error text when the lock is still held after ``wait_s``.

    Raises:
        MedSegAIInputError: with ``busy_message`` when the lock stays busy for ``wait_s`` seconds.
    """
    if wait_s < 0:
        raise ValueError(f"wait_s must be >= 0, got {wait_s}")
    lock = Path(path)
    deadline = time.monotonic() + wait_s
    while True:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR)
        if _try_lock(fd):
            if sys.platform == "win32" or _is_current(fd, lock):
                break
        os.close(fd)
        if time.monotonic() > deadline:
            raise MedSegAIInputError(busy_message)
        time.sleep(0.05)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode("ascii"))
        yield
    finally:
        if sys.platform != "win32":
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
        os.close(fd)
