"""distillery: knowledge distillation for PyTorch.

The pieces a training loop needs, importable from here:

    from distillery import Teacher, create_method, run_student
    method = create_method("hinton", temperature=4, kd_weight=0.9, ce_weight=0.1)
"""

from distillery import losses
from distillery.config import ConfigError, RunConfig, load_config
from distillery.data import BatchLoader, ImageDataset, from_torch_dataset, load_idx_dataset
from distillery.methods import METHODS, Method, ModelOutputs, Teacher, create_method, run_student
from distillery.models import create_model, list_models, register_model
from distillery.taps import FeatureTaps
from distillery.train import Stage, Trainer, evaluate

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "BatchLoader",
    "ConfigError",
    "FeatureTaps",
    "ImageDataset",
    "Method",
    "ModelOutputs",
    "RunConfig",
    "Stage",
    "Teacher",
    "Trainer",
    "create_method",
    "create_model",
    "evaluate",
    "from_torch_dataset",
    "list_models",
    "load_config",
    "load_idx_dataset",
    "losses",
    "register_model",
    "run_student",
]
