"""The compression card: the teacher, both students and the int8 distilled student, as deployed.

:func:`build_card` exports every network to ONNX (and the students' weights to safetensors), each
verified against PyTorch; quantises the distilled student to int8; and measures every model on the
test split: accuracy, agreement with the teacher, KL(teacher ‖ model), parameters, artefact size,
latency at batch 1 and throughput at batch 256 in PyTorch and in onnxruntime (the int8 model runs
in onnxruntime only). Ratios are against the teacher:

    speed-up   = teacher's onnxruntime b=1 median latency / the model's
    size ratio = teacher's ONNX file size / the model's artefact size

It writes ``card.md``, ``card.json`` and ``accuracy_latency.png`` next to the artefacts.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import matplotlib
from torch import Tensor, nn

from distillery.deploy.export import ExportResult, export_model
from distillery.deploy.measure import (
    DEFAULT_SPEED_SETTINGS,
    Speed,
    SpeedSettings,
    mean_kl,
    model_logits,
    onnx_speed,
    top1_accuracy,
    top1_agreement,
    torch_speed,
)
from distillery.deploy.quantize import QuantizeMode, QuantizeResult, quantize_onnx
from distillery.deploy.runtime import batched, onnx_session, session_call
from distillery.fsio import atomic_write
from distillery.report.measure import count_parameters
from distillery.report.plots import save_figure
from distillery.report.table import human_bytes, render_markdown, render_text

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

Role = Literal["teacher", "student_alone", "student_distilled"]
ROLES: tuple[Role, ...] = ("teacher", "student_alone", "student_distilled")
LABELS = {"teacher": "teacher", "student_alone": "student alone", "student_distilled": "student distilled"}
INT8_LABEL = "student distilled int8"
NOT_MEASURED = "—"


@dataclass(frozen=True)
class CardInput:
    """One trained network for the card: its role, the module, how to describe it, and its model spec
    (stored in the student's safetensors metadata, e.g. ``{"name": "mlp", "kwargs": {...}}``)."""

    role: Role
    model: nn.Module
    network: str
    spec: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CardRow:
    """One model on the card; ``pytorch`` is None for the int8 model (it runs in onnxruntime only)."""

    label: str
    network: str
    test_accuracy: float
    agreement: float
    kl_to_teacher: float
    parameters: int
    artefact: Path
    artefact_bytes: int
    pytorch: Speed | None
    onnxruntime: Speed
    speedup: float = 1.0
    size_ratio: float = 1.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.label, "network": self.network, "test_accuracy": self.test_accuracy,
            "agreement": self.agreement, "kl_to_teacher": self.kl_to_teacher, "parameters": self.parameters,
            "artefact": str(self.artefact), "artefact_bytes": self.artefact_bytes,
            "pytorch": self.pytorch.as_dict() if self.pytorch else None, "onnxruntime": self.onnxruntime.as_dict(),
            "speedup": self.speedup, "size_ratio": self.size_ratio,
        }


@dataclass(frozen=True)
class Card:
    """The measured rows, how they were measured, the verified exports, and the files written."""

    rows: list[CardRow]
    threads: int
    settings: SpeedSettings
    test_samples: int
    exports: list[ExportResult]
    quantization: QuantizeResult
    markdown_path: Path
    json_path: Path
    plot_path: Path

    def table_cells(self) -> list[list[str]]:
        return [_cells(row, self.markdown_path.parent) for row in self.rows]

    def markdown(self) -> str:
        return (f"# Compression card\n\n{render_markdown(HEADERS, self.table_cells())}\n{self.notes()}\n"
                f"![accuracy against latency]({self.plot_path.name})\n")

    def text(self) -> str:
        return render_text(HEADERS, self.table_cells())

    def notes(self) -> str:
        """How the numbers were measured, and what each export was verified to."""
        s, q = self.settings, self.quantization
        lines = [
            f"Test split: {self.test_samples} inputs. Latency: batch {s.latency_batch}, median / p90 of "
            f"{s.latency_calls} timed calls after {s.latency_warmup} untimed; throughput: batch "
            f"{s.throughput_batch}, from the median of {s.throughput_calls} timed calls after {s.throughput_warmup} "
            f"untimed. CPU, threads: {self.threads} (PyTorch `set_num_threads`, onnxruntime intra-op threads).",
            "Agreement: fraction of test inputs whose top-1 class equals the teacher's; KL: mean "
            "KL(teacher ‖ model) at T = 1, in nats. Speed-up: the teacher's onnxruntime b=1 median latency over "
            "the model's; size ratio: the teacher's ONNX file over the model's artefact.",
            f"int8: {q.mode} quantisation{' (per-channel weights)' if q.per_channel else ''}"
            + (f", calibrated on {q.calibration_samples} training inputs" if q.calibration_samples else "")
            + "; its accuracy and agreement are measured in onnxruntime.",
            "",
            "Exports, each verified against PyTorch before it was kept:",
            "",
        ]
        lines += [f"- `{e.path.name}` ({e.format}, {human_bytes(e.size_bytes)}): max |Δ logit| "
                  f"{e.max_abs_diff:.2g} ≤ {e.tolerance:.2g} on {e.samples_checked} test inputs" for e in self.exports]
        return "\n".join(lines) + "\n"

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": [r.as_dict() for r in self.rows], "threads": self.threads,
            "settings": asdict(self.settings), "test_samples": self.test_samples,
            "exports": [e.as_dict() for e in self.exports], "quantization": self.quantization.as_dict(),
        }


