"""Safe file writing and folder locking, for files that other processes (or other users) may touch.

:func:`atomic_write` replaces a file all at once: readers see the old file or the new one, never a
part of either, and a failure (a full disk, a read-only folder) leaves the old file as it was. The
bytes go to a temporary file with an unpredictable name in the destination folder, created
exclusively (``O_EXCL``, mode 0600, never through a symlink), so nothing planted in a shared folder
can redirect the write; it is flushed to disk and renamed over the destination. A rename replaces
a symlink at the destination itself, never the file the symlink points to.

A writer holds an advisory lock (``flock``) on its temporary file until the rename, so
:func:`remove_stale_temps` can tell the leftovers of a killed writer (nobody holds their lock: the
kernel drops it when a process dies, even by kill -9) from the file of a writer still at work.

:class:`FolderLock` gives a folder one writer at a time: a lock file (``.lock``) that holds the
writer's pid, host, purpose and start time, locked with ``flock`` for as long as the writer runs.
A second writer is refused with :class:`FolderBusyError` naming the first; a lock left behind by a
process that died is taken over with a :class:`StaleLockWarning`.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import json
import os
import socket
import stat
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

Content = bytes | bytearray | memoryview | str | Callable[[BinaryIO], object]

TEMP_SUFFIX = ".tmp"
LOCK_NAME = ".lock"
_POLL_S = 0.05
_NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)

_HINTS = {
    errno.ENOSPC: "the disk is full: free some space or write elsewhere",
    errno.EDQUOT: "the disk quota is used up: free some space or write elsewhere",
    errno.EACCES: "no permission to write there",
    errno.EPERM: "no permission to write there",
    errno.EROFS: "the file system is read-only",
    errno.ENAMETOOLONG: "the file name is too long for the file system",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.ENOENT: "the folder does not exist",
    errno.ELOOP: "a part of the path is a symbolic link that is not followed",
}


class WriteError(OSError):
    """A file could not be written; what was at its path before is unchanged and no temporary file is left.

    ``errno`` is the cause's, ``filename`` the path, and the message says both in words.
    """

    def __str__(self) -> str:
        return str(self.strerror)


def write_error(path: Path, cause: OSError, existed: bool, what: str = "") -> WriteError:
    """A :class:`WriteError` for ``path`` (a ``what``: "checkpoint"...) that says why (``cause``) and what was kept."""
    hint = _HINTS.get(cause.errno or 0)
    kept = f"the previous {what or 'file'} there is unchanged" if existed else "nothing was written"
    reason = cause.strerror or str(cause)
    target = f"the {what} {path}" if what else str(path)
    return WriteError(cause.errno, f"cannot write {target}: {reason}{f' ({hint})' if hint else ''}; {kept}", str(path))


def atomic_write(path: str | Path, content: Content, *, make_parents: bool = False, what: str = "") -> None:
    """Replace ``path`` by ``content`` (bytes, text as UTF-8, or a function writing to a binary file).

    See the module docstring for how. The new file keeps the mode of the file it replaces, or gets
    the mode a plain ``open`` would give (0666 less the umask). ``make_parents`` creates missing
    folders; ``what`` ("checkpoint", "cache entry") names the file in errors. Raises
    :class:`WriteError` on any ``OSError`` (disk full, permission, name too long...); other
    exceptions of ``content`` pass through; either way the old file and the folder are as they were.
    """
    path = Path(path)
    existed = os.path.lexists(path)
    tmp: str | None = None
    try:
        if make_parents:
            path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _locked_temp(path)
        with os.fdopen(fd, "wb") as f:  # closed (its lock dropped) only after the rename
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), _final_mode(path))
            os.replace(tmp, path)
        tmp = None
    except OSError as err:
        raise write_error(path, err, existed, what) from err
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    _fsync_folder(path.parent)


def _locked_temp(path: Path) -> tuple[int, str]:
    """A new temporary file next to ``path``, ``flock``-ed to say "a writer is at work" (fd, name).

    A clean-up may take and delete the file in the instant between its creation and our lock; we
    then see that the name no longer leads to our file, and take another.
    """
    while True:
        fd, name = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=TEMP_SUFFIX, dir=path.parent)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a clean-up holds it and is deleting it
            os.close(fd)
            continue
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            return fd, name  # no flock on this file system: clean-ups cannot tell, and keep every temp
        if _is_same_file(fd, Path(name)):
            return fd, name
        os.close(fd)


def _temp_prefix(path: Path) -> str:
    # Cut long names so that prefix + random part + suffix stays under the file system's name limit.
    return f".{path.name[:100]}."


def _final_mode(path: Path) -> int:
    try:
        existing = os.lstat(path)
    except OSError:
        existing = None
    if existing is not None and stat.S_ISREG(existing.st_mode):
        return stat.S_IMODE(existing.st_mode)
    return 0o666 & ~_umask()


def _umask() -> int:
    try:
        with open("/proc/self/status") as status:  # Linux: read it without changing it
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable; a best effort (some file systems refuse it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temps(path: str | Path) -> list[Path]:
    """Delete the temporary files of writers of ``path`` that died mid-write; return what was deleted.

    A temporary file whose writer still runs is locked by it and kept, as is anything that is not a
    regular file (nothing planted there is followed or touched).
    """
    path = Path(path)
    removed = []
    for candidate in path.parent.glob(glob.escape(_temp_prefix(path)) + "*" + TEMP_SUFFIX):
        if _unlink_if_abandoned(candidate):
            removed.append(candidate)
    return removed


def _unlink_if_abandoned(candidate: Path) -> bool:
    try:
        fd = os.open(candidate, os.O_RDONLY | _NO_FOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:  # gone already, a symlink, or unreadable: not ours to remove
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # its writer is alive and holds it
            return False
        candidate.unlink(missing_ok=True)
        return True
    finally:
        os.close(fd)


# ---------------------------------------------------------------- folder locks


class FolderBusyError(RuntimeError):
    """Another live process holds the folder's lock; the message names it."""


