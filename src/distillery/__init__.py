"""distillery: knowledge distillation for PyTorch.

The pieces a training loop needs, importable from here:

    from distillery import Teacher, create_method, run_student
    method = create_method("hinton", temperature=4, kd_weight=0.5, ce_weight=0.5)

and the pieces of a whole run: :class:`Trainer` with its :class:`Stage` list and
:class:`TrainConfig` settings, or a :class:`RunSpec` trained by a :class:`Runner`.
"""

from distillery import losses
from distillery.config import AugmentConfig, ConfigError, OptimizerConfig, ScheduleConfig, TrainConfig
from distillery.data import BatchLoader, ImageDataset, from_torch_dataset, load_idx_dataset
from distillery.methods import METHODS, Method, MethodParams, create_method, register_method
from distillery.models import create_model, list_models, register_model
from distillery.recipe import RunConfig, load_config
from distillery.runner import Runner, TrainedModel
from distillery.spec import DataSpec, RunSpec, StageSpec, TeacherRef
from distillery.taps import FeatureTaps
from distillery.teacher import ModelOutputs, Teacher, run_student
from distillery.train import Callback, EpochRecord, Stage, Trainer, evaluate

__version__ = "0.2.0"

__all__ = [
    "METHODS",
    "AugmentConfig",
    "BatchLoader",
    "Callback",
    "ConfigError",
    "DataSpec",
    "EpochRecord",
    "FeatureTaps",
    "ImageDataset",
    "Method",
    "MethodParams",
    "ModelOutputs",
    "OptimizerConfig",
    "RunConfig",
    "RunSpec",
    "Runner",
    "ScheduleConfig",
    "Stage",
    "StageSpec",
    "Teacher",
    "TeacherRef",
    "TrainConfig",
    "TrainedModel",
    "Trainer",
    "create_method",
    "create_model",
    "evaluate",
    "from_torch_dataset",
    "list_models",
    "load_config",
    "load_idx_dataset",
    "losses",
    "register_method",
    "register_model",
    "run_student",
]
