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
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from distillery.config import ModelConfig, RunConfig, TrainConfig, fingerprint
from distillery.data import ImageDataset, load_idx_dataset
from distillery.methods import Teacher, create_method, method_class
from distillery.methods.cross_entropy import CrossEntropy
from distillery.methods.tfkd import TfKDSelf
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
from distillery.train import Stage, Trainer, distributed, evaluate, load_checkpoint, resolve_device, seed_everything
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


def build_model(spec: ModelConfig, data: ImageDataset, num_classes: int | None = None) -> nn.Module:
    """The network ``spec`` names, sized for ``data`` (``num_classes`` overrides the data's class count)."""
    try:
        return create_model(spec.name, in_channels=data.in_channels, num_classes=num_classes or data.num_classes,
                            input_size=data.input_size, **spec.kwargs)
    except TypeError as err:  # an option the factory does not take, or a missing one
        raise ValueError(f"model {spec.name!r} cannot be built with kwargs {spec.kwargs}: {err}") from None


def load_trained_model(path: str | Path, spec: ModelConfig | None, data: ImageDataset,
                       trusted_models: Collection[str] = ()) -> tuple[nn.Module, ModelConfig]:
    """A network from a distillery checkpoint (built from its own model spec unless ``spec`` is
    given) or from a plain ``state_dict`` file (``spec`` required).

    A spec read from the file may name only a registered model, or a ``package.module:callable``
    listed in ``trusted_models`` (the user's own config): otherwise a tampered file could make us
    import and call any function with arguments of its choosing.

    A distillery checkpoint keeps its own class count, so a teacher trained on another task loads
    as it was trained (feature methods such as fsp and fitnets can use it).
    """
    weights, meta = load_weights(path)
    if spec is None:
        if meta is None:
            raise CheckpointError(f"{path}: a plain state_dict needs the model named in the config")
        try:
            spec = ModelConfig.model_validate(meta["model"])
        except (KeyError, TypeError, ValidationError):
            raise CheckpointError(f"{path}: its model description is missing or malformed") from None
        if ":" in spec.name and spec.name not in trusted_models:
            raise CheckpointError(
                f"{path}: the checkpoint names the user model {spec.name!r}; code named by a file is not imported. "
                "Name the same model in your config (teacher.model or student.model) to allow it."
            )
    model = build_model(spec, data, (meta or {}).get("num_classes"))
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
    teacher_cache_max_mb: float | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    snapshot_epochs: Sequence[float] = (),
) -> TrainedModel:
    """Train one network in ``<output_dir>/<name>/<role>`` through the given (method, params, train) stages.

    ``snapshot_epochs``: also keep the weights after these (possibly fractional) epochs of each stage
    (see :class:`~distillery.train.Trainer`).
    """
    train_data, test_data = data
    run_dir = Path(config.output_dir) / config.name / role
    key = fingerprint({
        "model": model_config.model_dump(mode="json"),
        "stages": [[name, params, train.key_fields()] for name, params, train in stages_spec],
        "data": config.data.model_dump(mode="json"),
        "seed": config.seed,
        "teacher": teacher_key,
        **({"snapshots": list(snapshot_epochs)} if snapshot_epochs else {}),
    })
    device = resolve_device(config.device)  # bad input fails before any folder is touched
    seed_everything(config.seed, config.deterministic)
    model = build_model(model_config, train_data)
    # Distributed: rank 0 alone inspects (and may move aside) the folder; every rank gets its decision.
    action = distributed.current().on_main(lambda: prepare_run_dir(run_dir, key, resume=resume, overwrite=overwrite))
    stages = [Stage(create_method(name, **params), train) for name, params, train in stages_spec]
    trainer = Trainer(
        model, train_data, test_data, stages, teacher=teacher, teacher_cache=teacher_cache,
        teacher_cache_max_mb=teacher_cache_max_mb, run_dir=run_dir,
        device=device, seed=config.seed, amp=config.amp, eval_batch_size=config.data.eval_batch_size, label=role,
        progress=progress, sync_batchnorm=config.sync_batchnorm, snapshot_epochs=snapshot_epochs,
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
        # Tf-KD_self's teacher is a trained copy of the student: its weights fit the student's network.
        spec = config.student.model if teaches_itself(config) else config.teacher.model
        model, spec = load_trained_model(config.teacher.checkpoint, spec, data[0])
        model.to(resolve_device(config.device)).eval()
        key = fingerprint({"checkpoint": str(Path(config.teacher.checkpoint).resolve()),
                           "mtime": Path(config.teacher.checkpoint).stat().st_mtime})
        return TrainedModel("teacher", model, [], None, spec), key
    stages = [("ce", {}, config.teacher.train)]
    trained = train_model(config, "teacher", config.teacher.model, stages, data, resume=resume,
                          overwrite=overwrite, progress=progress)
    return trained, run_key(trained)


def train_student_alone(config: RunConfig, data: tuple[ImageDataset, ImageDataset], **kwargs: Any) -> TrainedModel:
    stages = [(CrossEntropy.name, {}, config.student.train)]
    return train_model(config, "student_alone", config.student.model, stages, data, **kwargs)


def needs_teacher(config: RunConfig) -> bool:
    """Whether any distillation stage reads a teacher network (tfkd_reg, label_smoothing, ce do not)."""
    return any(method_class(s.method.name).needs_teacher for s in config.distill.stages)


def teaches_itself(config: RunConfig) -> bool:
    """Tf-KD_self: the teacher is the student's own architecture trained alone, not the configured teacher.

    The main job always distils from ``student_alone`` then; ``distillery distill`` does unless
    ``--teacher`` names another trained copy of the student.
    """
    return any(s.method.name == TfKDSelf.name for s in config.distill.stages)


def load_ensemble_members(config: RunConfig, data: ImageDataset) -> tuple[list[nn.Module], str]:
    """The extra teacher networks of ``teacher.ensemble`` and a key identifying them."""
    members, files = [], []
    for path in config.teacher.ensemble:
        model, _ = load_trained_model(path, None, data)
        members.append(model.to(resolve_device(config.device)).eval())
        files.append([str(Path(path).resolve()), Path(path).stat().st_mtime])
    return members, fingerprint({"ensemble": files}) if files else ""


def distill_student(config: RunConfig, data: tuple[ImageDataset, ImageDataset], teacher: TrainedModel | None,
                    teacher_key: str, **kwargs: Any) -> TrainedModel:
    """Distil the student through ``distill.stages`` into ``student_distilled``.

    With ``distill.generations`` = G > 1 the distillation repeats: generation k (in
    ``student_distilled_gen{k}``) teaches generation k + 1, and the last lands in
    ``student_distilled``. ``teacher`` may be None when no stage needs one.
    """
    stages = [(s.method.name, s.method.params, s.train or config.student.train) for s in config.distill.stages]
    if not needs_teacher(config):
        teacher, teacher_key = None, ""
    elif teacher is None:
        raise ValueError(f"methods {[s[0] for s in stages]} need a teacher")
    generations = config.distill.generations
    if teacher is None and generations > 1:
        raise ValueError(f"distill.generations = {generations} needs a method with a teacher "
                         f"(each generation teaches the next); got {[s[0] for s in stages]}")
    extra, extra_key = load_ensemble_members(config, data[0]) if teacher is not None else ([], "")
    current, key = teacher, teacher_key + extra_key
    for k in range(1, generations + 1):
        role = "student_distilled" if k == generations else f"student_distilled_gen{k}"
        members = [current.model, *(extra if k == 1 else [])] if current is not None else []
        trained = train_model(config, role, config.student.model, stages, data,
                              teacher=Teacher(members) if members else None, teacher_key=key,
                              teacher_cache=teacher_cache_dir(config),
                              teacher_cache_max_mb=config.teacher.cache_max_mb, **kwargs)
        if current is not None:
            current, key = trained, run_key(trained)
    return trained


def run_key(trained: TrainedModel) -> str:
    """A key identifying a network trained in its run folder (for the fingerprints of its students)."""
    return fingerprint({"teacher_run": str(trained.run_dir), "history": trained.history[-1:]})


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
                 progress: bool = True) -> MainJobResult | None:
    """Teacher (trained or reused), student alone, student distilled; then one comparison table.

    Writes ``report.md``, ``results.json`` and ``learning_curves.png`` under ``<output_dir>/<name>/``.
    Under torchrun all ranks train; rank 0 alone measures and writes the report (others return None).
    """
    started = time.perf_counter()
    data = load_data(config)
    common = {"resume": resume, "overwrite": overwrite, "progress": progress}
    teacher, teacher_key = get_teacher(config, data, **common)
    alone = train_student_alone(config, data, **common)
    if teaches_itself(config):
        distill_from, distill_key = alone, run_key(alone)
    else:
        distill_from, distill_key = teacher, teacher_key
    distilled = distill_student(config, data, distill_from, distill_key, **common)
    if not distributed.current().is_main:
        return None
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