class StaleLockWarning(UserWarning):
    """A lock left by a process that no longer runs (killed, or its machine rebooted) was taken over."""


@dataclass(frozen=True)
class LockHolder:
    """Who holds a folder lock, as written in its lock file."""

    pid: int
    host: str
    purpose: str
    started: str  # ISO 8601, UTC

    @classmethod
    def of_this_process(cls, purpose: str) -> LockHolder:
        return cls(os.getpid(), socket.gethostname(), purpose, datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @classmethod
    def parse(cls, text: bytes) -> LockHolder | None:
        """The holder written in a lock file, or None if it is empty or unreadable."""
        try:
            data = json.loads(text)
            return cls(int(data["pid"]), str(data["host"]), str(data["purpose"]), str(data["started"]))
        except (ValueError, KeyError, TypeError):
            return None

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host}, {self.purpose}, since {self.started}"

    def is_this_process(self) -> bool:
        return self.pid == os.getpid() and self.host == socket.gethostname()

    def may_be_alive(self) -> bool:
        """False only when it is known dead: a process of this host whose pid no longer exists."""
        if self.host != socket.gethostname():
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # exists, run by another user
            return True
        return True


class FolderLock:
    """One writer at a time in ``folder``: ``with FolderLock(run_dir, "training"): ...``.

    The lock is the file ``folder/name`` (created if needed, with the folder), ``flock``-ed for as
    long as it is held and deleted on release. ``wait_s`` > 0 waits that long for a busy lock
    before raising :class:`FolderBusyError`. The lock is advisory: it keeps out processes that
    take it too, nothing else. It is held by this process only (a forked child never releases it).
    """

    def __init__(self, folder: str | Path, purpose: str, *, name: str = LOCK_NAME, wait_s: float = 0.0) -> None:
        self.folder = Path(folder)
        self.path = self.folder / name
        self.purpose = purpose
        self.wait_s = wait_s
        self._fd: int | None = None
        self._owner = 0

    @property
    def held(self) -> bool:
        return self._fd is not None and self._owner == os.getpid()

    def acquire(self) -> None:
        """Take the lock, waiting up to ``wait_s``; :class:`FolderBusyError` if another process keeps it."""
        if self.held:
            raise FolderBusyError(f"{self.folder}: this lock is already held by this process (taken twice)")
        deadline = time.monotonic() + self.wait_s
        while True:
            holder = self._try_acquire()
            if self.held:
                return
            if time.monotonic() >= deadline:
                raise FolderBusyError(self._busy_message(holder))
            time.sleep(_POLL_S)

    def release(self) -> None:
        """Delete the lock file (if it is still ours) and drop the lock; a no-op if not held."""
        if not self.held:
            return
        fd, self._fd = self._fd, None
        try:
            if _is_same_file(fd, self.path):
                self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _try_acquire(self) -> LockHolder | None:
        """Take the lock if it is free (then ``held``); else return who holds it (None: not yet written)."""
        while True:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | _NO_FOLLOW | os.O_CLOEXEC, 0o644)
            except OSError as err:
                raise write_error(self.path, err, existed=os.path.lexists(self.path)) from err
            try:
                if not _try_flock(fd):
                    return LockHolder.parse(os.pread(fd, 4096, 0))
                if _is_same_file(fd, self.path):
                    self._take_over(fd)
                    self._fd, self._owner, fd = fd, os.getpid(), None
                    return None
                # else: its holder released it (deleted the file) between our open and our lock: again
            finally:
                if fd is not None:
                    os.close(fd)

    def _take_over(self, fd: int) -> None:
        previous = LockHolder.parse(os.pread(fd, 4096, 0))
        if previous is not None:
            warnings.warn(StaleLockWarning(
                f"{self.folder}: took over the lock left by {previous.describe()}, which no longer holds it "
                "(it was killed or crashed); its unfinished files there may be incomplete"), stacklevel=4)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(asdict(LockHolder.of_this_process(self.purpose))).encode(), 0)
        except OSError as err:  # a full disk: leave no half-written lock behind
            self.path.unlink(missing_ok=True)
            raise write_error(self.path, err, existed=False, what="lock file") from err

    def _busy_message(self, holder: LockHolder | None) -> str:
        waited = f" (waited {self.wait_s:g} s)" if self.wait_s > 0 else ""
        if holder is None:
            who = "another process (it has not written its details yet)"
        elif holder.is_this_process():
            who = f"this same process ({holder.describe()}): it is already in use here"
        else:
            who = f"another process ({holder.describe()})"
        return (f"{self.folder} is in use by {who}{waited}. Two processes writing the same files would damage "
                f"each other's; wait for it to finish, or use another folder. If that process is certainly gone "
                f"(on another machine, or restarted), delete {self.path}.")


def _try_flock(fd: int) -> bool:
    """Lock ``fd`` exclusively without waiting; False if another open file holds it.

    Where the file system has no ``flock`` (some network mounts) this returns True and the caller
    falls back on the pid written in the lock file.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            return _pid_says_free(fd)
        raise
    return True


def _pid_says_free(fd: int) -> bool:
    holder = LockHolder.parse(os.pread(fd, 4096, 0))
    return holder is None or not holder.may_be_alive()


def _is_same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.lstat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (mine.st_dev, mine.st_ino)


@contextmanager
def staged_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; on a normal exit move it onto ``path``.

    For writers that need a path rather than a file object (ONNX, safetensors).

    The caller writes the temporary file and verifies it inside the block. If the block raises (a
    failed verification), the temporary file is deleted and ``path`` keeps whatever it held before:
    a file at ``path`` is always a complete, verified artefact. The move is ``os.replace`` (atomic
    on one file system), after an fsync of the file's contents.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, _final_mode(path))
        # The mode any new file gets here (0o666 less the umask); some writers (safetensors) replace
        # the file with an owner-only one, so it is restored before the move.
        mode = tmp.stat().st_mode & 0o777
        yield tmp
        os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
