"""The scripts in examples/ run as documented (on their --tiny sizes), and the public API they use is documented."""

from __future__ import annotations

import math
import runpy
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_idx import one_thread  # noqa: F401 (an autouse fixture: one intra-op thread)

import distillery

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# The untrained networks of a one-epoch smoke run set off the trainer's sanity warnings (loss not
# falling, chance-level accuracy); they are the point of a smoke run, not a fault.
pytestmark = pytest.mark.filterwarnings("ignore::distillery.train.sanity.TrainingWarning")


def example(name: str) -> dict[str, Any]:
    """The example script's top-level names, as ``python examples/NAME.py`` would define them (main not run)."""
    return runpy.run_path(str(EXAMPLES / f"{name}.py"))


def test_own_loop_hinton_trains_a_student_from_a_frozen_teacher() -> None:
    outcome = example("own_loop_hinton")["main"](["--tiny"])
    assert len(outcome.epoch_terms) == 2
    for terms in outcome.epoch_terms:
        assert set(terms) == {"ce", "kd"}
        assert all(math.isfinite(value) and value > 0 for value in terms.values())
    assert outcome.student_accuracy > 0.1  # ten classes: chance is 0.1


def test_own_loop_hinton_runs_as_a_script(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(sys, "argv", ["own_loop_hinton.py", "--tiny"])
    runpy.run_path(str(EXAMPLES / "own_loop_hinton.py"), run_name="__main__")
    printed = capsys.readouterr().out
    assert "epoch 2: ce " in printed and "distilled student" in printed


def test_trainer_fitnets_runs_hints_then_kd_and_a_finished_run_is_reused(tmp_path: Path) -> None:
    main = example("trainer_fitnets")["main"]
    outcome = main(["--tiny", "--out", str(tmp_path)])
    assert [(r["stage"], r["method"]) for r in outcome.teacher] == [(1, "ce")]
    assert [(r["stage"], r["method"]) for r in outcome.student] == [(1, "fitnets"), (2, "hinton")]
    assert "train_hint" in outcome.student[0] and "train_kd" in outcome.student[1]
    checkpoint = outcome.student_dir / "checkpoint.pt"
    assert len((outcome.student_dir / "metrics.jsonl").read_text().splitlines()) == 2
    assert list((outcome.student_dir / "tensorboard").glob("events.out.tfevents.*"))
    written = checkpoint.stat().st_mtime_ns
    again = main(["--tiny", "--out", str(tmp_path), "--resume"])  # both runs are complete: nothing is retrained
    assert again.student == outcome.student
    assert checkpoint.stat().st_mtime_ns == written


@pytest.mark.parametrize("method, stages", [("fsp", ["fsp", "ce"]), ("hinton", ["hinton"])])
def test_signals_1d_distils_a_user_model_on_user_signals(method: str, stages: list[str]) -> None:
    namespace = example("signals_1d")
    outcome = namespace["main"](["--tiny", "--method", method])
    given = namespace["signals"](192, seed=1).tensors[0]
    assert outcome.train_data.sample_shape == (2, 64) and outcome.train_data.inputs.dtype == torch.float32
    assert torch.equal(outcome.train_data.inputs, given)  # held as given: same shape, dtype and values
    assert [r["method"] for r in outcome.student] == stages


def test_image_folder_loads_a_users_folder_of_classes(tmp_path: Path) -> None:
    namespace = example("image_folder")
    folder = namespace["make_demo_folder"](tmp_path / "shapes", per_class=8)
    outcome = namespace["main"](["--folder", str(folder), "--mode", "L", "--size", "8", "--tiny",
                                 "--cache-dir", str(tmp_path / "cache")])
    train, test = outcome.train_data, outcome.test_data
    assert train.class_names == ("disc", "square", "stripes")  # the sorted subfolder names, in label order
    assert (train.sample_shape, train.inputs.dtype) == ((1, 8, 8), torch.uint8)
    assert (len(train), len(test)) == (18, 6)  # a quarter of each class's 8 images held out
    assert list((tmp_path / "cache").glob("*.npz"))  # the decoded images were cached for the next run
    assert [r["method"] for r in outcome.student] == ["hinton"]


def test_image_folder_demo_makes_its_folder_in_a_temporary_directory() -> None:
    outcome = example("image_folder")["main"](["--demo", "--tiny"])
    assert outcome.train_data.class_names == ("disc", "square", "stripes")
    assert outcome.train_data.sample_shape == (3, 16, 16)
    assert len(outcome.train_data) + len(outcome.test_data) == 36


# ---------------------------------------------------------------- the public API the examples use


def test_the_trainer_api_is_importable_from_the_package() -> None:
    for name in ("Stage", "Trainer", "TrainConfig", "OptimizerConfig", "ScheduleConfig", "AugmentConfig",
                 "EpochRecord", "Callback", "Teacher", "create_method", "run_student"):
        assert name in distillery.__all__ and getattr(distillery, name) is not None, name


@pytest.mark.parametrize("section", [distillery.TrainConfig, distillery.OptimizerConfig, distillery.ScheduleConfig,
                                     distillery.AugmentConfig])
def test_every_training_setting_is_described_in_its_field_and_class_docstring(section: type) -> None:
    for name, field in section.model_fields.items():
        assert field.description, f"{section.__name__}.{name} has no description"
        assert f"``{name}``" in section.__doc__, f"{section.__name__}'s docstring does not list {name}"


def test_epoch_record_documents_every_key_the_trainer_writes() -> None:
    doc = distillery.EpochRecord.__doc__
    for key in distillery.EpochRecord.__annotations__:
        assert f"``{key}``" in doc, key
    assert "``train_<term>``" in doc
