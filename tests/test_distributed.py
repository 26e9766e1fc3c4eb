"""DDP on 2 CPU processes (gloo, 127.0.0.1): identical weights on both ranks, the same result as one
process with the same global batch, and a coordinated stop + resume.

The model is an MLP without dropout and there is no augmentation, so one process and two differ
only in float summation order (per-rank gradients are averaged): tolerance 1e-5.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import signal
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from fakes import counting, random_dataset, train_config, write_fake_fmnist
from torch import Tensor, nn

from distillery.cli import main
from distillery.methods import Teacher, create_method
from distillery.methods.base import Method, ModelOutputs
from distillery.models import create_model
from distillery.train import NonFiniteLossError, Stage, Trainer, TrainingInterrupted
from distillery.train import distributed as ddist
from distillery.train.checkpoint import load_checkpoint

TOLERANCE = 1e-5
WORLD = 2


class Probe(Method):
    """A method with a learnable part (a linear read-out of the student's hidden1 features, like a
    FitNets regressor) that leaves the student's classifier out of the loss: exercises DDP on
    method parameters and on unused student parameters. Optionally sends SIGTERM to its own
    process at a given training step."""

    name = "probe"
    needs_teacher = False

    def __init__(self, signal_at: int | None = None, nan_at: int | None = None) -> None:
        super().__init__()
        self.student_layers = ("hidden1",)
        self.readout = nn.Linear(16, 4)
        self.signal_at, self.nan_at = signal_at, nan_at
        self.calls = 0

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, targets: Tensor,
                index: Tensor | None = None) -> dict[str, Tensor]:
        self.calls += 1
        if self.calls == self.signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        loss = F.cross_entropy(self.readout(student.features["hidden1"]), targets)
        return {"probe_ce": loss * math.inf if self.calls == self.nan_at else loss}


def make_trainer(run_dir: Path, signal_at: int | None = None, dist: ddist.DistContext | None = None,
                 nan_at: int | None = None) -> Trainer:
    torch.manual_seed(0)
    student = create_model("mlp", in_channels=1, num_classes=4, input_size=8, hidden=[16, 16])
    teacher = create_model("mlp", in_channels=1, num_classes=4, input_size=8, hidden=[32])
    stages = [Stage(Probe(signal_at, nan_at), train_config(epochs=2, batch_size=32)),
              Stage(create_method("hinton", temperature=2.0), train_config(epochs=2, batch_size=32))]
    # 250 examples: 7 global batches of 32 per epoch, 26 dropped (a different 26 each epoch);
    # 51 test examples: shards of 26 and 25.
    return Trainer(student, random_dataset(250, seed=1), random_dataset(51, seed=2), stages,
                   teacher=Teacher(teacher), run_dir=run_dir, progress=False, echo=lambda line: None, dist=dist)


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    out_dir = Path(out)
    with ddist.session("cpu") as ctx:
        assert ctx.world_size == WORLD and ctx.rank == rank
        trainer = make_trainer(out_dir / "whole")
        trainer.fit()
        torch.save({"student": trainer.student.state_dict(), "method": trainer.stages[0].method.state_dict(),
                    "history": trainer.history}, out_dir / f"whole_rank{rank}.pt")
        # Only rank 1 is signalled, in stage 1, epoch 2: both ranks must stop at the same step.
        interrupted = make_trainer(out_dir / "cut", signal_at=10 if rank == 1 else None)
        try:
            interrupted.fit()
            stopped = False
        except TrainingInterrupted:
            stopped = True
        if rank == 0:  # for a resume by a single process
            shutil.copy(out_dir / "cut" / "checkpoint.pt", out_dir / "cut_midway.pt")
        ctx.barrier()
        resumed = make_trainer(out_dir / "cut")
        resumed.fit(resume=True)
        torch.save({"student": resumed.student.state_dict(), "stopped": stopped, "history": resumed.history},
                   out_dir / f"cut_rank{rank}.pt")
        # The CLI inside the group: a run, then the same folder with other settings (bad input on rank 0's
        # side of the folder check must stop every rank with the same error).
        cli = {}
        for label, epochs in (("ok", 1), ("clash", 2)):
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(["train", "--role", "student", "--no-progress", *_set(
                    f"output_dir={out_dir / 'cli'}", f"data.root={out_dir / 'data'}", "data.eval_batch_size=64",
                    "student.model={name: mlp, kwargs: {hidden: [8]}}",
                    f"student.train={{epochs: {epochs}, batch_size: 32}}")])
            cli[label] = {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}
        (out_dir / f"cli_rank{rank}.json").write_text(json.dumps(cli))
        # An infinite loss on rank 1 only (stage 1, epoch 2, step 3) stops both ranks.
        diverging = make_trainer(out_dir / "nan", nan_at=10 if rank == 1 else None)
        try:
            diverging.fit()
            message = ""
        except NonFiniteLossError as err:
            message = str(err)
        (out_dir / f"nan_rank{rank}.txt").write_text(message)
        # BatchNorm: per-rank batch statistics, but rank 0's running statistics end up on every rank.
        torch.manual_seed(0)
        cnn = create_model("cnn", in_channels=1, num_classes=4, input_size=8, width=4, fc_width=8, dropout=0.0)
        Trainer(cnn, random_dataset(128, seed=1), random_dataset(16, seed=2),
                [Stage(create_method("ce"), train_config(epochs=1, batch_size=32))],
                progress=False, echo=lambda line: None).fit()
        torch.save(cnn.state_dict(), out_dir / f"bn_rank{rank}.pt")
        # FSP with stored teacher matrices: rank 0 fills the teacher cache first, rank 1 only reads it.
        torch.manual_seed(0)
        fsp_teacher = counting(Teacher(create_model("resnet8", in_channels=1, num_classes=4, input_size=8)))
        fsp_student = create_model("resnet8", in_channels=1, num_classes=4, input_size=8)
        adamw = {"name": "adamw", "lr": 0.001, "weight_decay": 0.0}
        fsp = Trainer(fsp_student, random_dataset(64, seed=1), random_dataset(16, seed=2),
                      [Stage(create_method("fsp"), train_config(epochs=1, batch_size=32, optimizer=adamw))],
                      teacher=fsp_teacher, teacher_cache=out_dir / "fsp_cache", progress=False, echo=lambda line: None)
        fsp.fit()
        (out_dir / f"fsp_rank{rank}.json").write_text(json.dumps(
            {"calls": fsp_teacher.calls, "stored": (not fsp.stages[0].method.runs_teacher_every_step)}))
        torch.save(fsp_student.state_dict(), out_dir / f"fsp_rank{rank}.pt")


def _set(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    write_fake_fmnist(out / "data", n_train=64, n_test=32)
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    torch.set_num_threads(1)
    single = make_trainer(out / "single")
    single.fit()
    whole, cut = ([torch.load(out / f"{kind}_rank{r}.pt", weights_only=True) for r in range(WORLD)]
                  for kind in ("whole", "cut"))
    return out, single, whole, cut


def _max_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_both_ranks_hold_identical_weights(runs):
    _, _, whole, _ = runs
    assert _max_diff(whole[0]["student"], whole[1]["student"]) == 0.0
    assert _max_diff(whole[0]["method"], whole[1]["method"]) == 0.0  # the learnable method part too


def test_two_processes_match_one_process_with_the_same_global_batch(runs):
    _, single, whole, _ = runs
    assert _max_diff(whole[0]["student"], single.student.state_dict()) < TOLERANCE
    assert _max_diff(whole[0]["method"], single.stages[0].method.state_dict()) < TOLERANCE
    # training actually moved the weights (the comparison is not between two untrained nets)
    assert _max_diff(single.student.state_dict(), make_trainer(None).student.state_dict()) > 1e-2


def test_metrics_are_reduced_over_ranks(runs):
    _, single, whole, _ = runs
    for rank_history in (whole[0]["history"], whole[1]["history"]):
        assert len(rank_history) == len(single.history) == 4
        for got, want in zip(rank_history, single.history):
            for key in ("train_loss", "train_accuracy", "test_accuracy", "test_loss"):
                assert got[key] == pytest.approx(want[key], abs=1e-5), key


def test_only_rank_0_writes_and_the_checkpoint_matches(runs):
    out, single, whole, _ = runs
    run_dir = out / "whole"
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.pt", "metrics.jsonl"]
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 4
    state = load_checkpoint(run_dir / "checkpoint.pt")
    assert state["complete"]
    assert _max_diff(state["student"], whole[0]["student"]) == 0.0


def test_a_signal_on_one_rank_stops_both_and_resume_reproduces_the_run(runs):
    _, _, whole, cut = runs
    assert cut[0]["stopped"] and cut[1]["stopped"]
    for rank in range(WORLD):
        assert _max_diff(cut[rank]["student"], whole[rank]["student"]) == 0.0
    assert [h["test_accuracy"] for h in cut[0]["history"]] == [h["test_accuracy"] for h in whole[0]["history"]]


def test_global_batch_must_divide_over_ranks():
    trainer = make_trainer(None)
    trainer.dist = ddist.DistContext(rank=0, world_size=3)
    with pytest.raises(ValueError, match="batch_size 32 is the global batch and must be divisible by the 3"):
        trainer._rank_batch_size(32, 0)


def test_the_cli_under_the_process_group(runs):
    out = runs[0]
    cli = [json.loads((out / f"cli_rank{r}.json").read_text()) for r in range(WORLD)]
    assert [c["ok"]["code"] for c in cli] == [0, 0]
    assert "student_alone: test accuracy" in cli[0]["ok"]["stdout"] and cli[1]["ok"]["stdout"] == ""  # rank 0 prints
    run_dir = out / "cli" / "fmnist" / "student_alone"
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.pt", "cost.json", "metrics.jsonl",
                                                        "model.safetensors"]
    # rank 0 found a run of other settings; both ranks exit 2 with its message
    assert [c["clash"]["code"] for c in cli] == [2, 2]
    errors = [c["clash"]["stderr"] for c in cli]
    assert errors[0].startswith("error: ") and "holds a run made from other settings" in errors[0]
    assert errors[1].startswith("[rank 1] error: ") and "holds a run made from other settings" in errors[1]


def test_a_non_finite_loss_on_one_rank_stops_both(runs):
    out = runs[0]
    messages = [(out / f"nan_rank{r}.txt").read_text() for r in range(WORLD)]
    assert "loss term 'probe_ce' is inf at stage 1, epoch 2, step 3" in messages[1]
    assert "became NaN or infinite on another rank at stage 1, epoch 2, step 3" in messages[0]
    state = load_checkpoint(out / "nan" / "checkpoint.pt")
    assert state["position"] == {"stage": 0, "epoch": 1, "step": 0}  # the last good one: end of epoch 1


def test_a_two_process_checkpoint_resumes_in_one_process(runs, tmp_path):
    out, single = runs[0], runs[1]
    shutil.copy(out / "cut_midway.pt", tmp_path / "checkpoint.pt")
    assert not load_checkpoint(tmp_path / "checkpoint.pt")["complete"]
    torch.set_num_threads(1)
    resumed = make_trainer(tmp_path)
    resumed.fit(resume=True)
    assert _max_diff(resumed.student.state_dict(), single.student.state_dict()) < TOLERANCE


def test_batchnorm_buffers_are_identical_on_both_ranks(runs):
    out = runs[0]
    states = [torch.load(out / f"bn_rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert any("running_mean" in k for k in states[0])
    assert _max_diff(states[0], states[1]) == 0.0


def test_rank_0_fills_the_stored_fsp_matrices_and_rank_1_reads_them(runs):
    out = runs[0]
    ranks = [json.loads((out / f"fsp_rank{r}.json").read_text()) for r in range(WORLD)]
    assert [r["stored"] for r in ranks] == [True, True]
    assert [r["calls"] for r in ranks] == [2, 1]  # setup (+ the one pass computing the matrices on rank 0)
    assert len(list((out / "fsp_cache").glob("*/fsp_*.bin"))) == 3
    states = [torch.load(out / f"fsp_rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert _max_diff(states[0], states[1]) == 0.0
