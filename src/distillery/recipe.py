"""The YAML recipe: its schema, loading with ``--set`` overrides, and the runs it describes.

A recipe names a teacher, a student and the distillation stages; :func:`recipe_runs` turns it into
the :class:`~distillery.spec.RunSpec` of each network the main job trains (the teacher, the
student alone, the distilled student and any earlier generations). Each stage's ``method`` section
is validated once, here, against the discriminated union of the registered methods' parameters.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator

from distillery.config import (
    ConfigError,
    DataConfig,
    IdxData,
    LoggingConfig,
    Section,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
    TuneConfig,
    apply_override,
    data_source,
    default_recipe,
    format_errors,
    read_yaml_mapping,
    resolve_recipe,
)
from distillery.methods import METHODS, MethodParams, MethodSpec, method_class
from distillery.methods.registry import with_preset
from distillery.spec import CacheSpec, DataSpec, RunSpec, StageSpec, TeacherRef

ROLES = ("teacher", "student_alone", "student_distilled")


class StageConfig(Section):
    method: MethodSpec = Field(default_factory=lambda: METHODS["hinton"].Params(),
                               description="the method: its name and its parameters (see `distillery methods`)")
    train: TrainConfig | None = Field(None, description="defaults to student.train")


class DistillConfig(Section):
    stages: list[StageConfig] = Field(default_factory=lambda: [StageConfig()], min_length=1)
    generations: int = Field(1, ge=1, le=100, description="repeat the distillation, generation k's student "
                                                          "teaching generation k+1 (Tf-KD_self, born-again networks)")


class RunConfig(Section):
    name: str = Field("run", description="run name: outputs go to <output_dir>/<name>/")
    output_dir: str = "runs"
    seed: int = 0
    device: str = Field("cpu", description="cpu, cuda, cuda:N or mps")
    deterministic: bool = Field(False, description="use only deterministic kernels (slower on CUDA)")
    amp: bool = Field(False, description="mixed precision (CUDA only; ignored elsewhere)")
    sync_batchnorm: bool = Field(False, description="under torchrun on CUDA, normalise BatchNorm over the global "
                                 "batch (SyncBatchNorm) instead of each process's share")
    data: DataConfig = Field(default_factory=IdxData, description="where the data come from: source idx (default), "
                                                                 "arrays, image_folder or python, and subsets")
    teacher: TeacherConfig
    student: StudentConfig
    distill: DistillConfig = Field(default_factory=DistillConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    tune: TuneConfig | None = Field(None, description="what `distillery tune` searches (see docs); other commands "
                                                      "ignore it")

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        base = value.split(":")[0]
        if base not in ("cpu", "cuda", "mps"):
            raise ValueError(f"device must be cpu, cuda, cuda:N or mps, got {value!r}")
        return value

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not value or "/" in value or value in (".", "..") or not value.isprintable():
            raise ValueError(f"name must be a plain folder name (printable, without '/'), got {value!r}")
        return value

    @property
    def teaches_itself(self) -> bool:
        """Tf-KD_self: the teacher is the student's own architecture trained alone."""
        return any(s.method.name == "tfkd_self" for s in self.distill.stages)

    @property
    def needs_teacher(self) -> bool:
        """Whether any distillation stage reads a teacher network (tfkd_reg, label_smoothing, ce do not)."""
        return any(method_class(s.method.name).needs_teacher for s in self.distill.stages)


# ---------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML file (or the shipped default recipe), apply ``key=value`` overrides, validate."""
    path = resolve_recipe(path) if path is not None else default_recipe()
    raw = read_yaml_mapping(path)
    for item in overrides:
        apply_override(raw, item)
    return validate_config(raw, source=str(path))


