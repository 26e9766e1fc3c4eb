"""The training loop: learning, resume equivalence, checkpoints, schedules, teacher hygiene."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from distillery.config import AugmentConfig, OptimizerConfig, ScheduleConfig, TrainConfig
from distillery.data import ImageDataset
from distillery.methods import Teacher, create_method
from distillery.models import create_model
from distillery.train import CheckpointError, NonFiniteLossError, Stage, Trainer, load_checkpoint, save_checkpoint
from distillery.train.optim import lr_multiplier


def mlp(seed: int = 0, dropout: float = 0.1) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("mlp", hidden=[32], dropout=dropout)


def train_config(epochs: int = 3, **kwargs) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=32, optimizer=OptimizerConfig(lr=0.05),
                       augment=AugmentConfig(crop_padding=2, hflip=True), **kwargs)


def make_trainer(data: ImageDataset, run_dir: Path | None, method: str = "ce", teacher: Teacher | None = None,
                 **train_kwargs) -> Trainer:
    params = {"temperature": 2.0} if method == "hinton" else {}
    stages = [Stage(create_method(method, **params), train_config(**train_kwargs))]
    return Trainer(mlp(), data, data, stages, teacher=teacher, run_dir=run_dir, seed=1, progress=False,
                   echo=lambda line: None)


def test_training_learns_and_logs_metrics(small_dataset: ImageDataset, tmp_path: Path) -> None:
    trainer = make_trainer(small_dataset, tmp_path / "run", epochs=4)
    history = trainer.fit()
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["test_accuracy"] > 0.5  # chance is 0.1
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]
    assert {"train_ce", "test_loss", "lr", "images_per_s"} <= set(json.loads(lines[0]))


def final_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.student.state_dict().items()}


def test_resume_after_kill_mid_epoch_matches_uninterrupted_run(small_dataset: ImageDataset, tmp_path: Path) -> None:
    reference = make_trainer(small_dataset, tmp_path / "ref", checkpoint_every_steps=3)
    reference_history = reference.fit()

    interrupted = make_trainer(small_dataset, tmp_path / "run", checkpoint_every_steps=3)
    calls = {"n": 0}
    original_step = interrupted._step

    def dying_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 12:  # mid-way through epoch 2 (8 steps per epoch), after the step-9 checkpoint
            raise KeyboardInterrupt
        return original_step(*args, **kwargs)

    interrupted._step = dying_step
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["position"] == {"stage": 0, "epoch": 1, "step": 3}

    resumed = make_trainer(small_dataset, tmp_path / "run", checkpoint_every_steps=3)
    history = resumed.fit(resume=True)
    for key, value in final_weights(reference).items():
        assert torch.equal(value, resumed.student.state_dict()[key]), key
    assert [r["test_accuracy"] for r in history] == [r["test_accuracy"] for r in reference_history]
    assert history[-1]["train_loss"] == pytest.approx(reference_history[-1]["train_loss"], rel=1e-6)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3  # no duplicated epochs after the resume


def test_resume_of_finished_run_is_a_no_op(small_dataset: ImageDataset, tmp_path: Path) -> None:
    make_trainer(small_dataset, tmp_path / "run", epochs=1).fit()
    again = make_trainer(small_dataset, tmp_path / "run", epochs=1)
    again._step = None  # would fail if any step ran
    assert len(again.fit(resume=True)) == 1


def test_nan_loss_stops_with_term_and_step_keeping_last_checkpoint(small_dataset: ImageDataset,
                                                                   tmp_path: Path) -> None:
    trainer = make_trainer(small_dataset, tmp_path / "run", epochs=3)
    original = trainer._step
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        terms, loss, logits = original(*args, **kwargs)
        if calls["n"] == 10:
            terms = {"ce": torch.tensor(float("nan"))}
            loss = terms["ce"]
        return terms, loss, logits

    trainer._step = poisoned
    with pytest.raises(NonFiniteLossError, match=r"'ce' is nan at stage 1, epoch 2, step 2"):
        trainer.fit()
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["position"]["epoch"] == 1 and not state["complete"]
    assert all(torch.isfinite(v).all() for v in state["student"].values())


def test_loss_checked_through_the_sum_of_terms(small_dataset: ImageDataset, tmp_path: Path) -> None:
    """One check of the summed loss stands for all terms: finite terms whose sum overflows are
    caught and named as the total, and a non-finite term is named even when others are finite."""
    for poison, expected in (({"a": 3e38, "b": 3e38}, r"'total \(the sum of the terms\)' is inf"),
                             ({"a": 1.0, "b": float("-inf")}, r"'b' is -inf")):
        trainer = make_trainer(small_dataset, tmp_path / str(len(expected)), epochs=1)
        original = trainer._step

        def poisoned(*args, poison=poison, original=original, **kwargs):
            terms, loss, logits = original(*args, **kwargs)
            terms = {k: torch.tensor(v, dtype=torch.float32) for k, v in poison.items()}
            return terms, terms["a"] + terms["b"], logits

        trainer._step = poisoned
        with pytest.raises(NonFiniteLossError, match=expected):
            trainer.fit()


@pytest.mark.parametrize("clip", [None, 0.01])
def test_grad_clip_norm_bounds_every_update(small_dataset: ImageDataset, clip: float | None) -> None:
    """Plain SGD at lr 1: an update is lr · gradient, so with clipping its norm is at most the clip norm."""
    cfg = TrainConfig(epochs=1, batch_size=32, grad_clip_norm=clip,
                      optimizer=OptimizerConfig(lr=1.0, momentum=0.0, weight_decay=0.0))
    trainer = Trainer(mlp(dropout=0.0), small_dataset, small_dataset, [Stage(create_method("ce"), cfg)], seed=1,
                      progress=False, echo=lambda line: None)
    original, steps = trainer._step, []

    def flat() -> torch.Tensor:
        return torch.cat([p.detach().flatten().clone() for p in trainer.student.parameters()])

    def watched(*args, **kwargs):
        before = flat()
        out = original(*args, **kwargs)
        steps.append((flat() - before).norm().item())
        return out

    trainer._step = watched
    trainer.fit()
    if clip is None:
        assert steps[0] > 0.1  # unclipped, the first update is far larger
    else:
        assert max(steps) <= clip * (1 + 1e-4) and steps[0] == pytest.approx(clip, rel=1e-3)


def test_teacher_stays_frozen_in_eval_and_out_of_optimiser(small_dataset: ImageDataset) -> None:
    teacher_net = mlp(seed=5, dropout=0.5)
    before = {k: v.clone() for k, v in teacher_net.state_dict().items()}
    teacher_net.train()
    teacher = Teacher(teacher_net)
    trainer = make_trainer(small_dataset, None, method="hinton", teacher=teacher, epochs=1)
    teacher_net.train()  # a careless caller switches it back: the teacher must still run in eval mode
    modes = []
    teacher_net.register_forward_hook(lambda m, i, o: modes.append(m.training))
    trainer.fit()
    assert modes and not any(modes)
    for k, v in teacher_net.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(not p.requires_grad for p in teacher_net.parameters())
    optimised = {id(p) for group in trainer.current.optimizer.param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in teacher_net.parameters()}


def test_distillation_moves_student_towards_teacher(small_dataset: ImageDataset) -> None:
    teacher_net = mlp(seed=9)
    Trainer(teacher_net, small_dataset, small_dataset, [Stage(create_method("ce"), train_config(epochs=3))],
            progress=False, echo=lambda line: None).fit()
    teacher = Teacher(teacher_net)
    distilled = make_trainer(small_dataset, None, method="hinton", teacher=teacher, epochs=2)
    untrained_gap = _kl_to_teacher(distilled.student, teacher, small_dataset)
    distilled.fit()
    assert _kl_to_teacher(distilled.student, teacher, small_dataset) < 0.5 * untrained_gap


def _kl_to_teacher(student: nn.Module, teacher: Teacher, data: ImageDataset) -> float:
    from distillery.data import BatchLoader
    from distillery.losses import kd_loss

    batch = next(BatchLoader(data, len(data)).epoch(0))
    student.eval()
    with torch.no_grad():
        return kd_loss(student(batch.inputs), teacher(batch.inputs).logits, 2.0).item()


def test_checkpoint_is_atomic_and_refuses_garbage(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint({"x": torch.ones(3)}, path)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    assert torch.equal(load_checkpoint(path)["x"], torch.ones(3))
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(1)}, plain)
    with pytest.raises(CheckpointError, match="not a distillery checkpoint"):
        load_checkpoint(plain)


def test_schedules() -> None:
    cosine = ScheduleConfig(name="cosine")
    assert lr_multiplier(0, 100, 10, cosine) == 1.0
    assert lr_multiplier(50, 100, 10, cosine) == pytest.approx(0.5)
    assert lr_multiplier(100, 100, 10, cosine) == pytest.approx(0.0)
    step = ScheduleConfig(name="step", milestones=[2, 4], gamma=0.1)
    assert [lr_multiplier(s, 60, 10, step) for s in (19, 20, 40)] == pytest.approx([1.0, 0.1, 0.01])
    warm = ScheduleConfig(name="constant", warmup_epochs=1)
    assert lr_multiplier(4, 100, 10, warm) == pytest.approx(0.5)
