"""The jobs behind the CLI commands, each built from a validated recipe: train, distill, eval, the main job.

Each trained network lives in its own folder under ``<output_dir>/<name>/`` (``teacher``,
``student_alone``, ``student_distilled``) holding ``checkpoint.pt`` and ``metrics.jsonl``; the
:class:`~distillery.runner.Runner` reuses, continues or refuses each folder.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from distillery.config import ConfigError, ModelConfig, describe_data, describe_model
from distillery.data import BatchLoader, ImageDataset
from distillery.deploy import (
    Card,
    CardInput,
    CardRow,
    ExportResult,
    QuantizeResult,
    build_card,
    export_model,
    model_logits,
    onnx_accuracy,
    quantize_onnx,
    top1_accuracy,
)
from distillery.fsio import atomic_write
from distillery.models.registry import CodePolicy
from distillery.networks import load_trained_model
from distillery.recipe import RunConfig, recipe_runs
from distillery.report import (
    ModelRow,
    markdown_table,
    plot_learning_curves,
    size_on_disk,
    text_table,
)
from distillery.runner import Runner, TrainedModel
from distillery.spec import RunSpec
from distillery.train import distributed, evaluate, evaluate_ensemble, resolve_device
from distillery.train.loop import CHECKPOINT_NAME


@dataclass(frozen=True)
class JobOptions:
    """How a job treats existing run folders, whether it shows progress, and which user code
    (``package.module:callable`` models) the user consented to (``--allow-code``)."""

    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    allow_code: CodePolicy = CodePolicy()


def make_runner(options: JobOptions) -> Runner:
    return Runner(resume=options.resume, overwrite=options.overwrite, progress=options.progress,
                  allow_code=options.allow_code)


def train_job(config: RunConfig, role: str, options: JobOptions = JobOptions()) -> TrainedModel:
    """``distillery train``: the teacher (``role`` "teacher") or the student alone ("student")."""
    runs = recipe_runs(config)
    runner = make_runner(options)
    if role == "student":
        return runner.train(runs.alone)
    if runs.teacher.run is None:  # teacher.checkpoint names a trained teacher: nothing to train
        raise ValueError(f"teacher.checkpoint is set ({runs.teacher.checkpoint}): that teacher is trained already")
    return runner.train(runs.teacher.run)


def distill_job(config: RunConfig, options: JobOptions = JobOptions()) -> TrainedModel:
    """``distillery distill``: the distilled student (its teachers trained or reused first)."""
    runs = recipe_runs(config)
    teacher = runs.teacher.run
    if teacher is not None and teacher is runs.teacher_run and runs.distilled.teachers:
        checkpoint = Path(teacher.folder) / CHECKPOINT_NAME
        if not checkpoint.exists():
            raise ConfigError(f"distill needs a teacher: pass --teacher CHECKPOINT, set teacher.checkpoint, or train "
                              f"one first with `distillery train --role teacher` (looked for {checkpoint})")
    return make_runner(options).train(runs.distilled)


@dataclass
class EvalRow:
    path: str
    model: str
    accuracy: float
    loss: float


def eval_job(config: RunConfig, checkpoints: Sequence[str], ensemble: bool = False,
             options: JobOptions = JobOptions()) -> list[EvalRow]:
    """``distillery eval``: each checkpoint on the recipe's test set (and their ensemble if asked)."""
    runs = recipe_runs(config)
    test = make_runner(JobOptions()).data.test(runs.alone.data)
    device = resolve_device(config.device)
    trusted = {config.teacher.model.name, config.student.model.name}
    models = []
    for path in checkpoints:
        model, spec = load_trained_model(path, None, test, trusted_models=trusted, allow_code=options.allow_code)
        models.append((path, spec.name, model.to(device)))
    batch = config.data.eval_batch_size
    if not ensemble:
        return [EvalRow(path, name, *evaluate(model, test, batch, device).values()) for path, name, model in models]
    result = evaluate_ensemble([m for _, _, m in models], test, batch, device)
    rows = [EvalRow(path, name, m["accuracy"], m["loss"]) for (path, name, _), m in zip(models, result["members"])]
    rows.append(EvalRow(f"ensemble of {len(models)} (averaged probabilities)", "ensemble",
                        result["ensemble"]["accuracy"], result["ensemble"]["loss"]))
    return rows


