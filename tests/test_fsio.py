"""fsio: atomic writes that keep the old file on failure and follow no symlink, the clean-up of
killed writers' temporary files, and folder locks (in one process; see test_concurrency for two)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
import tempfile
import threading
import time
from pathlib import Path

import pytest

from distillery.fsio import (
    FolderBusyError,
    FolderLock,
    StaleLockWarning,
    WriteError,
    atomic_write,
    remove_stale_temps,
)


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("content", [b"\x00bytes\xff", "text é", bytearray(b"array")])
def test_atomic_write_writes_bytes_and_text(tmp_path, content):
    path = tmp_path / "out.bin"
    atomic_write(path, content)
    expected = content.encode() if isinstance(content, str) else bytes(content)
    assert path.read_bytes() == expected
    assert _names(tmp_path) == ["out.bin"]


def test_atomic_write_with_a_write_function_replaces_and_keeps_the_mode(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    os.chmod(path, 0o640)
    atomic_write(path, lambda f: (f.write(b"new "), f.write(b"content")))
    assert path.read_bytes() == b"new content"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_a_new_file_gets_the_mode_open_would_give(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "new.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new.txt").stat().st_mode) == 0o640  # 0666 less the umask, not mkstemp's 0600


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT])
def test_a_failing_write_raises_write_error_keeps_the_old_file_and_leaves_no_temp(tmp_path, code):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"generation 1")

    def fails_midway(f):
        f.write(b"half of generation 2")
        raise OSError(code, os.strerror(code))

    with pytest.raises(WriteError) as info:
        atomic_write(path, fails_midway, what="checkpoint")
    err = info.value
    assert isinstance(err, OSError) and err.errno == code and err.filename == str(path)
    message = str(err)
    assert str(path) in message and os.strerror(code) in message
    assert "the previous checkpoint there is unchanged" in message
    assert path.read_bytes() == b"generation 1"
    assert _names(tmp_path) == ["checkpoint.pt"]


def test_a_failure_with_nothing_there_before_says_nothing_was_written(tmp_path):
    def full(f):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(WriteError, match=r"No space left on device \(the disk is full.*; nothing was written"):
        atomic_write(tmp_path / "new.bin", full)
    assert _names(tmp_path) == []


def test_other_exceptions_pass_through_and_leave_no_temp(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("{}")

    def buggy(f):
        f.write(b"[")
        raise KeyError("not an OSError")

    with pytest.raises(KeyError):
        atomic_write(path, buggy)
    assert path.read_text() == "{}" and _names(tmp_path) == ["a.json"]


def test_a_path_through_a_file_and_a_name_too_long_are_write_errors(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(WriteError, match="a part of the path is a file, not a folder") as info:
        atomic_write(tmp_path / "file" / "x.bin", b"x")
    assert info.value.errno == errno.ENOTDIR
    with pytest.raises(WriteError, match="too long") as info:
        atomic_write(tmp_path / ("n" * 300), b"x")
    assert info.value.errno == errno.ENAMETOOLONG
    assert _names(tmp_path) == ["file"]


def test_make_parents_creates_missing_folders(tmp_path):
    atomic_write(tmp_path / "a" / "b" / "c.txt", "deep", make_parents=True)
    assert (tmp_path / "a" / "b" / "c.txt").read_text() == "deep"
    with pytest.raises(WriteError, match="the folder does not exist"):
        atomic_write(tmp_path / "missing" / "c.txt", "x")


def test_a_symlink_at_the_destination_is_replaced_not_followed(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    link = tmp_path / "out.txt"
    link.symlink_to(target)
    atomic_write(link, "new")
    assert target.read_text() == "keep me"
    assert not link.is_symlink() and link.read_text() == "new"


def test_a_symlink_planted_at_the_next_temporary_name_is_not_followed(tmp_path, monkeypatch):
    """Even a guessed temporary name is safe: it is created exclusively, so a planted link makes
    the writer take another name instead of writing through the link."""
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    guesses = iter(["guessed", "second"])
    monkeypatch.setattr(tempfile, "_get_candidate_names", lambda: guesses)
    (tmp_path / ".out.bin.guessed.tmp").symlink_to(target)
    atomic_write(tmp_path / "out.bin", b"payload")
    assert target.read_text() == "keep me"
    assert (tmp_path / "out.bin").read_bytes() == b"payload"
    assert (tmp_path / ".out.bin.guessed.tmp").is_symlink()


def test_remove_stale_temps_removes_abandoned_temps_only(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"ckpt")
    abandoned = tmp_path / ".checkpoint.pt.abc123.tmp"
    abandoned.write_bytes(b"half")
    live = tmp_path / ".checkpoint.pt.live00.tmp"
    live.write_bytes(b"being written")
    planted = tmp_path / ".checkpoint.pt.link00.tmp"
    planted.symlink_to(path)
    other = tmp_path / ".other.pt.abc123.tmp"
    other.write_bytes(b"another file's temp")
    with open(live, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # as a writer at work holds it
        assert remove_stale_temps(path) == [abandoned]
    assert _names(tmp_path) == sorted([".checkpoint.pt.link00.tmp", ".checkpoint.pt.live00.tmp", ".other.pt.abc123.tmp",
                                       "checkpoint.pt"])
    assert path.read_bytes() == b"ckpt"


# ---------------------------------------------------------------- folder locks in one process


def test_a_lock_records_its_holder_and_is_removed_on_release(tmp_path):
    folder = tmp_path / "run"
    with FolderLock(folder, "training student") as lock:
        assert lock.held
        holder = json.loads((folder / ".lock").read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert holder["purpose"] == "training student" and holder["started"]
    assert not lock.held and _names(folder) == []


def test_a_second_lock_on_a_held_folder_is_refused_naming_the_holder(tmp_path):
    with FolderLock(tmp_path, "training"):
        with pytest.raises(FolderBusyError) as info:
            FolderLock(tmp_path, "resume").acquire()
    message = str(info.value)
    assert f"pid {os.getpid()} on host {socket.gethostname()}, training" in message
    assert "wait for it to finish, or use another folder" in message and "--overwrite" not in message
    with FolderLock(tmp_path, "after"):  # free again
        pass


def test_a_waiting_lock_gets_the_folder_when_the_holder_releases_it(tmp_path):
    first = FolderLock(tmp_path, "first")
    first.acquire()
    releaser = threading.Timer(0.2, first.release)
    releaser.start()
    started = time.monotonic()
    with FolderLock(tmp_path, "second", wait_s=10):
        assert time.monotonic() - started >= 0.15
    releaser.join()
    with pytest.raises(FolderBusyError, match=r"waited 0.1 s"):
        with FolderLock(tmp_path, "holder"):
            FolderLock(tmp_path, "impatient", wait_s=0.1).acquire()


def test_a_lock_file_left_by_a_dead_process_is_taken_over_with_a_warning(tmp_path):
    dead = {"pid": 2**22 + 12345, "host": socket.gethostname(), "purpose": "training", "started": "2020-01-01T00:00:00"}
    (tmp_path / ".lock").write_text(json.dumps(dead))  # no process holds it: its holder was killed
    with pytest.warns(StaleLockWarning, match=f"pid {dead['pid']} on host .*which no longer holds it"):
        with FolderLock(tmp_path, "resume"):
            assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert _names(tmp_path) == []


def test_a_symlink_planted_as_the_lock_file_is_refused_and_not_followed(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / ".lock").symlink_to(target)
    with pytest.raises(WriteError, match="symbolic link"):
        FolderLock(folder, "training").acquire()
    assert target.read_text() == "keep me"


def test_a_full_disk_when_taking_a_lock_is_a_write_error_and_leaves_no_lock_file(tmp_path, monkeypatch):
    def disk_full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", disk_full)
    with pytest.raises(WriteError, match=f"cannot write the lock file {tmp_path / '.lock'}: No space left"):
        FolderLock(tmp_path, "training").acquire()
    monkeypatch.undo()
    assert _names(tmp_path) == []
