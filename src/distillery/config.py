"""Run configuration: schemas, YAML loading, ``--set`` overrides and clear error messages.

A config is plain values (no objects are built here). Every section forbids unknown keys, so a
misspelled key fails before any work with a message naming it and the keys allowed there.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from distillery.methods import method_class
from distillery.methods.stored import DEFAULT_MAX_MB


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key and what is allowed."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    """A registered model name (see ``distillery models``) or ``package.module:callable``."""

    name: str
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the model factory")


class OptimizerConfig(Section):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)


class ScheduleConfig(Section):
    """Learning-rate schedule, stepped every iteration; epochs may be fractional in milestones."""

    name: Literal["constant", "step", "cosine"] = "cosine"
    milestones: list[float] = Field(default_factory=list, description="epochs at which 'step' multiplies by gamma")
    gamma: float = Field(0.1, gt=0, le=1)
    warmup_epochs: float = Field(0.0, ge=0, description="linear warm-up from 0 over this many epochs")


class AugmentConfig(Section):
    crop_padding: int = Field(0, ge=0, description="random crop after zero-padding by this many pixels (0 = off)")
    hflip: bool = False


class TrainConfig(Section):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1, description="global batch size: under torchrun each of the N processes "
                            "takes batch_size / N examples per step (must divide evenly)")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    checkpoint_every_steps: int = Field(0, ge=0, description="also checkpoint mid-epoch every N steps (0 = off)")
    grad_clip_norm: float | None = Field(
        None, gt=0, description="rescale the gradients of each step so that their global L2 norm is at most this "
                                "(None: off); tames the first steps of high-temperature distillation")

    # Options added after runs existed: left out of a run's key while off, so those runs still match.
    _KEY_OPTIONAL: ClassVar[tuple[str, ...]] = ("grad_clip_norm",)

    def key_fields(self) -> dict[str, Any]:
        """These settings as they enter a run's fingerprint (see ``_KEY_OPTIONAL``)."""
        data = self.model_dump(mode="json")
        for name in self._KEY_OPTIONAL:
            if data.get(name) is None:
                data.pop(name, None)
        return data


class MethodConfig(Section):
    """``name`` picks the method; the other keys are that method's parameters."""

    model_config = ConfigDict(extra="allow")
    name: str = "hinton"

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class StageConfig(Section):
    method: MethodConfig = Field(default_factory=MethodConfig)
    train: TrainConfig | None = Field(None, description="defaults to student.train")


class DataConfig(Section):
    dataset: Literal["fashion_mnist", "mnist"] = "fashion_mnist"
    root: str | None = Field(None, description="folder with the idx files; the Debian package's folder is the fallback")
    train_subset: int | None = Field(None, ge=1, description="use a random subset of this many training examples")
    test_subset: int | None = Field(None, ge=1)
    eval_batch_size: int = Field(1000, ge=1)


