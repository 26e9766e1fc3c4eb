"""The model registry: names to factories, plus ``package.module:callable`` for user models.

A config is data, and data must not run code. A name ``package.module:callable`` imports that
module and calls that attribute with the config's keyword arguments, so it is refused unless the
user consents (:class:`CodePolicy`: ``--allow-code PACKAGE`` or ``allow_code: [PACKAGE]`` in the
user's settings file). Some code is never called from a config, even with consent: the standard
library and builtins (``os:system``, ``shutil:rmtree``), and packages that are tools rather than
models (:data:`NEVER_CALLED`: torch, numpy, distillery itself...). Without any consent, the module
classes of ``torch.nn`` and ``distillery.models`` may be built (``torch.nn:Linear``): constructing
them runs no other code. What a user callable returns is checked to be of the expected type.

The registered models and those module classes are first built on the ``meta`` device (which
allocates nothing) to count their parameters: sizes mistyped by a few digits are refused before
they can ask for gigabytes.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}

AllowCode = bool | Collection[str]
"""Consent to run user code: True (any package not in NEVER_CALLED), or the packages / modules allowed."""

NEVER_CALLED: frozenset[str] = frozenset(sys.stdlib_module_names) | {
    "builtins", "__main__", "distillery", "torch", "torchvision", "torchaudio", "numpy", "scipy", "pandas",
    "yaml", "pydantic", "pydantic_core", "optuna", "onnx", "onnxruntime", "safetensors", "PIL", "tensorboard",
    "pytest", "_pytest", "pip", "setuptools", "pkg_resources", "IPython", "requests", "urllib3", "fsspec",
    "huggingface_hub",
}
"""Top-level packages whose callables a config never calls, even with consent."""

BUILDABLE_WITHOUT_CONSENT = ("torch.nn", "distillery.models")
"""Packages whose ``nn.Module`` classes (only those) a config may build without consent."""

MAX_SIZE = 1 << 16
"""Largest value of a size option (a width, hidden size, channel or class count) of a registered model."""
MAX_DEPTH = 1202
"""Largest ``depth``: the deepest CIFAR ResNet He et al. (2016) trained."""
MAX_HIDDEN_LAYERS = 1024
MAX_PARAMETERS = 1 << 30
"""Most parameters and buffers a model built here may have (4 GiB of float32)."""
SIZE_OPTIONS = ("in_channels", "num_classes", "input_size", "width", "fc_width", "depth")


def settings_path() -> Path:
    """The user-level settings file: ``$XDG_CONFIG_HOME/distillery/settings.yaml`` (default ``~/.config``)."""
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "distillery" / "settings.yaml"


@dataclass(frozen=True)
class CodePolicy:
    """Which user code a config may import and call (see the module docstring). The default refuses all.

    ``allowed`` holds top-level packages (``mypkg``: it and its submodules) or dotted modules
    (``mypkg.models``: that subtree only); ``allow_all`` allows any package outside NEVER_CALLED.
    """

    allowed: frozenset[str] = frozenset()
    allow_all: bool = False

    @classmethod
    def of(cls, allow: AllowCode | CodePolicy) -> CodePolicy:
        """A policy from ``True`` / ``False`` / a collection of package names (or a policy, as is)."""
        if isinstance(allow, CodePolicy):
            return allow
        if isinstance(allow, bool):
            return cls(allow_all=allow)
        if isinstance(allow, str) or not all(isinstance(name, str) and name for name in allow):
            raise ValueError(f"allow_code must be true, false or a list of package names, got {allow!r}")
        return cls(allowed=frozenset(allow))

    @classmethod
    def from_settings(cls, path: Path | None = None) -> CodePolicy:
        """The ``allow_code`` of the user's settings file (:func:`settings_path`); refuse-all if it has none."""
        from distillery.safe_yaml import load_yaml

        path = settings_path() if path is None else path
        try:
            settings = load_yaml(path.read_text(), str(path))
        except FileNotFoundError:
            return cls()
        if settings is None:
            return cls()
        if not isinstance(settings, dict):
            raise ValueError(f"{path}: the settings must be a mapping of keys, got {type(settings).__name__}")
        allow = settings.get("allow_code", False)
        if not isinstance(allow, (bool, list)):
            raise ValueError(f"{path}: allow_code must be true, false or a list of package names, got {allow!r}")
        try:
            return cls.of(allow)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    def union(self, other: CodePolicy) -> CodePolicy:
        """Code either policy allows (a ``--allow-code`` flag added to the settings file's list)."""
        return CodePolicy(self.allowed | other.allowed, self.allow_all or other.allow_all)

    def permits(self, module: str) -> bool:
        return self.allow_all or any(module == name or module.startswith(name + ".") for name in self.allowed)


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register a factory under its function name.

    Factories take ``in_channels``, ``num_classes`` and ``input_size`` keywords (ignoring what they
    don't need) plus their own options.
    """
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} is registered twice")
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(
    name: str,
    *,
    in_channels: int = 1,
    num_classes: int = 10,
    input_size: int = 28,
    allow_code: AllowCode | CodePolicy = False,
    max_parameters: int = MAX_PARAMETERS,
    **kwargs: Any,
) -> nn.Module:
    """Build a model by registry name or ``"package.module:callable"`` (allowed by ``allow_code``).

    A callable is given ``in_channels``, ``num_classes`` and ``input_size`` only if its signature
    names them (and ``kwargs`` does not), so any ``nn.Module`` class or factory works. Raises
    ValueError for an unknown name, refused code, sizes that are not whole numbers in
    1..:data:`MAX_SIZE`, or more than ``max_parameters`` parameters.
    """
    data_args = {"in_channels": in_channels, "num_classes": num_classes, "input_size": input_size}
    if ":" in name:
        factory = load_user_callable(name, allow_code)
        try:
            accepted = inspect.signature(factory).parameters
        except (TypeError, ValueError):
            accepted = {}
        extra = {k: v for k, v in data_args.items() if k in accepted and k not in kwargs}
        if _buildable_without_consent(factory):
            check_size_options(name, {**extra, **kwargs})
            return _build_within_limits(factory, name, {**extra, **kwargs}, max_parameters)
        return call_user_factory(factory, name, {**extra, **kwargs})
    if name not in _MODELS:
        close = difflib.get_close_matches(name, _MODELS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"unknown model {name!r}.{hint} Known models: {', '.join(list_models())}; "
            "or give a user model as 'package.module:callable'."
        )
    options = {**data_args, **kwargs}
    check_size_options(name, options)
    return _build_within_limits(_MODELS[name], name, options, max_parameters)


def check_size_options(name: str, options: dict[str, Any]) -> None:
    """Refuse size options (:data:`SIZE_OPTIONS`, and each of ``hidden``) that are not whole numbers
    from 1 to MAX_SIZE (``depth``: MAX_DEPTH), or more than MAX_HIDDEN_LAYERS hidden layers."""
    sizes = [(key, options[key]) for key in SIZE_OPTIONS if key in options]
    if "hidden" in options:
        hidden = options["hidden"]
        if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Sequence):
            raise ValueError(f"model {name!r}: hidden must be a list of layer sizes, got {hidden!r}")
        if len(hidden) > MAX_HIDDEN_LAYERS:
            raise ValueError(f"model {name!r}: hidden lists {len(hidden):,} layers, more than {MAX_HIDDEN_LAYERS:,}")
        sizes += [(f"hidden[{i}]", size) for i, size in enumerate(hidden)]
    for key, value in sizes:
        limit = MAX_DEPTH if key == "depth" else MAX_SIZE
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise ValueError(f"model {name!r}: {key} must be a whole number from 1 to {limit:,}, got {value!r}")


def _build_within_limits(factory: Callable[..., nn.Module], name: str, options: dict[str, Any],
                         max_parameters: int) -> nn.Module:
    """``factory(**options)``, after a dry run on the meta device showing it has at most ``max_parameters``."""
    try:
        with torch.device("meta"):
            probe = factory(**options)
    except RuntimeError as err:  # e.g. a negative size: torch cannot make the tensor
        raise ValueError(f"model {name!r} cannot be built with {options}: {str(err).splitlines()[0]}") from None
    count = sum(t.numel() for t in (*probe.parameters(), *probe.buffers()))
    if count > max_parameters:
        raise ValueError(
            f"model {name!r} with {options} would have {count:,} parameters ({count * 4 / 2**30:,.1f} GiB as "
            f"float32), more than the limit of {max_parameters:,}: is a size mistyped?"
        )
    return factory(**options)


def load_user_callable(spec: str, allow: AllowCode | CodePolicy, expected: type = nn.Module,
                       what: str = "model") -> Callable[..., Any]:
    """The callable that ``spec`` (``"package.module:callable"``) names, if ``allow`` consents to it.

    Checked before anything is imported: the spec's form, that the module exists, that it is not in
    :data:`NEVER_CALLED`, and consent — except for the ``expected`` classes of
    :data:`BUILDABLE_WITHOUT_CONSENT`. After import, the attribute must be public, callable, and not
    code of a NEVER_CALLED package re-exported under another name. ``what`` names it in messages.
    """
    module_name, attr = _parse_spec(spec, what)
    top = module_name.split(".")[0]
    _check_installed(top, module_name, spec, what)
    trusted = any(module_name == p or module_name.startswith(p + ".") for p in BUILDABLE_WITHOUT_CONSENT)
    if trusted:
        factory = _import_attribute(module_name, attr, spec, what)
        if inspect.isclass(factory) and issubclass(factory, expected) and _buildable_without_consent(factory):
            return factory
    if top in NEVER_CALLED:
        raise ValueError(_never_called_message(spec, top, what))
    policy = CodePolicy.of(allow)
    if not policy.permits(module_name):
        raise ValueError(
            f"{what} {spec!r} would import module {module_name!r} and run its code, which is refused unless you "
            f"allow it: a config must not run code without your consent. If you trust {top!r}, pass "
            f"--allow-code {top}, or add 'allow_code: [{top}]' to {settings_path()}."
        )
    factory = _import_attribute(module_name, attr, spec, what)
    defined_in = getattr(factory, "__module__", None) or type(factory).__module__
    if str(defined_in).split(".")[0] in NEVER_CALLED and not _buildable_without_consent(factory):
        raise ValueError(f"{what} {spec!r} is {defined_in}.{getattr(factory, '__qualname__', attr)} under another "
                         f"name; {_never_called_message(spec, str(defined_in).split('.')[0], what)}")
    if not callable(factory):
        raise ValueError(f"{what} {spec!r} is not callable (a {type(factory).__name__})")
    return factory


def call_user_factory(factory: Callable[..., Any], spec: str, kwargs: dict[str, Any], expected: type = nn.Module,
                      what: str = "model") -> Any:
    """``factory(**kwargs)``, refused with a clear error unless the result is an ``expected``."""
    result = factory(**kwargs)
    if not isinstance(result, expected):
        raise ValueError(f"{what} {spec!r} returned a {type(result).__module__}.{type(result).__qualname__}, "
                         f"not a {expected.__module__}.{expected.__qualname__}; name a class or factory that "
                         f"builds one")
    return result


def _parse_spec(spec: str, what: str) -> tuple[str, str]:
    module_name, _, attr = spec.partition(":")
    if not all(part.isidentifier() for part in module_name.split(".")) or not attr.isidentifier():
        raise ValueError(f"{what} {spec!r}: expected 'package.module:callable' (dotted module, a colon, a name)")
    if attr.startswith("_"):
        raise ValueError(f"{what} {spec!r}: {attr!r} is private; name a public class or function")
    return module_name, attr


def _check_installed(top: str, module_name: str, spec: str, what: str) -> None:
    """Refuse a module that does not exist, without importing (running) anything."""
    try:
        found = top in sys.modules or importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ValueError(f"cannot import module {module_name!r} for {what} {spec!r}: no module named {top!r} "
                         "is installed")


def _import_attribute(module_name: str, attr: str, spec: str, what: str) -> Any:
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"cannot import module {module_name!r} for {what} {spec!r}: {err}") from err
    try:
        return getattr(module, attr)
    except AttributeError as err:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r} ({what} {spec!r})") from err


def _buildable_without_consent(factory: Any) -> bool:
    """An ``nn.Module`` class defined in BUILDABLE_WITHOUT_CONSENT (its construction runs no other code)."""
    return (inspect.isclass(factory) and issubclass(factory, nn.Module)
            and any(factory.__module__ == p or factory.__module__.startswith(p + ".")
                    for p in BUILDABLE_WITHOUT_CONSENT))


def _never_called_message(spec: str, top: str, what: str) -> str:
    kind = "the Python standard library" if top in sys.stdlib_module_names or top == "builtins" else \
        "a tool, not a model package"
    hint = {"torch": " (the nn.Module classes of torch.nn, such as 'torch.nn:Linear', are allowed)",
            "distillery": " (name a registered model without a colon, e.g. 'mlp'; the nn.Module classes of "
                          "distillery.models are allowed)"}.get(top, "")
    return (f"{what} {spec!r}: {top!r} is {kind}; a config never calls its functions, even with --allow-code"
            f"{hint}")


def model_factory(name: str) -> Callable[..., nn.Module]:
    """The factory registered as ``name`` (for listing its options)."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return _MODELS[name]
