"""Data of any shape from the command line: arrays of vectors, signals and images, and image folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distillery.cli import EXIT_BAD_INPUT, main


def _arrays(path: Path, shape: tuple[int, ...], n: int = 96, classes: int = 3) -> Path:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, classes, n)
    inputs = rng.normal(size=(n, *shape)).astype(np.float32)
    inputs.reshape(n, -1)[:, :classes] += 4 * np.eye(classes, dtype=np.float32)[labels]  # separable
    np.savez(path, x=inputs, y=labels)
    return path


def _run(data: str, out: Path, role: str = "student", model: str = "{name: mlp, kwargs: {hidden: [16]}}") -> int:
    return main(["train", "--role", role, "--no-progress", "--set", f"data={data}", "--set", f"output_dir={out}",
                 "--set", f"student.model={model}", "--set", f"teacher.model={model}",
                 "--set", "student.train={epochs: 1, batch_size: 16}",
                 "--set", "teacher.train={epochs: 1, batch_size: 16}"])


@pytest.mark.parametrize("shape", [(12,), (2, 10), (1, 8, 8)], ids=["N×D", "N×C×L", "N×C×H×W"])
def test_arrays_of_any_sample_shape_train_from_the_cli(shape, tmp_path: Path, capsys) -> None:
    train = _arrays(tmp_path / "train.npz", shape)
    model = "{name: cnn, kwargs: {width: 4, fc_width: 8}}" if len(shape) == 3 else "{name: mlp, kwargs: {hidden: [16]}}"
    assert _run(f"{{source: arrays, train: {train}, test_fraction: 0.25}}", tmp_path / "runs", model=model) == 0
    assert "student_alone: test accuracy" in capsys.readouterr().out


def _folder(root: Path, per_class: int = 12) -> Path:
    rng = np.random.default_rng(0)
    for k, name in enumerate(("cats", "dogs")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = (rng.random((10, 10)) * 60 + 150 * k).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(root / name / f"{i}.png")
    return root


def test_an_image_folder_trains_and_evaluates_from_the_cli(tmp_path: Path, capsys) -> None:
    root = _folder(tmp_path / "photos")
    data = f"{{source: image_folder, train: {root}, test_fraction: 0.25, size: 8, mode: L, cache_dir: {tmp_path}}}"
    assert _run(data, tmp_path / "runs") == 0
    checkpoint = tmp_path / "runs" / "fmnist" / "student_alone" / "checkpoint.pt"
    assert main(["eval", str(checkpoint), "--set", f"data={data}"]) == 0
    assert "test accuracy" in capsys.readouterr().out


def test_a_corrupt_image_and_an_empty_class_folder_are_named(tmp_path: Path, capsys) -> None:
    root = _folder(tmp_path / "photos")
    (root / "dogs" / "3.png").write_bytes(b"not a png")
    data = f"{{source: image_folder, train: {root}, test_fraction: 0.25, size: 8, mode: L, cache: false}}"
    assert _run(data, tmp_path / "runs") == EXIT_BAD_INPUT
    assert "3.png" in capsys.readouterr().err
    (root / "dogs" / "3.png").unlink()
    (root / "birds").mkdir()
    assert _run(data, tmp_path / "runs") == EXIT_BAD_INPUT
    assert "birds" in capsys.readouterr().err


@pytest.mark.parametrize("shape", [(12,), (2, 10), (1, 8, 8)], ids=["N×D", "N×C×L", "N×C×H×W"])
def test_tensor_datasets_of_any_sample_shape_train_through_the_trainer(shape, tmp_path: Path) -> None:
    import torch
    from torch import nn

    from distillery import Stage, TrainConfig, Trainer, create_method
    from distillery.data import InMemoryDataset, Normalisation

    arrays = np.load(_arrays(tmp_path / "d.npz", shape))
    data = InMemoryDataset(torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"]), Normalisation.none(), 3)
    if len(shape) == 1:
        student = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
    elif len(shape) == 2:
        student = nn.Sequential(nn.Conv1d(2, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(),
                                nn.Linear(8, 3))
    else:
        student = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                nn.Linear(8, 3))
    history = Trainer(student, data, data, [Stage(create_method("ce"), TrainConfig(epochs=1, batch_size=16))],
                      progress=False, echo=lambda m: None).fit()
    assert len(history) == 1 and 0 <= history[0]["test_accuracy"] <= 1