class TeacherConfig(Section):
    model: ModelConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: str | None = Field(None, description="use this trained teacher instead of training one")
    ensemble: list[str] = Field(default_factory=list,
                                description="more trained teacher checkpoints: the teacher becomes the ensemble of "
                                            "the teacher and these (for method 'ensemble')")
    cache: Literal["auto", "off"] = Field(
        "auto", description="auto: store the teacher's outputs once and reuse them wherever that is exact "
                            "(stages without augmentation: logits, and the FSP matrices / FitNets hints of methods "
                            "with store_teacher auto); off: always run it")
    cache_dir: str | None = Field(None, description="folder of the teacher-output cache (default <output_dir>/cache)")
    cache_max_mb: float = Field(DEFAULT_MAX_MB, gt=0, description="largest stored feature target (FSP matrices, "
                                "FitNets hints of all training examples) that cache auto keeps, MB")

    @field_validator("cache", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        """YAML reads a bare ``off`` as false (and ``on`` as true): accept what the user meant."""
        return {False: "off", True: "auto"}.get(value, value) if isinstance(value, bool) else value


class StudentConfig(Section):
    model: ModelConfig
    train: TrainConfig = Field(default_factory=TrainConfig)


class DistillConfig(Section):
    stages: list[StageConfig] = Field(default_factory=lambda: [StageConfig()], min_length=1)
    generations: int = Field(1, ge=1, description="repeat the distillation, generation k's student teaching "
                                                  "generation k+1 (Tf-KD_self, born-again networks)")


class RunConfig(Section):
    name: str = Field("run", description="run name: outputs go to <output_dir>/<name>/")
    output_dir: str = "runs"
    seed: int = 0
    device: str = Field("cpu", description="cpu, cuda, cuda:N or mps")
    deterministic: bool = Field(False, description="use only deterministic kernels (slower on CUDA)")
    amp: bool = Field(False, description="mixed precision (CUDA only; ignored elsewhere)")
    sync_batchnorm: bool = Field(False, description="under torchrun on CUDA, normalise BatchNorm over the global "
                                 "batch (SyncBatchNorm) instead of each process's share")
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig
    student: StudentConfig
    distill: DistillConfig = Field(default_factory=DistillConfig)

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
        if not value or "/" in value or value in (".", ".."):
            raise ValueError(f"name must be a plain folder name, got {value!r}")
        return value


def fingerprint(section: BaseModel | dict) -> str:
    """A short stable hash of a config section, to recognise a run made from the same settings."""
    data = section.model_dump(mode="json") if isinstance(section, BaseModel) else section
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- loading and overrides


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML file (or the shipped default recipe), apply ``key=value`` overrides, validate."""
    path = resolve_recipe(path) if path is not None else default_recipe()
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path} (shipped recipes, usable by name: "
                          f"{', '.join(shipped_recipes())})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    return validate_config(raw, source=str(path))


def validate_config(raw: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate the whole config, then each stage's method parameters against that method's schema."""
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, prefix="", section=source, schema=RunConfig)) from None
    for i, stage in enumerate(config.distill.stages):
        where = f"distill.stages.{i}.method"
        try:
            cls = method_class(stage.method.name)
        except ValueError as err:
            raise ConfigError(f"{source}: invalid configuration\n  {where}.name: {err}") from None
        try:
            cls.Params(**stage.method.params)
        except ValidationError as err:
            raise ConfigError(
                _format_errors(err, prefix=f"{where}.", section=f"{source} (method {cls.name!r})", schema=cls.Params)
            ) from None
    return config


def default_recipe() -> Path:
    return Path(__file__).parent / "recipes" / "fmnist.yaml"


def shipped_recipes() -> list[str]:
    """Names of the recipes shipped in ``distillery/recipes`` (usable as ``--config NAME``)."""
    return sorted(p.stem for p in (Path(__file__).parent / "recipes").glob("*.yaml"))


def resolve_recipe(path: str | Path) -> Path:
    """A file path as given, or the shipped recipe of that name (``fsp`` → ``distillery/recipes/fsp.yaml``)."""
    path = Path(path)
    shipped = Path(__file__).parent / "recipes" / f"{path.name}.yaml"
    if not path.exists() and path.parent == Path(".") and not path.suffix and shipped.exists():
        return shipped
    return path


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply ``a.b.c=value`` to a nested dict; the value is parsed as YAML (``4``, ``true``, ``[1,2]``)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    parts = key.split(".")
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            node = node[_list_index(part, node, where)]
            continue
        if part not in node or node[part] is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"--set {key}: {where} is a value, not a section")
    last = parts[-1]
    parsed = yaml.safe_load(value) if value != "" else None
    if isinstance(node, list):
        node[_list_index(last, node, key)] = parsed
    else:
        node[last] = parsed


def _list_index(part: str, node: list, where: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"--set: {where} must index the list (0..{len(node) - 1}), got {part!r}")
    return int(part)


def _format_errors(err: ValidationError, prefix: str, section: str, schema: type[BaseModel]) -> str:
    lines = [f"{section}: invalid configuration"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        key = f"{prefix}{loc}" if loc else prefix.rstrip(".") or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(e["loc"], schema)
            close = difflib.get_close_matches(str(e["loc"][-1]), allowed, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            lines.append(f"  {key}: unknown key.{hint} Allowed here: {', '.join(allowed)}")
        else:
            got = e.get("input")
            msg = e["msg"].removeprefix("Value error, ")
            shown = isinstance(got, dict) or got is None or repr(got) in msg
            lines.append(f"  {key}: {msg}{'' if shown else f' (got {got!r})'}")
    return "\n".join(lines)


def _allowed_keys(loc: tuple, schema: type[BaseModel]) -> list[str]:
    """The keys allowed at the section holding ``loc``'s last element, found by walking the schema."""
    model: Any = schema
    for part in loc[:-1]:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        model = _model_of(field.annotation)
    if model is None:
        return []
    return sorted(model.model_fields)


def _model_of(annotation: Any) -> Any:
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None
