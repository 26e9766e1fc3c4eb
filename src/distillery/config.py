"""Settings sections, YAML reading, ``--set`` overrides and clear error messages.

The sections here are plain values (no objects are built here) shared by every layer above:
models, training schedules, data, the teacher. They know nothing of the methods; the whole recipe
(with each stage's method parameters) is assembled in :mod:`distillery.recipe`. Every section
forbids unknown keys and non-finite numbers, so a misspelled key or an ``.inf`` fails before any
work with a message naming it and what is allowed there.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from distillery.data.sources import ArraysSource, DataSource, IdxSource, ImageFolderSource, PythonSource
from distillery.safe_yaml import YamlError, load_yaml

# Largest stored feature target (all training examples) that ``store_teacher: auto`` keeps without
# being asked, MB (``teacher.cache_max_mb``).
DEFAULT_MAX_MB = 1024.0


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key and what is allowed."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(Section):
    """A registered model name (see ``distillery models``) or ``package.module:callable``."""

    name: str
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the model factory")


def describe_model(spec: ModelConfig | dict[str, Any]) -> str:
    """``resnet8`` or ``mlp(hidden=[800, 800])``: a model spec for reports."""
    spec = ModelConfig.model_validate(spec) if isinstance(spec, dict) else spec
    args = ", ".join(f"{k}={v}" for k, v in spec.kwargs.items())
    return f"{spec.name}({args})" if args else spec.name


class OptimizerConfig(Section):
    """The optimiser of one stage (a config's ``train.optimizer``); the student's and the method's
    learnable parameters are optimised together.

    Fields (default):

    - ``name`` (``"sgd"``): ``sgd`` (SGD with momentum) or ``adamw`` (AdamW; ``momentum`` and
      ``nesterov`` are then unused).
    - ``lr`` (0.05): the base learning rate, > 0; the schedule multiplies it every step.
    - ``momentum`` (0.9): SGD momentum in [0, 1).
    - ``nesterov`` (True): Nesterov momentum for SGD (only when ``momentum`` > 0).
    - ``weight_decay`` (5e-4): ≥ 0; SGD adds ``weight_decay · w`` to each gradient (L2), AdamW
      decays the weights directly (decoupled), as ``torch.optim`` defines them.
    """

    name: Literal["sgd", "adamw"] = Field(
        "sgd", description="sgd (SGD with momentum) or adamw (AdamW: momentum and nesterov unused)")
    lr: float = Field(0.05, gt=0, description="base learning rate; the schedule multiplies it every step")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (unused by adamw)")
    nesterov: bool = Field(True, description="Nesterov momentum for SGD when momentum > 0 (unused by adamw)")
    weight_decay: float = Field(5e-4, ge=0, description="weight decay: an L2 term in SGD's gradient, decoupled "
                                "in AdamW")


class ScheduleConfig(Section):
    """The learning-rate schedule of one stage (``train.schedule``): a multiplier of ``optimizer.lr``,
    updated every step (not every epoch), so epoch values may be fractional.

    Fields (default):

    - ``name`` (``"cosine"``): ``constant`` (1); ``step`` (``gamma`` raised to the number of
      ``milestones`` already passed); ``cosine`` (½·(1 + cos(π·p)), p the fraction of the stage's
      steps after the warm-up already taken: 1 at first, falling to 0 at the stage's end).
    - ``milestones`` ([]): epochs (fractional allowed) at which ``step`` multiplies by ``gamma``.
    - ``gamma`` (0.1): the ``step`` factor, in (0, 1].
    - ``warmup_epochs`` (0): epochs (fractional allowed) of linear warm-up before the schedule:
      step k (0-based) of W warm-up steps uses the multiplier (k + 1) / W.
    """

    name: Literal["constant", "step", "cosine"] = Field(
        "cosine", description="constant; step (gamma at each milestone); cosine (from 1 to 0 over the stage)")
    milestones: list[float] = Field(default_factory=list, description="epochs at which 'step' multiplies by gamma")
    gamma: float = Field(0.1, gt=0, le=1, description="the factor 'step' applies at each milestone")
    warmup_epochs: float = Field(0.0, ge=0, description="linear warm-up from 0 over this many epochs")


class AugmentConfig(Section):
    """Training-set augmentation of one stage (``train.augment``), for image batches (N×C×H×W) only;
    applied to the stored values before normalisation, freshly drawn for every example and epoch.
    The test set is never augmented. Both off by default.

    Fields (default):

    - ``crop_padding`` (0): pad each image with this many pixels of zeros on every side, then crop a
      random window of the original size (0 = off).
    - ``hflip`` (False): mirror each image left-right with probability ½.
    """

    crop_padding: int = Field(0, ge=0, le=64, description="random crop after zero-padding by this many pixels "
                                                         "(0 = off; at most 64)")
    hflip: bool = Field(False, description="mirror each image left-right with probability 1/2")


class TrainConfig(Section):
    """How one network, or one distillation stage, is trained (a config's ``teacher.train``,
    ``student.train`` or ``distill.stages[i].train``; the ``train`` of a :class:`~distillery.train.Stage`).

    Fields (default):

    - ``epochs`` (10): passes over the training set, ≥ 1.
    - ``batch_size`` (128): examples per step, the *global* batch under torchrun (each of N
      processes takes ``batch_size / N``; it must divide evenly). A training set smaller than one
      batch is trained as one smaller batch per epoch; otherwise the last incomplete batch is dropped.
    - ``optimizer`` (:class:`OptimizerConfig`: SGD, lr 0.05, momentum 0.9, Nesterov, weight decay 5e-4).
    - ``schedule`` (:class:`ScheduleConfig`: cosine from ``lr`` to 0 over the stage, no warm-up).
    - ``augment`` (:class:`AugmentConfig`: off).
    - ``checkpoint_every_steps`` (0): also write the checkpoint every N steps inside an epoch
      (0 = only after each epoch); only with a run folder.
    - ``grad_clip_norm`` (None): rescale each step's gradients so their global L2 norm is at most
      this (None = off).
    """

    epochs: int = Field(10, ge=1, description="passes over the training set")
    batch_size: int = Field(128, ge=1, description="global batch size: under torchrun each of the N processes "
                            "takes batch_size / N examples per step (must divide evenly)")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig, description="the optimiser (default SGD)")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig,
                                     description="the learning-rate schedule (default cosine)")
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="image augmentation (default off)")
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


class DataCommon(Section):
    """What every ``data`` section has besides its source: subsets and the evaluation batch."""

    train_subset: int | None = Field(None, ge=1, description="use a random subset of this many training examples")
    test_subset: int | None = Field(None, ge=1, description="use a random subset of this many test examples")
    eval_batch_size: int = Field(1000, ge=1, le=1 << 20, description="batch size of evaluation passes")


class IdxData(IdxSource, DataCommon):
    """``source: idx`` (the default): MNIST or Fashion-MNIST idx files."""


class ArraysData(ArraysSource, DataCommon):
    """``source: arrays``: inputs and labels in .npz / .npy files, any sample shape, dtype kept."""


class ImageFolderData(ImageFolderSource, DataCommon):
    """``source: image_folder``: one subfolder of images per class, read with Pillow and resized."""


class PythonData(PythonSource, DataCommon):
    """``source: python``: a ``package.module:callable`` returning a torch Dataset (needs --allow-code)."""


def _idx_by_default(value: Any) -> Any:
    """Recipes written before ``source`` existed name an idx dataset: keep them valid."""
    return {"source": "idx", **value} if isinstance(value, dict) and "source" not in value else value


DataConfig = Annotated[IdxData | ArraysData | ImageFolderData | PythonData, Field(discriminator="source"),
                       BeforeValidator(_idx_by_default)]


def data_source(data: Any) -> DataSource:
    """The source part of a ``data`` section (without the subsets), as :mod:`distillery.data.sources` reads it."""
    cls = {"idx": IdxSource, "arrays": ArraysSource, "image_folder": ImageFolderSource,
           "python": PythonSource}[data.source]
    return cls.model_validate(data.model_dump(exclude=set(DataCommon.model_fields)))


def describe_data(data: Any) -> str:
    """``fashion_mnist`` or ``arrays: train.npz``: a data section for reports."""
    return data.dataset if data.source == "idx" else f"{data.source}: {data.train}"


class LoggingConfig(Section):
    """What a run logs besides ``metrics.jsonl`` and its progress lines."""

    tensorboard: bool = Field(False, description="also write TensorBoard scalars (every loss term, accuracy, "
                                                 "learning rate, images/s) to <run folder>/tensorboard")


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
    store_epochs: int = Field(0, ge=0, description="teacher store: distillation stages that augment (logit methods) "
                              "replay this many epochs of views, drawn with store_seed, and with the cache on read "
                              "the teacher's outputs on them from the store, built once and shared by every run "
                              "(0: off, fresh views every epoch; a longer stage cycles through the stored epochs)")
    store_top_k: int | None = Field(None, ge=1, description="store the k largest probabilities at the method's "
                                    "temperature (float16) instead of the full logits, for teachers of more than k "
                                    "classes; the KL to the full distribution is measured and reported")
    store_dtype: Literal["float32", "float16"] = Field("float32", description="of the stored full logits")
    store_seed: int = Field(0, description="seed of the stored views (independent of the run's seed, so runs of "
                            "every seed share them)")

    def store_options(self) -> dict[str, Any]:
        """The ``store_*`` settings by name without the prefix (:class:`distillery.spec.CacheSpec`'s fields)."""
        return {f"store_{name}": getattr(self, f"store_{name}") for name in ("epochs", "top_k", "dtype", "seed")}

    @field_validator("cache", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        """YAML reads a bare ``off`` as false (and ``on`` as true): accept what the user meant."""
        return {False: "off", True: "auto"}.get(value, value) if isinstance(value, bool) else value


class StudentConfig(Section):
    model: ModelConfig
    train: TrainConfig = Field(default_factory=TrainConfig)


# ---------------------------------------------------------------- the tune section (distillery tune)

Value = bool | int | float | str


class RangeSetting(Section):
    """``tune.space.<name>``: a range (a bound left out keeps the default range's), or choices."""

    low: float | None = None
    high: float | None = None
    log: bool | None = Field(None, description="search log-uniformly (default: as the default range, else no)")
    choices: list[Value] | None = Field(None, min_length=1, description="search these values instead of a range")

    @model_validator(mode="after")
    def _range_or_choices(self) -> RangeSetting:
        if self.choices is not None and (self.low, self.high, self.log) != (None, None, None):
            raise ValueError("give either choices or a range (low, high, log), not both")
        return self


class PrunerSetting(Section):
    """Stopping bad trials early on their per-epoch validation accuracy (Optuna's pruners)."""

    name: Literal["median", "successive_halving", "none"] = Field(
        "median", description="median: stop a trial below the median of earlier trials at the same epoch; "
                              "successive_halving: keep the best 1/reduction_factor at each rung; none: never stop")
    startup_trials: int = Field(2, ge=0, description="median: trials that finish before any is stopped")
    warmup_epochs: int = Field(1, ge=0, description="median: epochs a trial runs before it may be stopped")
    min_epochs: int = Field(1, ge=1, description="successive_halving: epochs of the first rung")
    reduction_factor: int = Field(3, ge=2, description="successive_halving: 1/this of the trials go on at each rung")


class TuneConfig(Section):
    """The recipe's ``tune`` section: the search, its stopping rule and the confirmation runs."""

    n_trials: int = Field(20, ge=1, description="completed + stopped trials of the whole search; a rerun on the "
                                                "same storage continues up to this total")
    validation_fraction: float = Field(0.1, gt=0, lt=1, description="share of the training subset held out, "
                                       "class by class, to score the trials (the test split is never read)")
    space: dict[str, RangeSetting] = Field(default_factory=dict, description="ranges by parameter name")
    fixed: dict[str, Value] = Field(default_factory=dict, description="values by parameter name, not searched")
    only: list[str] | None = Field(None, description="search only these of the default space (and tune.space)")
    seed: int = Field(0, description="seed of the TPE sampler (worker k of --workers uses seed + k)")
    startup_trials: int = Field(5, ge=1, description="random trials before TPE models the results")
    pruner: PrunerSetting = Field(default_factory=PrunerSetting)
    confirm_seeds: int = Field(3, ge=0, description="seeds of the confirmation (best parameters and the student "
                                                    "alone, full training split, test split); 0 skips it")
    storage: str | None = Field(None, description="an Optuna storage URL (default: sqlite:///<folder>/study.db)")
    folder: str | None = Field(None, description="output folder (default: <output_dir>/<name>/tune-<methods>)")

    @model_validator(mode="after")
    def _enough_seeds(self) -> TuneConfig:
        if self.confirm_seeds in (1, 2):
            raise ValueError(f"confirm_seeds must be 0 (no confirmation) or at least 3 for a paired interval, "
                             f"got {self.confirm_seeds}")
        return self


def fingerprint(section: BaseModel | dict) -> str:
    """A short stable hash of a config section, to recognise a run made from the same settings."""
    data = section.model_dump(mode="json") if isinstance(section, BaseModel) else section
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- loading and overrides


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
    try:
        parsed = load_yaml(value, f"--set {key}") if value != "" else None
    except YamlError as err:
        raise ConfigError(f"--set {key}: the value is not valid YAML: {err}") from None
    if isinstance(node, list):
        node[_list_index(last, node, key)] = parsed
    else:
        node[last] = parsed


def _list_index(part: str, node: list, where: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"--set: {where} must index the list (0..{len(node) - 1}), got {part!r}")
    return int(part)


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """The top-level mapping of a YAML file, or a :class:`ConfigError` naming the file and the fault."""
    try:
        raw = load_yaml(path.read_text(), str(path))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path} (shipped recipes, usable by name: "
                          f"{', '.join(shipped_recipes())})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot be read: {err}") from None
    except YamlError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(raw).__name__}")
    return raw


def format_errors(err: ValidationError, section: str, schema: type[BaseModel], prefix: str = "") -> str:
    """One line per error: the dotted key (union tags such as a method's name left out), what is wrong
    and, for an unknown key, the closest allowed key and all keys allowed there."""
    lines = [f"{section}: invalid configuration"]
    for e in err.errors():
        loc = _without_tags(e["loc"], schema)
        dotted = ".".join(str(p) for p in loc)
        key = f"{prefix}{dotted}" if dotted else prefix.rstrip(".") or "(top level)"
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


def _walk(loc: tuple, schema: type[BaseModel]) -> list[tuple[Any, list[type[BaseModel]]]]:
    """Each element of ``loc`` with the models it may index into (several for a union)."""
    steps, candidates = [], [schema]
    for part in loc:
        steps.append((part, candidates))
        if isinstance(part, int):
            continue
        owner = next((m for m in candidates if part in m.model_fields), None)
        if owner is not None:
            candidates = _models_in(owner.model_fields[part].annotation)
        else:  # a discriminated union's tag: keep the member it names
            candidates = [m for m in candidates if _tag_of(m) == part]
    steps.append((None, candidates))
    return steps


def _without_tags(loc: tuple, schema: type[BaseModel]) -> tuple:
    """``loc`` without the union tags pydantic inserts (``method.hinton.temperature`` → ``method.temperature``)."""
    def is_tag(part: Any, candidates: list[type[BaseModel]]) -> bool:
        return (isinstance(part, str) and not any(part in m.model_fields for m in candidates)
                and any(_tag_of(m) == part for m in candidates))

    return tuple(part for part, candidates in _walk(loc, schema)[:-1] if not is_tag(part, candidates))


def _allowed_keys(loc: tuple, schema: type[BaseModel]) -> list[str]:
    """The keys allowed at the section holding ``loc``'s last element."""
    candidates = _walk(loc[:-1], schema)[-1][1]
    return sorted(candidates[0].model_fields) if candidates else []


def _tag_of(model: type[BaseModel]) -> Any:
    field = model.model_fields.get("name")
    args = typing.get_args(field.annotation) if field is not None else ()
    return args[0] if field is not None and typing.get_origin(field.annotation) is Literal and len(args) == 1 else None


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """Every pydantic model an annotation names (one for a plain section, each member of a union)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]
