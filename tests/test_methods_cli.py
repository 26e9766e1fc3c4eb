"""Every method end to end from the CLI on a tiny idx dataset: exit code 0 and a falling training loss."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from tiny_idx import one_thread, tiny_dataset, write_tiny_fmnist  # noqa: F401  (one_thread: autouse fixture)

from distillery.cli import main
from distillery.config import TrainConfig
from distillery.data import load_idx_dataset
from distillery.losses import ensemble_probs
from distillery.methods import create_method
from distillery.models import create_model
from distillery.networks import load_trained_model
from distillery.train import Stage, Trainer, seed_everything

TRAIN = {"epochs": 3, "batch_size": 32, "optimizer": {"lr": 0.05}, "schedule": {"name": "constant"}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """A tiny idx dataset, a config using it, and two trained ResNet-8 teachers."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("methods_cli")
    data = write_tiny_fmnist(root / "data", n_train=128, n_test=64, size=8)
    config = {
        "name": "teacher", "output_dir": str(root / "runs"),
        "data": {"dataset": "fashion_mnist", "root": str(data), "eval_batch_size": 64},
        "teacher": {"model": {"name": "resnet8"}, "train": TRAIN},
        "student": {"model": {"name": "resnet8"}, "train": TRAIN},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    for name, seed in (("teacher", 0), ("teacher2", 1)):
        assert main(["train", "--role", "teacher", "-c", str(path), "--no-progress", "--set", f"name={name}",
                     "--set", f"seed={seed}"]) == 0
    return {"root": root, "config": path, "teacher": root / "runs/teacher/teacher/checkpoint.pt",
            "teacher2": root / "runs/teacher2/teacher/checkpoint.pt"}


def _history(setup: dict[str, Path], name: str, role: str = "student_distilled") -> list[dict]:
    lines = (setup["root"] / "runs" / name / role / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _assert_loss_falls(history: list[dict]) -> None:
    for stage in sorted({r["stage"] for r in history}):
        losses = [r["train_loss"] for r in history if r["stage"] == stage]
        assert losses[-1] < losses[0], f"stage {stage} loss did not fall: {losses}"


def _distill(setup: dict[str, Path], name: str, *args: str) -> int:
    return main(["distill", "-c", str(setup["config"]), "--no-progress", "--set", f"name={name}", *args])


@pytest.mark.parametrize("method", ["hinton", "logits", "ensemble", "fitnets", "fsp", "label_smoothing",
                                    "tfkd_reg", "tfkd_self"])
def test_every_method_trains_from_the_cli(setup, method: str) -> None:
    teacher = [] if method in ("label_smoothing", "tfkd_reg", "tfkd_self") else ["--teacher", str(setup["teacher"])]
    assert _distill(setup, method, "--method", method, *teacher) == 0
    history = _history(setup, method)
    expected_stages = 2 if method in ("fsp", "fitnets") else 1
    assert [r["stage"] for r in history] == [s for s in range(1, expected_stages + 1) for _ in range(3)]
    assert {r["method"] for r in history} == {method, *({"fsp": {"ce"}, "fitnets": {"hinton"}}.get(method, set()))}
    _assert_loss_falls(history)
    if method == "tfkd_self":  # its teacher is the student trained alone in the same folder
        assert (setup["root"] / "runs" / method / "student_alone" / "checkpoint.pt").exists()


def test_fsp_default_stage_one_uses_its_own_optimiser_settings(setup) -> None:
    history = _history(setup, "fsp")
    assert history[0]["lr"] == pytest.approx(0.001) and history[-1]["lr"] == pytest.approx(0.05)


def test_ensemble_of_two_teachers_and_eval_ensemble(setup, capsys) -> None:
    t1, t2 = str(setup["teacher"]), str(setup["teacher2"])
    assert _distill(setup, "ens2", "--method", "ensemble", "--teacher", t1, t2) == 0
    _assert_loss_falls(_history(setup, "ens2"))
    capsys.readouterr()
    assert main(["eval", "-c", str(setup["config"]), "--ensemble", t1, t2]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[2].startswith("ensemble of 2")
    printed = [float(re.search(r"accuracy ([\d.]+) %", line).group(1)) for line in lines]
    test = load_idx_dataset("fashion_mnist", "test", setup["root"] / "data")
    models = [load_trained_model(p, None, test)[0].eval() for p in (t1, t2)]
    inputs = (test.images.float() / 255 - test.mean[0]) / test.std[0]
    with torch.no_grad():
        logits = torch.stack([m(inputs) for m in models])
    predictions = [logits[0], logits[1], ensemble_probs(logits)]
    expected = [100 * (p.argmax(1) == test.labels).float().mean().item() for p in predictions]
    assert printed == pytest.approx(expected, abs=0.006)


def test_tfkd_self_generations(setup) -> None:
    assert _distill(setup, "gens", "--method", "tfkd_self", "--generations", "2") == 0
    runs = setup["root"] / "runs" / "gens"
    assert {p.name for p in runs.iterdir()} == {"student_alone", "student_distilled_gen1", "student_distilled"}
    _assert_loss_falls(_history(setup, "gens"))
    gen1 = torch.load(runs / "student_distilled_gen1" / "checkpoint.pt", weights_only=True)["meta"]["fingerprint"]
    gen2 = torch.load(runs / "student_distilled" / "checkpoint.pt", weights_only=True)["meta"]["fingerprint"]
    assert gen1 != gen2  # generation 2 was taught by generation 1, not by the student alone


def test_fsp_teacher_matrices_are_stored_in_the_teacher_cache(setup) -> None:
    # defaults (teacher.cache auto, store_teacher auto) and a stage 1 without augmentation: stored there
    cache = setup["root"] / "fsp_cache"
    assert _distill(setup, "stored", "--method", "fsp", "--teacher", str(setup["teacher"]),
                    "--set", f"teacher.cache_dir={cache}") == 0
    assert sorted(p.name for p in cache.glob("*/fsp_*.bin")) == [
        "fsp_stage1__stage2.bin", "fsp_stage2__stage3.bin", "fsp_stem__stage1.bin"]
    _assert_loss_falls(_history(setup, "stored"))
    # teacher.cache off turns auto off; an explicit store_teacher=true then stores in the run folder
    off = setup["root"] / "off_cache"
    assert _distill(setup, "stored_off", "--method", "fsp", "--teacher", str(setup["teacher"]),
                    "--set", f"teacher.cache_dir={off}", "--set", "teacher.cache=off",
                    "--set", "distill.stages.0.method.store_teacher=true") == 0
    assert not off.exists()
    assert len(list((setup["root"] / "runs/stored_off/student_distilled").glob("*/fsp_*.bin"))) == 3
    # matrices over teacher.cache_max_mb (128 examples × 2,816 floats = 1.4 MB) are not stored by auto
    small = setup["root"] / "small_cache"
    assert _distill(setup, "over_budget", "--method", "fsp", "--teacher", str(setup["teacher"]),
                    "--set", f"teacher.cache_dir={small}", "--set", "teacher.cache_max_mb=1") == 0
    assert not small.exists()


def test_teacher_from_another_task_drives_fsp_but_not_hinton(setup, capsys) -> None:
    seed_everything(0)
    five = tiny_dataset(64, num_classes=5, size=8, seed=3)
    model = create_model("resnet8", in_channels=1, num_classes=5, input_size=8)
    run_dir = setup["root"] / "five_class_teacher"
    Trainer(model, five, five, [Stage(create_method("ce"), TrainConfig(epochs=1, batch_size=32))], run_dir=run_dir,
            progress=False, meta={"model": {"name": "resnet8", "kwargs": {}}, "num_classes": 5}).fit()
    other = str(run_dir / "checkpoint.pt")
    assert _distill(setup, "transfer", "--method", "fsp", "--teacher", other) == 0
    _assert_loss_falls(_history(setup, "transfer"))
    capsys.readouterr()
    assert _distill(setup, "transfer_bad", "--method", "hinton", "--teacher", other) == 2
    assert "teacher outputs 5 classes and the student 10" in capsys.readouterr().err


def test_layer_names_that_do_not_fit_the_models_are_named(setup, capsys) -> None:
    code = _distill(setup, "mlp", "--method", "fitnets", "--teacher", str(setup["teacher"]),
                    "--set", "student.model.name=mlp")
    assert code == 2
    err = capsys.readouterr().err
    assert "student_layer='stage2'" in err and "no layer named 'stage2'" in err


MAIN_JOB_STAGES = {
    "fsp": "[{method: {name: fsp}, train: {epochs: 2, batch_size: 32, optimizer: {lr: 0.001}}}, {method: {name: ce}}]",
    "tfkd_self": "[{method: {name: tfkd_self}}]",
}


@pytest.mark.parametrize("method", list(MAIN_JOB_STAGES))
def test_main_job_runs_two_stage_and_self_taught_methods(setup, method: str) -> None:
    name, stages = f"main_{method}", MAIN_JOB_STAGES[method]
    assert main(["run", "-c", str(setup["config"]), "--no-progress", "--set", f"name={name}",
                 "--set", f"distill.stages={stages}"]) == 0
    results = json.loads((setup["root"] / "runs" / name / "results.json").read_text())
    assert [r["role"] for r in results["rows"]] == ["teacher", "student alone", "student distilled"]
    _assert_loss_falls(_history(setup, name))


def test_tfkd_self_with_an_explicit_copy_of_the_student_as_teacher(setup) -> None:
    # the tiny config's teacher is a ResNet-8 like the student, so it may teach as its "self"
    assert _distill(setup, "self_given", "--method", "tfkd_self", "--teacher", str(setup["teacher"])) == 0
    runs = setup["root"] / "runs" / "self_given"
    assert {p.name for p in runs.iterdir()} == {"student_distilled"}  # no student trained alone first


def test_tfkd_self_teacher_is_built_as_the_student_not_the_configured_teacher(setup) -> None:
    # the config names a ResNet-14 teacher; the given checkpoint is a ResNet-8, the student's architecture
    code = _distill(setup, "self_other", "--method", "tfkd_self", "--teacher", str(setup["teacher"]),
                    "--set", "teacher.model={name: resnet14}")
    assert code == 0
    assert _history(setup, "self_other")
