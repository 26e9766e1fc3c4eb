"""Faults: a signal or kill -9 mid-run, a crash mid-write, a truncated checkpoint, a NaN loss.

Each is checked for what the user keeps: a checkpoint that loads right (or a clear refusal), and a
resumed run that reaches exactly the weights of an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fakes import random_dataset, train_config
from fault_job import build
from torch import Tensor

from distillery.methods.base import Method, ModelOutputs
from distillery.models import create_model
from distillery.train import (
    CheckpointError,
    NonFiniteLossError,
    Stage,
    Trainer,
    TrainingInterrupted,
    load_checkpoint,
    save_checkpoint,
)

HERE = Path(__file__).parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def uninterrupted() -> dict[str, Tensor]:
    trainer = build(None)
    trainer.fit()
    return trainer.student.state_dict()


def _same(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _wait_for_epochs(run_dir: Path, proc: subprocess.Popen, epochs: int, timeout: float = 600.0) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= epochs:
            return
        assert proc.poll() is None, f"the job ended early: {proc.communicate()}"
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("the job made no progress")


@pytest.fixture(scope="module")
def crashed(tmp_path_factory) -> dict:
    """Three subprocesses at once (to share their start-up time): a training job sent SIGTERM after
    2 epochs, one sent SIGKILL after 3 epochs, and the checkpoint writers of ckpt_writer.py."""
    root = tmp_path_factory.mktemp("crashed")
    term_dir, kill_dir, writer_dir = root / "term", root / "kill", root / "writer"
    job = [sys.executable, str(HERE / "fault_job.py")]
    term = subprocess.Popen([*job, str(term_dir), "--slow"], env=ENV, stderr=subprocess.PIPE, text=True)
    kill = subprocess.Popen([*job, str(kill_dir), "--slow"], env=ENV, stderr=subprocess.PIPE, text=True)
    writer = subprocess.Popen([sys.executable, str(HERE / "ckpt_writer.py"), str(writer_dir)], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_epochs(term_dir, term, 2)
    term.send_signal(signal.SIGTERM)
    _wait_for_epochs(kill_dir, kill, 3)
    kill.kill()
    out, err = writer.communicate(timeout=120)
    assert writer.returncode == 0, err
    return {"term": (term_dir, term.wait(60), term.communicate()[1]), "kill": (kill_dir, kill.wait(60)),
            "writer": (writer_dir, json.loads(out))}


def test_sigterm_saves_a_checkpoint_exits_cleanly_and_resume_matches(crashed, uninterrupted):
    run_dir, returncode, err = crashed["term"]
    assert returncode == 130, err
    state = load_checkpoint(run_dir / "checkpoint.pt")
    assert not state["complete"] and 2 <= state["position"]["epoch"] < 10  # stopped mid-run
    resumed = build(run_dir)
    resumed.fit(resume=True)
    assert _same(resumed.student.state_dict(), uninterrupted)
    assert [r["epoch"] for r in resumed.history] == list(range(1, 11))


def test_sigint_mid_epoch_saves_and_resume_matches(tmp_path, uninterrupted):
    interrupted = build(tmp_path, signal_at=25)  # epoch 3, step 5
    with pytest.raises(TrainingInterrupted, match="stopped by signal 2; checkpoint saved to .*--resume"):
        interrupted.fit()
    assert load_checkpoint(tmp_path / "checkpoint.pt")["position"] == {"stage": 0, "epoch": 2, "step": 5}
    resumed = build(tmp_path)
    resumed.fit(resume=True)
    assert _same(resumed.student.state_dict(), uninterrupted)


def test_resume_after_kill_9_reproduces_the_uninterrupted_run(crashed, uninterrupted):
    run_dir, returncode = crashed["kill"]
    assert returncode == -signal.SIGKILL
    assert not load_checkpoint(run_dir / "checkpoint.pt")["complete"]
    resumed = build(run_dir)
    resumed.fit(resume=True)
    assert _same(resumed.student.state_dict(), uninterrupted)
    # metrics.jsonl agrees with the checkpoint: epochs logged after it are dropped, each epoch once
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 11))


def test_kill_9_while_writing_never_leaves_a_checkpoint_that_loads_wrong(crashed):
    folder, report = crashed["writer"]
    generations = [k["generation"] for k in report["kills"]]
    assert all(k.get("consistent") for k in report["kills"] if k["generation"] is not None), report
    assert any(g is not None and g > 1 for g in generations), "the writer never completed two checkpoints"
    # the next successful write clears the temporary files of killed writers
    save_checkpoint({"generation": 0}, folder / "b" / "checkpoint.pt")
    assert [p.name for p in (folder / "b").iterdir()] == ["checkpoint.pt"]


def test_crash_between_temp_write_and_rename_keeps_the_old_checkpoint(crashed):
    _, report = crashed["writer"]
    crash = report["before_rename"]
    assert crash["killed"]
    assert len([f for f in crash["files"] if f.endswith(".tmp")]) == 1  # generation 2 only reached its temp file
    assert crash["generation"] == 1 and crash["consistent"]


def test_a_failed_write_keeps_the_old_checkpoint_and_removes_its_temp(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"generation": 1}, path)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint({"generation": 2}, path)
    assert load_checkpoint(path)["generation"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


@pytest.mark.parametrize("keep", [0, 10, 100, 0.5, -1])
def test_a_truncated_checkpoint_is_refused_clearly(tmp_path, keep):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"student": {"w": torch.randn(64, 64)}, "meta": {}}, path)
    data = path.read_bytes()
    size = int(len(data) * keep) if isinstance(keep, float) else (len(data) + keep if keep < 0 else keep)
    path.write_bytes(data[:size])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


class NaNAt(Method):
    """Cross-entropy, plus a 'kd' term that becomes NaN at the given training step (1-based)."""

    name = "nan_at"
    needs_teacher = False

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at, self.calls = at, 0

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, targets: Tensor,
                index: Tensor | None = None) -> dict[str, Tensor]:
        self.calls += 1
        ce = F.cross_entropy(student.logits, targets)
        return {"ce": ce, "kd": ce * (math.nan if self.calls == self.at else 0.0)}


def test_a_nan_loss_stops_naming_the_term_and_step_and_keeps_the_last_good_checkpoint(tmp_path):
    torch.manual_seed(0)
    student = create_model("mlp", in_channels=1, num_classes=4, input_size=8, hidden=[16])
    # 10 steps per epoch; the NaN comes at global step 14 = epoch 2, step 4
    stage = Stage(NaNAt(14), train_config(epochs=3, batch_size=16))
    trainer = Trainer(student, random_dataset(160, seed=1), random_dataset(40, seed=2), [stage], run_dir=tmp_path,
                      progress=False, echo=lambda line: None)
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit()
    message = str(info.value)
    assert "'kd'" in message and "nan" in message and "epoch 2, step 4" in message
    assert str(tmp_path / "checkpoint.pt") in message
    assert not all(torch.isfinite(p).all() for p in trainer.student.parameters())  # the bad step happened
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["position"] == {"stage": 0, "epoch": 1, "step": 0}  # end of epoch 1, the last good one
    assert all(torch.isfinite(v).all() for v in state["student"].values())
