"""Two real processes on one folder: cache writers and readers never destroy each other's entries,
a folder lock keeps a second writer out until the first is killed, and nothing planted at a
predictable temporary name is followed.

Processes are forked from the test (torch is imported once); the tensors they touch are small, so
no parallel region runs in a forked child.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import time
from pathlib import Path

import pytest
import torch

from distillery.cache import TeacherCache
from distillery.fsio import FolderBusyError, FolderLock, StaleLockWarning, atomic_write
from distillery.train import save_checkpoint

CTX = multiprocessing.get_context("fork")
ROWS = 64


def generation(g: int) -> torch.Tensor:
    return torch.full((ROWS, 10), float(g))


def _get_or_compute(root: Path, go, results) -> None:
    """Child: wait for the start signal, then get the entry, computing it (slowly) if needed."""
    calls = 0

    def compute() -> torch.Tensor:
        nonlocal calls
        calls += 1
        time.sleep(0.3)  # long enough that the other process arrives while this one computes
        return generation(7)

    go.wait(10)
    got = TeacherCache(root, "key").get_or_compute("logits", compute, count=ROWS)
    results.put((calls, bool(torch.equal(got, generation(7)))))


def test_two_writers_of_one_entry_both_finish_with_a_readable_entry(tmp_path):
    go, results = CTX.Event(), CTX.Queue()
    workers = [CTX.Process(target=_get_or_compute, args=(tmp_path, go, results)) for _ in range(2)]
    for worker in workers:
        worker.start()
    go.set()
    outcomes = [results.get(timeout=30) for _ in workers]
    for worker in workers:
        worker.join(10)
        assert worker.exitcode == 0
    assert all(equal for _, equal in outcomes), outcomes
    assert sum(calls for calls, _ in outcomes) == 1  # the second waited for the first and read its entry
    assert torch.equal(TeacherCache(tmp_path, "key").load("logits", ROWS), generation(7))
    assert sorted(p.name for p in (tmp_path / "key").iterdir()) == ["logits.bin", "logits.json"]


def _rewrite(root: Path, rounds: int) -> None:
    cache = TeacherCache(root, "key")
    for g in range(1, rounds + 1):
        cache.save("logits", generation(g))


def test_a_reader_never_finds_the_entry_gone_while_a_writer_rewrites_it(tmp_path):
    cache = TeacherCache(tmp_path, "key")
    cache.save("logits", generation(0))
    writer = CTX.Process(target=_rewrite, args=(tmp_path, 20))
    writer.start()
    seen = []
    while writer.is_alive() or not seen:
        loaded = cache.load("logits", ROWS)
        assert loaded is not None, f"the entry vanished after generations {seen[-3:]}"
        g = loaded[0, 0].item()
        assert torch.equal(loaded, generation(int(g)))  # one generation throughout, never a mix
        seen.append(int(g))
    writer.join(10)
    assert writer.exitcode == 0
    assert seen == sorted(seen)  # never an older one after a newer one
    assert torch.equal(cache.load("logits", ROWS), generation(20))


def _hold_lock(folder: Path, ready) -> None:
    lock = FolderLock(folder, "training student")
    lock.acquire()
    ready.set()
    time.sleep(60)  # until killed


def test_a_held_folder_is_refused_to_a_second_process_and_taken_over_after_kill_9(tmp_path):
    ready = CTX.Event()
    holder = CTX.Process(target=_hold_lock, args=(tmp_path, ready))
    holder.start()
    try:
        assert ready.wait(10)
        with pytest.raises(FolderBusyError) as info:
            FolderLock(tmp_path, "train --resume").acquire()
        message = str(info.value)
        assert f"another process (pid {holder.pid} on host {socket.gethostname()}, training student" in message
        assert "--overwrite" not in message
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(10)
    assert holder.exitcode == -signal.SIGKILL
    with pytest.warns(StaleLockWarning, match=f"pid {holder.pid} .*no longer holds it"):
        with FolderLock(tmp_path, "train --resume") as lock:
            assert lock.held
    assert not (tmp_path / ".lock").exists()


def _write_checkpoints(path: Path, go) -> None:
    go.wait(10)
    for g in range(5):
        save_checkpoint({"generation": g, "w": torch.zeros(16)}, path)


def test_a_writer_never_deletes_the_temporary_file_of_another_live_writer(tmp_path):
    """Two processes saving one checkpoint path (what a second --resume did): each one's clean-up of
    killed writers' temporary files spares the other's, so every rename succeeds."""
    go = CTX.Event()
    writers = [CTX.Process(target=_write_checkpoints, args=(tmp_path / "checkpoint.pt", go)) for _ in range(2)]
    for writer in writers:
        writer.start()
    go.set()
    for writer in writers:
        writer.join(30)
        assert writer.exitcode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def _predictable_names(folder: Path, name: str) -> list[Path]:
    """Temporary names a writer could be expected to use: with this pid and the next few, and fixed ones."""
    pids = range(os.getpid(), os.getpid() + 64)
    return [folder / f".{name}.{pid}.tmp" for pid in pids] + [folder / f"{name}.tmp", folder / f".{name}.tmp",
                                                              folder / f"{name}~", folder / f".{name}.swp"]


def test_symlinks_planted_at_predictable_temporary_names_are_not_followed(tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    cache = TeacherCache(tmp_path / "shared", "key")
    cache.dir.mkdir(parents=True)
    planted = [link for name in ("logits.bin", "logits.json") for link in _predictable_names(cache.dir, name)]
    planted += _predictable_names(tmp_path, "out.bin")
    for link in planted:
        link.symlink_to(precious)
    child = CTX.Process(target=_rewrite, args=(tmp_path / "shared", 3))  # other pids than ours, too
    child.start()
    child.join(30)
    assert child.exitcode == 0
    cache.save("logits", generation(4))
    atomic_write(tmp_path / "out.bin", b"data")
    assert precious.read_text() == "keep me"
    assert all(link.is_symlink() and link.resolve() == precious for link in planted)
    assert torch.equal(cache.load("logits", ROWS), generation(4))


def _hold_run_folder(folder: str, ready, release) -> None:
    from distillery.fsio import FolderLock

    with FolderLock(folder, "training student_alone"):
        ready.set()
        release.wait(20)


def test_a_second_process_on_a_training_run_folder_is_refused_naming_the_first(fake_root, tmp_path, capsys) -> None:
    import multiprocessing as mp

    from test_pipeline import tiny_args

    from distillery.cli import main

    out = tmp_path / "runs"
    folder = out / "tiny" / "student_alone"
    folder.mkdir(parents=True)
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_run_folder, args=(str(folder), ready, release))
    holder.start()
    try:
        assert ready.wait(10)
        assert main(["train", "--role", "student", *tiny_args(fake_root, out)]) == 2
        err = capsys.readouterr().err
        assert "another process" in err and str(holder.pid) in err and "--overwrite" not in err
    finally:
        release.set()
        holder.join(10)
    assert main(["train", "--role", "student", *tiny_args(fake_root, out)]) == 0  # free again: it trains