SUFFIXES = {"onnx": ".onnx", "safetensors": ".safetensors", "torchscript": ".torchscript.pt"}


@dataclass
class ExportJobResult:
    export: ExportResult
    int8: QuantizeResult | None
    int8_accuracy: float | None
    accuracy: float


def export_job(config: RunConfig, checkpoint: str, fmt: str, output: str | None, int8: str | None,
               options: JobOptions = JobOptions()) -> ExportJobResult:
    """``distillery export``: the student of ``checkpoint`` alone, verified against PyTorch on up to
    1,000 test inputs, to ONNX, safetensors or TorchScript; with ``int8`` also an int8 ONNX copy
    (calibrated on 500 training inputs) whose test accuracy is measured."""
    runs = recipe_runs(config)
    data = make_runner(JobOptions()).data
    train, test = data.pair(runs.alone.data)
    trusted = {config.teacher.model.name, config.student.model.name}
    model, spec = load_trained_model(checkpoint, None, test, trusted_models=trusted, allow_code=options.allow_code)
    inputs = next(BatchLoader(test, len(test)).epoch(0))
    path = Path(output) if output else Path(checkpoint).with_suffix(SUFFIXES[fmt])
    meta = {"model": spec.model_dump(mode="json"), "num_classes": test.num_classes}
    result = export_model(model, inputs.inputs[:2], path, fmt, verify_inputs=inputs.inputs[:1000],
                          metadata=meta if fmt == "safetensors" else None)
    accuracy = top1_accuracy(model_logits(model, inputs.inputs), inputs.targets)
    if int8 is None:
        return ExportJobResult(result, None, None, accuracy)
    if fmt != "onnx":
        raise ConfigError(f"--int8 quantises the ONNX export; use --format onnx (got {fmt})")
    calibration = next(BatchLoader(train.subset(500, seed=config.seed), 500).epoch(0)).inputs
    quantized = quantize_onnx(path, path.with_suffix(".int8.onnx"), int8, calibration=calibration)
    int8_accuracy = onnx_accuracy(quantized.path, inputs.inputs, inputs.targets)
    return ExportJobResult(result, quantized, int8_accuracy, accuracy)


@dataclass
class MainJobResult:
    rows: list[ModelRow]
    report_path: Path
    plot_path: Path
    table_text: str
    seconds: float
    card: Card | None = None

    @property
    def gain(self) -> float:
        """Distilled minus alone test accuracy (a fraction; ×100 for points)."""
        by_role = {r.role: r.test_accuracy for r in self.rows}
        return by_role["student distilled"] - by_role["student alone"]


