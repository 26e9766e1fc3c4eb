"""The main job's code path end to end, through the CLI, on a small synthetic dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distillery.cli import main


def tiny_args(root: Path, out: Path) -> list[str]:
    return [
        "--no-progress",
        "--set", f"data.root={root}",
        "--set", f"output_dir={out}",
        "--set", "name=tiny",
        "--set", "teacher.model={name: mlp, kwargs: {hidden: [64]}}",
        "--set", "teacher.train.epochs=3",
        "--set", "teacher.train.augment.hflip=false",  # the synthetic classes are not mirror-symmetric
        "--set", "student.model={name: mlp, kwargs: {hidden: [16]}}",
        "--set", "student.train.epochs=2",
    ]


def test_main_job_writes_table_report_metrics_and_plot(fake_root: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "runs"
    assert main(["run", *tiny_args(fake_root, out)]) == 0
    printed = capsys.readouterr().out
    for words in ("teacher", "student alone", "student distilled", "latency b=1", "throughput b=256",
                  "distilled minus alone"):
        assert words in printed
    run = out / "tiny"
    results = json.loads((run / "results.json").read_text())
    roles = [r["role"] for r in results["rows"]]
    assert roles == ["teacher", "student alone", "student distilled"]
    teacher, alone, distilled = results["rows"]
    assert alone["parameters"] == distilled["parameters"] != teacher["parameters"]
    assert all(0.3 < r["test_accuracy"] <= 1 for r in results["rows"])  # learned something (chance 0.1)
    assert all(r["size_bytes"] > 4 * r["parameters"] for r in results["rows"])  # float32 weights + header
    assert (run / "learning_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "| student distilled |" in (run / "report.md").read_text()
    for role, epochs in (("teacher", 3), ("student_alone", 2), ("student_distilled", 2)):
        lines = (run / role / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == epochs

    # A second run with the same settings reuses every finished network instead of retraining.
    stamps = {p: p.stat().st_mtime_ns for p in run.glob("*/checkpoint.pt")}
    assert main(["run", *tiny_args(fake_root, out)]) == 0
    assert stamps == {p: p.stat().st_mtime_ns for p in run.glob("*/checkpoint.pt")}


def test_changed_settings_never_overwrite_a_finished_run(fake_root: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "runs"
    args = tiny_args(fake_root, out)
    assert main(["train", "--role", "student", *args]) == 0
    checkpoint = out / "tiny" / "student_alone" / "checkpoint.pt"
    before = checkpoint.read_bytes()
    assert main(["train", "--role", "student", *args, "--set", "seed=3"]) == 2
    assert "a run made from other settings" in capsys.readouterr().err
    assert checkpoint.read_bytes() == before
    assert main(["train", "--role", "student", *args, "--set", "seed=3", "--overwrite"]) == 0
    assert list((out / "tiny").glob("student_alone.replaced-*/checkpoint.pt"))  # the old run was moved aside


def test_train_distill_eval_commands(fake_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "runs"
    args = tiny_args(fake_root, out)
    assert main(["distill", *args]) == 2
    assert "distill needs a teacher" in capsys.readouterr().err
    assert main(["train", "--role", "teacher", *args]) == 0
    assert main(["distill", *args]) == 0
    checkpoint = out / "tiny" / "student_distilled" / "checkpoint.pt"
    capsys.readouterr()
    assert main(["eval", str(checkpoint), "--set", f"data.root={fake_root}"]) == 0
    line = capsys.readouterr().out
    assert "mlp test accuracy" in line
    recorded = json.loads((checkpoint.parent / "metrics.jsonl").read_text().splitlines()[-1])["test_accuracy"]
    assert f"{100 * recorded:.2f} %" in line  # eval reproduces the accuracy logged at the end of training


def test_the_main_job_writes_the_deployed_card_and_export_verifies_the_student(
        fake_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import onnxruntime as ort

    out = tmp_path / "runs"
    assert main(["run", *tiny_args(fake_root, out)]) == 0
    printed = capsys.readouterr().out
    assert "student distilled int8" in printed and "ORT b=1 median / p90" in printed
    results = json.loads((out / "tiny" / "results.json").read_text())
    assert set(results["cost"]) == {"teacher", "student_alone", "student_distilled"}
    assert all(results["cost"][role] for role in results["cost"])  # each run's cost.json, read back
    card = results["card"]
    assert [r["label"] for r in card["rows"]] == ["teacher", "student alone", "student distilled",
                                                  "student distilled int8"]
    checkpoint = out / "tiny" / "student_distilled" / "checkpoint.pt"
    assert main(["export", str(checkpoint), "--set", f"data.root={fake_root}", "--int8"]) == 0
    printed = capsys.readouterr().out
    assert "outputs match PyTorch" in printed and "int8 (" in printed
    session = ort.InferenceSession(str(checkpoint.with_suffix(".onnx")), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"  # the dynamic batch axis


def test_logging_tensorboard_writes_an_event_file_per_network(fake_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "runs"
    assert main(["train", "--role", "student", *tiny_args(fake_root, out), "--set", "logging.tensorboard=true"]) == 0
    events = list((out / "tiny" / "student_alone" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