HEADERS = ("model", "network", "test acc", "agreement", "KL", "params", "artefact", "size",
           "PyTorch b=1 median / p90", "PyTorch b=256", "ORT b=1 median / p90", "ORT b=256", "threads",
           "speed-up", "size ratio")


def _cells(row: CardRow, folder: Path) -> list[str]:
    artefact = row.artefact.relative_to(folder) if row.artefact.is_relative_to(folder) else row.artefact

    def speed(s: Speed | None) -> list[str]:
        if s is None:
            return [NOT_MEASURED, NOT_MEASURED]
        return [f"{s.latency.median_ms:.3f} / {s.latency.p90_ms:.3f} ms", f"{s.images_per_second:,.0f} img/s"]

    return [row.label, row.network, f"{100 * row.test_accuracy:.2f} %", f"{100 * row.agreement:.2f} %",
            f"{row.kl_to_teacher:.4f}", f"{row.parameters:,}", str(artefact), human_bytes(row.artefact_bytes),
            *speed(row.pytorch), *speed(row.onnxruntime), str(row.onnxruntime.threads),
            f"{row.speedup:.2f}×", f"{row.size_ratio:.2f}×"]


def build_card(models: Sequence[CardInput], test_inputs: Tensor, test_labels: Tensor, teacher_logits: Tensor | None,
               out_dir: str | Path, threads: int, calibration: Tensor | None, *,
               settings: SpeedSettings = DEFAULT_SPEED_SETTINGS, quantize_mode: QuantizeMode = "auto",
               verify_samples: int = 1000, batch_size: int = 256) -> Card:
    """Export, quantise and measure the three networks of ``models`` (one per role); write and return the card.

    ``test_inputs``/``test_labels``: the test split, normalised as the models expect (every
    measurement uses it; exports are verified on its first ``verify_samples``). ``teacher_logits``:
    the teacher's logits on it (computed here if None). ``calibration``: training inputs for static
    int8 (see :func:`~distillery.deploy.quantize.quantize_onnx`). ``threads``: for every timing.
    ``settings``: how many calls each timing makes (small in tests). Files go to ``out_dir``:
    ``<role>.onnx``, ``<student role>.safetensors``, ``student_distilled.int8.onnx``, ``card.md``,
    ``card.json`` and ``accuracy_latency.png``.
    """
    by_role = _by_role(models)
    out_dir = Path(out_dir)
    inputs, labels = test_inputs.detach().cpu().float(), test_labels.detach().cpu()
    if len(inputs) != len(labels) or len(inputs) == 0:
        raise ValueError(f"the test split needs as many labels as inputs (> 0), got {len(inputs)} and {len(labels)}")
    if teacher_logits is None:
        teacher_logits = model_logits(by_role["teacher"].model, inputs, batch_size)
    teacher_logits = teacher_logits.detach().cpu().float()
    if len(teacher_logits) != len(inputs):
        raise ValueError(f"teacher_logits has {len(teacher_logits)} rows for {len(inputs)} test inputs")
    fidelity = _Fidelity(inputs, labels, teacher_logits, batch_size)
    exports, rows = [], []
    for role in ROLES:
        item = by_role[role]
        onnx_export = export_model(item.model, inputs[:2], out_dir / f"{role}.onnx", "onnx", verify_inputs=inputs,
                                   max_samples=verify_samples)
        exports.append(onnx_export)
        if role != "teacher":
            exports.append(export_model(item.model, inputs[:2], out_dir / f"{role}.safetensors", "safetensors",
                                        verify_inputs=inputs, max_samples=verify_samples,
                                        metadata={"role": role, "network": item.network, "model": dict(item.spec)}))
        rows.append(_float_row(item, onnx_export, fidelity, threads, settings))
    quantization = quantize_onnx(out_dir / "student_distilled.onnx", out_dir / "student_distilled.int8.onnx",
                                 quantize_mode, calibration)
    rows.append(_int8_row(by_role["student_distilled"], quantization, fidelity, threads, settings))
    card = Card(_with_ratios(rows), threads, settings, len(inputs), exports, quantization,
                out_dir / "card.md", out_dir / "card.json", out_dir / "accuracy_latency.png")
    atomic_write(card.markdown_path, card.markdown())
    atomic_write(card.json_path, json.dumps(card.as_dict(), indent=2))
    plot_accuracy_latency(card.rows, card.plot_path)
    return card


