"""Crash checkpoint writers with kill -9, for the atomic-write tests: python tests/ckpt_writer.py FOLDER

Each checkpoint holds a 4 MB tensor filled with its generation number, and that number: a loaded
file is consistent when both agree. Prints one JSON object:

- ``before_rename``: a child writes generation 1, then SIGKILLs itself after writing generation 2's
  temporary file and before the rename; we report what ``checkpoint.pt`` then holds.
- ``kills``: five times, a child writes checkpoints in a loop and is SIGKILLed after a delay; we
  report, after each kill, the generation found (None if no file yet) and whether it was consistent.

Children are forked so that torch is imported once (one thread: fork-safe).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

from distillery import fsio
from distillery.train import checkpoint

torch.set_num_threads(1)


def state(generation: int) -> dict:
    return {"generation": generation, "data": torch.full((1 << 20,), float(generation))}


def inspect(path: Path) -> dict:
    if not path.exists():
        return {"generation": None}
    try:
        loaded = checkpoint.load_checkpoint(path)
    except checkpoint.CheckpointError as err:
        return {"error": str(err)}
    return {"generation": loaded["generation"],
            "consistent": bool(torch.equal(loaded["data"], torch.full((1 << 20,), float(loaded["generation"]))))}


def die_before_rename(path: Path) -> None:
    checkpoint.save_checkpoint(state(1), path)
    fsio.os.replace = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.save_checkpoint(state(2), path)
    os._exit(1)  # not reached


def write_forever(path: Path) -> None:
    generation = 0
    while True:
        generation += 1
        checkpoint.save_checkpoint(state(generation), path)


def in_child(fn, path: Path) -> int:
    pid = os.fork()
    if pid == 0:
        fn(path)
        os._exit(1)
    return pid


folder = Path(sys.argv[1])
report: dict = {}
pid = in_child(die_before_rename, folder / "a" / "checkpoint.pt")
_, status = os.waitpid(pid, 0)
report["before_rename"] = {**inspect(folder / "a" / "checkpoint.pt"), "killed": os.WTERMSIG(status) == signal.SIGKILL,
                           "files": sorted(p.name for p in (folder / "a").iterdir())}
report["kills"] = []
for delay in (0.03, 0.11, 0.19, 0.37, 0.53):
    pid = in_child(write_forever, folder / "b" / "checkpoint.pt")
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    report["kills"].append(inspect(folder / "b" / "checkpoint.pt"))
print(json.dumps(report))