def run_main_job(config: RunConfig, options: JobOptions = JobOptions()) -> MainJobResult | None:
    """Teacher (trained or reused), student alone, student distilled; then one comparison table.

    Writes ``report.md``, ``results.json`` and ``learning_curves.png`` under ``<output_dir>/<name>/``.
    Under torchrun all ranks train; rank 0 alone measures and writes the report (others return None).
    """
    started = time.perf_counter()
    runs = recipe_runs(config)
    runner = make_runner(options)
    phases = [spec for spec in (runs.teacher_run, runs.alone, *runs.generations) if spec is not None]
    trained = {}
    for i, spec in enumerate(phases, start=1):
        runner.echo(f"== {spec.label.replace('_', ' ')}, {i} of {len(phases)}")
        trained[spec.label] = runner.train(spec)
    train, test = runner.data.pair(runs.alone.data)
    if runs.teacher_run is not None:
        teacher = trained[runs.teacher_run.label]
    else:  # teacher.checkpoint names a trained teacher
        teacher = TrainedModel(runs.alone, runner.teacher_model(runs.teacher, train), [], None)
    alone, distilled = trained[runs.alone.label], trained[runs.distilled.label]
    if not distributed.current().is_main:
        return None
    out = Path(config.output_dir) / config.name
    plot_path = plot_learning_curves(
        {"teacher": teacher.history, "student alone": alone.history, "student distilled": distilled.history},
        out / "learning_curves.png", title=f"{config.name}: {describe_data(config.data)}",
    )
    networks = (("teacher", teacher.model, config.teacher.model), ("student_alone", alone.model, config.student.model),
                ("student_distilled", distilled.model, config.student.model))
    card = _deployment_card(config, train, test, out, networks)
    # the card measured each network once (accuracy, parameters, PyTorch speed); the table reads its rows
    rows = [_table_row(row, model) for row, (_, model, _) in zip(card.rows, networks)]
    seconds = time.perf_counter() - started
    report_path = _write_report(config, runs.distilled, rows, out, len(train), len(test), seconds, card,
                                {label: trained[label].cost for label in trained})
    return MainJobResult(rows, report_path, plot_path, text_table(rows), seconds, card)


def _deployment_card(config: RunConfig, train: ImageDataset, test: ImageDataset, out: Path,
                     models: tuple[tuple[str, nn.Module, ModelConfig], ...]) -> Card:
    """The compression card of the deployed models (ONNX, safetensors, int8) in ``<out>/deploy``."""
    batch = next(BatchLoader(test, len(test)).epoch(0))
    calibration = next(BatchLoader(train.subset(500, seed=config.seed), 500).epoch(0)).inputs
    inputs = [CardInput(role, copy.deepcopy(model).cpu(), describe_model(spec), spec.model_dump(mode="json"))
              for role, model, spec in models]
    return build_card(inputs, batch.inputs, batch.targets, None, out / "deploy", threads=torch.get_num_threads(),
                      calibration=calibration)


def _table_row(row: CardRow, model: nn.Module) -> ModelRow:
    """A network's line of the main job's table, from its row of the compression card (the same
    measurements in PyTorch: batch 1 latency, batch 256 throughput) and its state_dict's size."""
    assert row.pytorch is not None  # the float networks are measured in PyTorch too
    return ModelRow(
        role=row.label, model=row.network, test_accuracy=row.test_accuracy, parameters=row.parameters,
        size_bytes=size_on_disk(copy.deepcopy(model).cpu()), latency_ms_b1=row.pytorch.latency.median_ms,
        throughput_b256=row.pytorch.throughput.images_per_second,
    )


def _write_report(config: RunConfig, distilled: RunSpec, rows: list[ModelRow], out: Path, n_train: int,
                  n_test: int, seconds: float, card: Card, costs: dict[str, dict | None]) -> Path:
    methods = " → ".join(f"{s.method.name} {s.method.options()}" for s in distilled.stages)
    gain = 100 * (rows[2].test_accuracy - rows[1].test_accuracy)
    report = (
        f"# {config.name}\n\n"
        f"Dataset: {describe_data(config.data)} ({n_train} training, {n_test} test examples); seed {config.seed}; "
        f"method: {methods}.\n\n"
        f"{markdown_table(rows)}\n"
        f"Distilled minus alone: {gain:+.2f} points. Latency and throughput: CPU, "
        f"{torch.get_num_threads()} threads, eval mode.\n\n"
        f"The deployed models (ONNX, safetensors, int8), measured in PyTorch and onnxruntime: "
        f"[deploy/card.md](deploy/card.md).\n\n![learning curves](learning_curves.png)\n"
    )
    report_path = out / "report.md"
    atomic_write(report_path, report)
    atomic_write(out / "results.json", json.dumps({
        "config": config.model_dump(mode="json"), "rows": [r.as_dict() for r in rows],
        "gain_points": gain, "seconds": seconds, "card": card.as_dict(), "cost": costs,
    }, indent=2))
    return report_path