def plot_accuracy_latency(rows: Sequence[CardRow], path: str | Path) -> Path:
    """Test accuracy against batch-1 median latency, one point per model (filled: onnxruntime,
    hollow: PyTorch). Returns the PNG's path."""
    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, row in enumerate(rows):
        colour = f"C{k}"
        ax.scatter(row.onnxruntime.latency.median_ms, 100 * row.test_accuracy, color=colour, s=50,
                   label=f"{row.label} (onnxruntime)")
        if row.pytorch is not None:
            ax.scatter(row.pytorch.latency.median_ms, 100 * row.test_accuracy, facecolors="none",
                       edgecolors=colour, s=50, label=f"{row.label} (PyTorch)")
    ax.set(xscale="log", xlabel="latency at batch 1, median (ms, log scale)", ylabel="test accuracy (%)",
           title="accuracy against latency")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


@dataclass(frozen=True)
class _Fidelity:
    """The test split and the teacher's logits on it: what every model's logits are scored against."""

    inputs: Tensor
    labels: Tensor
    teacher_logits: Tensor
    batch_size: int

    def scores(self, logits: Tensor) -> dict[str, float]:
        return {"test_accuracy": top1_accuracy(logits, self.labels),
                "agreement": top1_agreement(self.teacher_logits, logits),
                "kl_to_teacher": mean_kl(self.teacher_logits, logits)}


def _by_role(models: Sequence[CardInput]) -> dict[str, CardInput]:
    roles = [m.role for m in models]
    if sorted(roles) != sorted(ROLES):
        raise ValueError(f"the card needs exactly one model per role {', '.join(ROLES)}; got roles {roles}")
    return {m.role: m for m in models}


def _float_row(item: CardInput, onnx_export: ExportResult, fidelity: _Fidelity, threads: int,
               settings: SpeedSettings) -> CardRow:
    cpu_model = copy.deepcopy(item.model).cpu().eval()
    logits = model_logits(cpu_model, fidelity.inputs, fidelity.batch_size)
    session = onnx_session(onnx_export.path, threads)
    return CardRow(LABELS[item.role], item.network, **fidelity.scores(logits), parameters=count_parameters(cpu_model),
                   artefact=onnx_export.path, artefact_bytes=onnx_export.size_bytes,
                   pytorch=torch_speed(cpu_model, fidelity.inputs, threads, settings),
                   onnxruntime=onnx_speed(session, fidelity.inputs, settings))


def _int8_row(item: CardInput, quantization: QuantizeResult, fidelity: _Fidelity, threads: int,
              settings: SpeedSettings) -> CardRow:
    session = onnx_session(quantization.path, threads)
    logits = batched(session_call(session), fidelity.inputs, [fidelity.batch_size])
    return CardRow(INT8_LABEL, f"{item.network}, int8 {quantization.mode}", **fidelity.scores(logits),
                   parameters=count_parameters(item.model), artefact=quantization.path,
                   artefact_bytes=quantization.size_bytes, pytorch=None,
                   onnxruntime=onnx_speed(session, fidelity.inputs, settings))


def _with_ratios(rows: list[CardRow]) -> list[CardRow]:
    """The rows with speed-up and size ratio against the first (the teacher's)."""
    teacher = rows[0]
    return [replace(r, speedup=teacher.onnxruntime.latency.median_ms / r.onnxruntime.latency.median_ms,
                    size_ratio=teacher.artefact_bytes / r.artefact_bytes) for r in rows]