def validate_config(raw: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate the whole recipe, each stage's method parameters against that method's own schema."""
    stages = raw.get("distill", {}).get("stages") if isinstance(raw.get("distill"), dict) else None
    for i, stage in enumerate(stages if isinstance(stages, list) else []):
        if isinstance(stage, dict) and isinstance(stage.get("method", {}), dict):
            stage["method"] = _method_params(dict(stage.get("method", {})), f"distill.stages.{i}.method", source)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_errors(err, section=source, schema=RunConfig)) from None


def _method_params(section: dict[str, Any], where: str, source: str) -> MethodParams:
    """A stage's ``method`` section as the named method's parameters (``hinton`` when unnamed)."""
    section.setdefault("name", "hinton")
    try:
        cls = method_class(section["name"])
    except ValueError as err:
        raise ConfigError(f"{source}: invalid configuration\n  {where}.name: {err}") from None
    try:
        section = with_preset(cls, section)
    except ValueError as err:
        raise ConfigError(f"{source}: invalid configuration\n  {where}.preset: {err}") from None
    try:
        return cls.Params.model_validate(section)
    except ValidationError as err:
        raise ConfigError(format_errors(err, section=f"{source} (method {cls.name!r})", schema=cls.Params,
                                        prefix=f"{where}.")) from None


def method_default_stages(method: str, path: str | Path | None, overrides: list[str] | tuple[str, ...]) -> str:
    """``--method NAME`` as an override of ``distill.stages`` for the recipe file at ``path`` (see
    :func:`method_stages_override`)."""
    source = resolve_recipe(path) if path is not None else default_recipe()
    return method_stages_override(method, read_yaml_mapping(source), overrides, str(source))


def method_stages_override(method: str, raw: Mapping[str, Any], overrides: Sequence[str], source: str) -> str:
    """``distill.stages=…`` for ``method``'s default stages; a stage's partial ``train`` (a smaller
    stage-1 learning rate) is laid over ``student.train`` of the recipe ``raw`` with ``overrides``."""
    stages = method_class(method).default_stages()
    if any("train" in stage for stage in stages):
        probe = copy.deepcopy(dict(raw))
        plain = [{k: v for k, v in stage.items() if k != "train"} for stage in stages]
        for item in ["distill.stages=" + json.dumps(plain), *overrides]:
            apply_override(probe, item)
        base = validate_config(probe, source).student.train.model_dump(mode="json")
        stages = [{**stage, "train": _merged(base, stage["train"])} if "train" in stage else stage
                  for stage in stages]
    return "distill.stages=" + json.dumps(stages)


def _merged(base: dict, changes: dict) -> dict:
    out = dict(base)
    for key, value in changes.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# ---------------------------------------------------------------- the runs a recipe describes


@dataclass(frozen=True)
class RecipeRuns:
    """The networks of the main job: the teacher (a run, or a checkpoint file), the student alone,
    and the distilled student (``generations`` holds every generation, the last being ``distilled``)."""

    teacher: TeacherRef
    alone: RunSpec
    generations: tuple[RunSpec, ...]
    teacher_run: RunSpec | None  # the configured teacher's own run (None: teacher.checkpoint names it)

    @property
    def distilled(self) -> RunSpec:
        return self.generations[-1]


def recipe_runs(config: RunConfig) -> RecipeRuns:
    """The :class:`RunSpec` of each network ``config`` describes, each in ``<output_dir>/<name>/<role>``."""
    def run(role: str, model: Any, stages: tuple[StageSpec, ...], teachers: tuple[TeacherRef, ...] = ()) -> RunSpec:
        return RunSpec(role, model, stages, data, config.seed, teachers,
                       folder=str(Path(config.output_dir) / config.name / role), **how)

    data = DataSpec(train_size=config.data.train_subset, test_size=config.data.test_subset, split_seed=config.seed,
                    test_seed=config.seed, source=data_source(config.data))
    how = {"device": config.device, "amp": config.amp, "deterministic": config.deterministic,
           "sync_batchnorm": config.sync_batchnorm, "eval_batch_size": config.data.eval_batch_size,
           "tensorboard": config.logging.tensorboard,
           "cache": CacheSpec(_text(teacher_cache_dir(config)), config.teacher.cache_max_mb,
                              **config.teacher.store_options())}
    ce = METHODS["ce"].Params()
    alone = run("student_alone", config.student.model, (StageSpec(ce, config.student.train),))
    teacher_run = None if config.teacher.checkpoint else run(
        "teacher", config.teacher.model, (StageSpec(ce, config.teacher.train),))
    teacher = _teacher_ref(config, teacher_run, alone)
    stages = tuple(StageSpec(s.method, s.train or config.student.train) for s in config.distill.stages)
    extra = tuple(TeacherRef(checkpoint=path) for path in config.teacher.ensemble)
    current: tuple[TeacherRef, ...] = (teacher, *extra) if config.needs_teacher else ()
    generations: list[RunSpec] = []
    for k in range(1, config.distill.generations + 1):
        role = "student_distilled" if k == config.distill.generations else f"student_distilled_gen{k}"
        generations.append(run(role, config.student.model, stages, current))
        if current and k < config.distill.generations:
            current = (TeacherRef(run=generations[-1]),)
        elif not current and config.distill.generations > 1:
            raise ConfigError(f"distill.generations = {config.distill.generations} needs a method with a teacher "
                              f"(each generation teaches the next); got {[s.method.name for s in stages]}")
    return RecipeRuns(teacher, alone, tuple(generations), teacher_run)


def _teacher_ref(config: RunConfig, teacher_run: RunSpec | None, alone: RunSpec) -> TeacherRef:
    """``teacher.checkpoint`` if given; else the student alone for Tf-KD_self, else the teacher run."""
    if config.teacher.checkpoint:
        # Tf-KD_self's teacher is a trained copy of the student: its weights fit the student's network.
        model = config.student.model if config.teaches_itself else config.teacher.model
        return TeacherRef(checkpoint=config.teacher.checkpoint, model=model)
    return TeacherRef(run=alone if config.teaches_itself else teacher_run)


def _text(path: Path | None) -> str | None:
    return None if path is None else str(path)


def teacher_cache_dir(config: RunConfig) -> Path | None:
    """Where the teacher-output cache lives, or None when ``teacher.cache`` is off."""
    if config.teacher.cache == "off":
        return None
    return Path(config.teacher.cache_dir) if config.teacher.cache_dir else Path(config.output_dir) / "cache"


__all__ = ["ROLES", "DistillConfig", "MethodParams", "RecipeRuns", "RunConfig", "StageConfig", "load_config",
           "method_default_stages", "method_stages_override", "recipe_runs", "teacher_cache_dir", "validate_config"]
