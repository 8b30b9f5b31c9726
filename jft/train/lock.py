"""The workdir lock: one writer per run folder, taken before anything is written there.

``jft train`` holds ``<workdir>/.jft.lock`` (``.jft.lock.<i>`` for process ``i > 0``
of a multi-process run, so that each process of one job locks its own file and a
second job fails on every process) for as long as it runs. The lock is an
``fcntl.flock`` on that open file, not the file's existence: the kernel drops it
when the process ends in any way, SIGKILL and a machine reboot included, so a lock
left by a killed run is simply taken by the next one; there is no stale-lock guess
on pids. The file holds the holder's pid, host and start time, for the message that
a second writer gets at once. Taking the lock is also the writability probe of the
workdir: a read-only folder, a file in the way or a full disk fails here, before
anything is compiled or prepared.

On NFS, ``flock`` is emulated with POSIX byte-range locks (Linux 2.6.12 and
later), which also work across machines.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time

from jft.errors import JftError

__all__ = ["WorkdirError", "WorkdirLock", "writable_dir"]

LOCK_NAME = ".jft.lock"


class WorkdirError(JftError, OSError):
    """The workdir is in use by another run, or cannot be written; the message is one line."""


def _why(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "the disk is full"
    if e.errno == errno.EROFS:
        return "it is on a read-only file system"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        return "a file is in the way"
    return e.strerror or type(e).__name__


def writable_dir(path: str, what: str) -> None:
    """Creates ``path`` (and parents) if needed and checks that files can be written in it.

    Raises:
      WorkdirError: one line naming ``what`` (e.g. ``"workdir"``), the path and why.
    """
    try:
        existed = os.path.isdir(path)
        os.makedirs(path, exist_ok=True)
        before = os.stat(path)
        probe = os.path.join(path, f".jft-probe-{os.getpid()}")
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, b"jft")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
        if existed:  # the probe leaves no trace: a folder's times are as they were
            os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    except OSError as e:
        raise WorkdirError(
            f"{what} {path} is not writable ({_why(e)}): choose another --workdir or free it"
        ) from None


class WorkdirLock:
    """Holds the lock on a workdir while in a ``with`` block.

    Args:
      workdir: the run's folder; created if missing.
      process_index: this process's index (0 on one host).

    Raises (on entering):
      WorkdirError: another live process holds the lock (the message names its
        pid, host and start time), or the workdir cannot be written.
    """

    def __init__(self, workdir: str | os.PathLike, process_index: int = 0):
        self.workdir = os.path.abspath(os.fspath(workdir))
        name = LOCK_NAME if process_index == 0 else f"{LOCK_NAME}.{process_index}"
        self.path = os.path.join(self.workdir, name)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Takes the lock or raises :class:`WorkdirError` at once (never waits)."""
        try:
            os.makedirs(self.workdir, exist_ok=True)
        except OSError as e:
            raise WorkdirError(
                f"workdir {self.workdir} cannot be created ({_why(e)}): choose another --workdir"
            ) from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise WorkdirError(
                    f"workdir {self.workdir} is not writable ({_why(e)}): "
                    "choose another --workdir or free it"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.pread(fd, 512, 0).decode(errors="replace").strip()
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise WorkdirError(
                        f"workdir {self.workdir}: cannot lock {self.path} ({_why(e)})"
                    ) from None
                raise WorkdirError(
                    f"workdir {self.workdir} is in use by another jft run "
                    f"({holder or 'holder unknown'}): wait for it to end, stop it, "
                    "or choose another --workdir"
                ) from None
            # The previous holder may have removed the file between our open and our
            # lock: then we hold a lock on a file nobody else will see. Start again.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
        info = f"pid {os.getpid()} on host {socket.gethostname()}, started {stamp}\n"
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, info.encode(), 0)
            os.fsync(fd)
        except OSError as e:
            self._fd = fd
            self.release()
            raise WorkdirError(
                f"workdir {self.workdir} is not writable ({_why(e)}): "
                "choose another --workdir or free it"
            ) from None
        self._fd = fd

    def release(self) -> None:
        """Removes the lock file and drops the lock; safe to call twice."""
        if self._fd is None:
            return
        # Unlink while still holding the lock: a process that opened the old file
        # sees, once it gets the lock, that the path no longer names it (above).
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
