"""The jobs the CLI runs, built from a validated config: train, distill, evaluate, and the main job.

Each trained network lives in its own folder under ``<output_dir>/<name>/`` (``teacher``,
``student_alone``, ``student_distilled``) holding ``checkpoint.pt`` and ``metrics.jsonl``. A folder
that already holds a finished run of the same settings is reused; an unfinished one is continued
with ``resume``; one made from other settings is never overwritten unless asked.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distillery.config import ModelConfig, RunConfig, TrainConfig, fingerprint
from distillery.data import ImageDataset, load_idx_dataset
from distillery.methods import Teacher, create_method
from distillery.methods.cross_entropy import CrossEntropy
from distillery.models import create_model
from distillery.report import (
    ModelRow,
    count_parameters,
    latency_ms,
    markdown_table,
    plot_learning_curves,
    size_on_disk,
    text_table,
    throughput,
)
from distillery.train import Stage, Trainer, evaluate, load_checkpoint, resolve_device, seed_everything
from distillery.train.checkpoint import CheckpointError, load_model_state, load_weights
from distillery.train.loop import CHECKPOINT_NAME

ROLES = ("teacher", "student_alone", "student_distilled")


class RunFolderError(ValueError):
    """An output folder holds a run that must not be silently reused or overwritten."""


@dataclass
class TrainedModel:
    role: str
    model: nn.Module
    history: list[dict[str, Any]]
    run_dir: Path | None
    model_config: ModelConfig


def load_data(config: RunConfig) -> tuple[ImageDataset, ImageDataset]:
    d = config.data
    train = load_idx_dataset(d.dataset, "train", d.root).subset(d.train_subset, seed=config.seed)
    test = load_idx_dataset(d.dataset, "test", d.root).subset(d.test_subset, seed=config.seed)
    return train, test


def build_model(spec: ModelConfig, data: ImageDataset) -> nn.Module:
    return create_model(spec.name, in_channels=data.in_channels, num_classes=data.num_classes,
                        input_size=data.input_size, **spec.kwargs)


def load_trained_model(path: str | Path, spec: ModelConfig | None, data: ImageDataset) -> tuple[nn.Module, ModelConfig]:
    """A network from a distillery checkpoint (built from its own model spec unless ``spec`` is
    given) or from a plain ``state_dict`` file (``spec`` required)."""
    weights, meta = load_weights(path)
    if spec is None:
        if meta is None:
            raise CheckpointError(f"{path}: a plain state_dict needs the model named in the config")
        spec = ModelConfig.model_validate(meta["model"])
    model = build_model(spec, data)
    load_model_state(model, weights, str(path))
    return model, spec


def prepare_run_dir(run_dir: Path, key: str, *, resume: bool, overwrite: bool) -> str:
    """Decide what to do with ``run_dir``: 'new', 'reuse' (finished, same settings) or 'resume'."""
    path = run_dir / CHECKPOINT_NAME
    if not path.exists():
        if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
            raise RunFolderError(f"{run_dir} exists and holds files but no checkpoint; pass --overwrite "
                                 "to move it aside, or choose another --set name=...")
        return "new"
    state = load_checkpoint(path)
    same = state.get("meta", {}).get("fingerprint") == key
    if same and state.get("complete"):
        return "reuse"
    if same and resume:
        return "resume"
    if not overwrite:
        what = "an unfinished run of these settings" if same else "a run made from other settings"
        advice = "pass --resume to continue it, or " if same else ""
        raise RunFolderError(f"{run_dir} holds {what}; {advice}pass --overwrite to move it aside and start "
                             "again, or choose another --set name=...")
    backup = run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    shutil.move(str(run_dir), backup)
    return "new"


def train_model(
    config: RunConfig,
    role: str,
    model_config: ModelConfig,
    stages_spec: list[tuple[str, dict[str, Any], TrainConfig]],
    data: tuple[ImageDataset, ImageDataset],
    *,
    teacher: Teacher | None = None,
    teacher_key: str = "",
    teacher_cache: Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> TrainedModel:
    """Train one network in ``<output_dir>/<name>/<role>`` through the given (method, params, train) stages."""
    train_data, test_data = data
    run_dir = Path(config.output_dir) / config.name / role
    key = fingerprint({
        "model": model_config.model_dump(mode="json"),
        "stages": [[name, params, train.model_dump(mode="json")] for name, params, train in stages_spec],
        "data": config.data.model_dump(mode="json"),
        "seed": config.seed,
        "teacher": teacher_key,
    })
    action = prepare_run_dir(run_dir, key, resume=resume, overwrite=overwrite)
    device = resolve_device(config.device)
    seed_everything(config.seed, config.deterministic)
    model = build_model(model_config, train_data)
    stages = [Stage(create_method(name, **params), train) for name, params, train in stages_spec]
    trainer = Trainer(
        model, train_data, test_data, stages, teacher=teacher, teacher_cache=teacher_cache, run_dir=run_dir,
        device=device, seed=config.seed, amp=config.amp, eval_batch_size=config.data.eval_batch_size, label=role,
        progress=progress,
        meta={"model": model_config.model_dump(mode="json"), "fingerprint": key, "role": role,
              "dataset": config.data.dataset, "num_classes": train_data.num_classes},
    )
    history = trainer.fit(resume=action in ("reuse", "resume"))
    model.eval()
    return TrainedModel(role, model, history, run_dir, model_config)


def get_teacher(config: RunConfig, data: tuple[ImageDataset, ImageDataset], *, resume: bool = False,
                overwrite: bool = False, progress: bool = True) -> tuple[TrainedModel, str]:
    """The teacher: loaded from ``teacher.checkpoint`` if given, else trained (or reused) in its folder.

    Returns the trained teacher and a key identifying it (for the students' fingerprints).
    """
    if config.teacher.checkpoint:
        model, spec = load_trained_model(config.teacher.checkpoint, config.teacher.model, data[0])
        model.to(resolve_device(config.device)).eval()
        key = fingerprint({"checkpoint": str(Path(config.teacher.checkpoint).resolve()),
                           "mtime": Path(config.teacher.checkpoint).stat().st_mtime})
        return TrainedModel("teacher", model, [], None, spec), key
    stages = [("ce", {}, config.teacher.train)]
    trained = train_model(config, "teacher", config.teacher.model, stages, data, resume=resume,
                          overwrite=overwrite, progress=progress)
    return trained, fingerprint({"teacher_run": str(trained.run_dir), "history": trained.history[-1:]})


def train_student_alone(config: RunConfig, data: tuple[ImageDataset, ImageDataset], **kwargs: Any) -> TrainedModel:
    stages = [(CrossEntropy.name, {}, config.student.train)]
    return train_model(config, "student_alone", config.student.model, stages, data, **kwargs)


def distill_student(config: RunConfig, data: tuple[ImageDataset, ImageDataset], teacher: TrainedModel,
                    teacher_key: str, **kwargs: Any) -> TrainedModel:
    stages = [(s.method.name, s.method.params, s.train or config.student.train) for s in config.distill.stages]
    return train_model(config, "student_distilled", config.student.model, stages, data,
                       teacher=Teacher(teacher.model), teacher_key=teacher_key,
                       teacher_cache=teacher_cache_dir(config), **kwargs)


def teacher_cache_dir(config: RunConfig) -> Path | None:
    """Where the teacher-output cache lives, or None when ``teacher.cache`` is off."""
    if config.teacher.cache == "off":
        return None
    return Path(config.teacher.cache_dir) if config.teacher.cache_dir else Path(config.output_dir) / "cache"


@dataclass
class MainJobResult:
    rows: list[ModelRow]
    report_path: Path
    plot_path: Path
    table_text: str

    @property
    def gain(self) -> float:
        """Distilled minus alone test accuracy (a fraction; ×100 for points)."""
        by_role = {r.role: r.test_accuracy for r in self.rows}
        return by_role["student distilled"] - by_role["student alone"]


def run_main_job(config: RunConfig, *, resume: bool = False, overwrite: bool = False,
                 progress: bool = True) -> MainJobResult:
    """Teacher (trained or reused), student alone, student distilled; then one comparison table.

    Writes ``report.md``, ``results.json`` and ``learning_curves.png`` under ``<output_dir>/<name>/``.
    """
    started = time.perf_counter()
    data = load_data(config)
    common = {"resume": resume, "overwrite": overwrite, "progress": progress}
    teacher, teacher_key = get_teacher(config, data, **common)
    alone = train_student_alone(config, data, **common)
    distilled = distill_student(config, data, teacher, teacher_key, **common)
    device = resolve_device(config.device)
    test = data[1]
    input_shape = tuple(test.images.shape[1:])
    rows = []
    for label, trained in (("teacher", teacher), ("student alone", alone), ("student distilled", distilled)):
        accuracy = evaluate(trained.model, test, config.data.eval_batch_size, device)["accuracy"]
        cpu_model = copy.deepcopy(trained.model).cpu()
        rows.append(ModelRow(
            role=label, model=_describe(trained.model_config), test_accuracy=accuracy,
            parameters=count_parameters(cpu_model), size_bytes=size_on_disk(cpu_model),
            latency_ms_b1=latency_ms(cpu_model, input_shape), throughput_b256=throughput(cpu_model, input_shape),
        ))
    out = Path(config.output_dir) / config.name
    plot_path = plot_learning_curves(
        {"teacher": teacher.history, "student alone": alone.history, "student distilled": distilled.history},
        out / "learning_curves.png", title=f"{config.name}: {config.data.dataset}",
    )
    methods = " → ".join(f"{s.method.name} {s.method.params}" for s in config.distill.stages)
    gain = 100 * (rows[2].test_accuracy - rows[1].test_accuracy)
    report = (
        f"# {config.name}\n\n"
        f"Dataset: {config.data.dataset} ({len(data[0])} training, {len(test)} test images); seed {config.seed}; "
        f"method: {methods}.\n\n"
        f"{markdown_table(rows)}\n"
        f"Distilled minus alone: {gain:+.2f} points. Latency and throughput: CPU, "
        f"{torch.get_num_threads()} threads, eval mode.\n\n![learning curves](learning_curves.png)\n"
    )
    report_path = out / "report.md"
    report_path.write_text(report)
    (out / "results.json").write_text(json.dumps({
        "config": config.model_dump(mode="json"), "rows": [r.as_dict() for r in rows],
        "gain_points": gain, "seconds": time.perf_counter() - started,
    }, indent=2))
    return MainJobResult(rows, report_path, plot_path, text_table(rows))


def _describe(spec: ModelConfig) -> str:
    args = ", ".join(f"{k}={v}" for k, v in spec.kwargs.items())
    return f"{spec.name}({args})" if args else spec.name
