"""Models by name: ``create_model("resnet20", in_channels=1, num_classes=10)``.

Built-in families: CIFAR-style ResNets (:mod:`.resnet`), MLPs (:mod:`.mlp`), a small CNN
(:mod:`.cnn`). Any other ``nn.Module`` works as teacher or student: pass it directly through the
Python API, or name a factory as ``"package.module:callable"`` in a config.
"""

from distillery.models import cnn, mlp, resnet  # noqa: F401  (registers the built-in models)
from distillery.models.catalogue import describe_models
from distillery.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "describe_models", "list_models", "register_model"]
