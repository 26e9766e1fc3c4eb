"""The compression card: four rows (teacher, both students, the int8 student), rendered three ways, plus a plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distillery.deploy import Card, CardInput, SpeedSettings, build_card, model_logits, read_safetensors_metadata
from distillery.deploy.card import plot_accuracy_latency
from distillery.models import create_model

SIZE = 8
FEW_CALLS = SpeedSettings(latency_calls=3, latency_warmup=1, throughput_batch=32, throughput_calls=2,
                          throughput_warmup=0)
LABELS = ["teacher", "student alone", "student distilled", "student distilled int8"]


def card_inputs() -> list[CardInput]:
    torch.manual_seed(0)
    teacher = create_model("cnn", in_channels=1, num_classes=10, input_size=SIZE, width=8, fc_width=32)
    alone, distilled = (create_model("mlp", in_channels=1, num_classes=10, input_size=SIZE, hidden=[16])
                        for _ in range(2))
    spec = {"name": "mlp", "kwargs": {"hidden": [16]}}
    return [CardInput("teacher", teacher.eval(), "cnn(width=8)"),
            CardInput("student_alone", alone.eval(), "mlp(hidden=[16])", spec),
            CardInput("student_distilled", distilled.eval(), "mlp(hidden=[16])", spec)]


def split_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(60, 1, SIZE, SIZE, generator=g), torch.randint(0, 10, (60,), generator=g)


@pytest.fixture(scope="module")
def card(tmp_path_factory: pytest.TempPathFactory) -> Card:
    x, y = split_data()
    return build_card(card_inputs(), x, y, None, tmp_path_factory.mktemp("card"), threads=1,
                      calibration=torch.randn(32, 1, SIZE, SIZE), settings=FEW_CALLS)


def test_card_has_the_four_models_with_their_measurements(card: Card) -> None:
    assert [r.label for r in card.rows] == LABELS
    teacher, alone, distilled, int8 = card.rows
    assert teacher.agreement == 1.0 and teacher.kl_to_teacher == pytest.approx(0.0, abs=1e-6)
    assert (teacher.speedup, teacher.size_ratio) == (1.0, 1.0)
    assert int8.pytorch is None and all(r.pytorch is not None for r in card.rows[:3])
    assert int8.parameters == distilled.parameters == alone.parameters < teacher.parameters
    assert int8.artefact.name == "student_distilled.int8.onnx" and int8.artefact_bytes < distilled.artefact_bytes
    for row in card.rows:
        assert row.artefact.stat().st_size == row.artefact_bytes
        assert row.size_ratio == pytest.approx(teacher.artefact_bytes / row.artefact_bytes)
        assert row.speedup == pytest.approx(teacher.onnxruntime.latency.median_ms / row.onnxruntime.latency.median_ms)
        assert row.onnxruntime.threads == 1 and row.onnxruntime.latency.calls == 3
        assert row.onnxruntime.throughput.batch_size == 32


def test_card_accuracy_and_agreement_follow_the_models(card: Card) -> None:
    x, y = split_data()
    models = {m.role: m.model for m in card_inputs()}
    teacher_logits = model_logits(models["teacher"], x)
    for role, row in zip(("student_alone", "student_distilled"), card.rows[1:3]):
        logits = model_logits(models[role], x)
        assert row.test_accuracy == (logits.argmax(-1) == y).double().mean().item()
        assert row.agreement == (logits.argmax(-1) == teacher_logits.argmax(-1)).double().mean().item()


def test_card_renders_markdown_json_and_text(card: Card) -> None:
    markdown = card.markdown_path.read_text()
    assert markdown == card.markdown()
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0].lstrip("| ") for line in table] == ["model", *LABELS]
    assert table[-1].split(" | ").count("—") == 2  # the int8 model's two PyTorch cells
    assert "median / p90 of 3 timed calls after 1 untimed" in markdown and "threads: 1" in markdown
    saved = json.loads(card.json_path.read_text())
    assert [r["label"] for r in saved["rows"]] == LABELS and saved["rows"][3]["pytorch"] is None
    assert saved["quantization"]["mode"] == "static" and saved["threads"] == 1
    assert len(saved["exports"]) == 5  # three ONNX files, two students' safetensors
    text = card.text()
    assert text.splitlines()[0].startswith("model") and all(label in text for label in LABELS)
    assert card.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_student_weights_carry_their_model_spec(card: Card) -> None:
    folder = card.markdown_path.parent
    meta = read_safetensors_metadata(folder / "student_distilled.safetensors")
    assert meta == {"role": "student_distilled", "network": "mlp(hidden=[16])",
                    "model": {"name": "mlp", "kwargs": {"hidden": [16]}}}
    assert not (folder / "teacher.safetensors").exists()


def test_given_teacher_logits_are_the_reference(tmp_path: Path) -> None:
    x, y = split_data()
    inputs = card_inputs()
    reference = model_logits(inputs[1].model, x)  # pretend the alone student's logits were the teacher's
    card = build_card(inputs, x, y, reference, tmp_path, threads=1, calibration=None, settings=FEW_CALLS)
    assert card.rows[1].agreement == 1.0 and card.rows[1].kl_to_teacher == pytest.approx(0.0, abs=1e-6)
    assert card.quantization.mode == "dynamic"  # an MLP without calibration inputs


def test_card_refuses_missing_roles_and_mismatched_logits(tmp_path: Path) -> None:
    x, y = split_data()
    inputs = card_inputs()
    with pytest.raises(ValueError, match="one model per role.*got roles \\['teacher', 'student_alone'\\]"):
        build_card(inputs[:2], x, y, None, tmp_path, threads=1, calibration=None)
    with pytest.raises(ValueError, match="teacher_logits has 5 rows for 60 test inputs"):
        build_card(inputs, x, y, torch.zeros(5, 10), tmp_path, threads=1, calibration=None)
    with pytest.raises(ValueError, match="as many labels as inputs"):
        build_card(inputs, x, y[:3], None, tmp_path, threads=1, calibration=None)
    assert list(tmp_path.iterdir()) == []


def test_plot_accuracy_latency_writes_a_png(card: Card, tmp_path: Path) -> None:
    path = plot_accuracy_latency(card.rows, tmp_path / "sub" / "plot.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
