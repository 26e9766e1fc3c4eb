"""Data sources: where a run's train and test sets come from, as typed specs, and :func:`load_data`.

Each source is a pydantic model (unknown keys are errors) whose ``source`` field names it, so
:data:`DataSource`, their union discriminated on ``source``, can stand in a config as ``data:``.

- ``idx``: the built-in Fashion-MNIST / MNIST idx files (:func:`load_idx_dataset`, unchanged);
- ``arrays``: an ``.npz`` file, or a pair of ``.npy`` files, of inputs and labels; any sample
  shape and any real numeric dtype, kept as stored;
- ``image_folder``: one subfolder of images per class (sorted folder names give the label ids,
  recorded as ``class_names``), read with Pillow, converted to mode L or RGB, resized to the given
  size, as uint8 N×C×H×W; kept in a compact cache file so the next run does not decode them again;
- ``python``: a ``package.module:callable`` returning a map-style torch ``Dataset``; this runs code
  named by the config, so :func:`load_data` refuses it unless called with ``allow_code=True``.

Apart from ``idx`` (whose test set is the t10k files), a source's test set comes from its own
``test`` files or, with ``test_fraction``, is held out of the training files class by class
(:func:`~distillery.data.datasets.stratified_split`, seeded). Normalisation (``normalise``) is
measured on the training set and applied to both.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
import warnings
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from distillery.data.datasets import (
    DatasetNotFoundError,
    InMemoryDataset,
    Normalisation,
    NormalisationChoice,
    from_torch_dataset,
    load_idx_dataset,
    resolve_normalisation,
    stratified_split,
)
from distillery.fsio import WriteError, atomic_write

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
IMAGE_CACHE_FORMAT = 1  # bump when the cache file's layout or the decoding changes: old files are then ignored
DEFAULT_INPUT_KEYS = ("x", "inputs")  # .npz keys tried in order when inputs_key is not given
DEFAULT_LABEL_KEYS = ("y", "labels")


class DataSourceError(ValueError):
    """A data source's files exist but cannot be used; the message names the file and what was expected."""


class CodeNotAllowedError(DataSourceError):
    """A ``python`` data source was asked for without consent to run code."""


class ImageCacheWarning(UserWarning):
    """The image-folder cache could not be read or written; the images are decoded from the folder."""


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class GivenNormalisation(_Spec):
    """Normalise with these statistics (one value per channel, or one for all), in units of ``s·x``."""

    mean: list[float] = Field(min_length=1)
    std: list[float] = Field(min_length=1)

    @model_validator(mode="after")
    def _matching(self) -> GivenNormalisation:
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean has {len(self.mean)} values but std has {len(self.std)}")
        if not all(s > 0 for s in self.std):
            raise ValueError(f"std values must be positive, got {self.std}")
        return self

    def build(self) -> Normalisation:
        return Normalisation(tuple(self.mean), tuple(self.std))


NormaliseSpec = Literal["dataset", "none"] | GivenNormalisation
NORMALISE_HELP = ("'dataset': the training set's own per-channel mean and std; 'none': no standardisation "
                  "(uint8 is still divided by 255); or {mean: [...], std: [...]}")


class IdxSource(_Spec):
    """Fashion-MNIST or MNIST from its idx files; ``normalise: dataset`` uses the published statistics."""

    source: Literal["idx"] = "idx"
    dataset: Literal["fashion_mnist", "mnist"] = "fashion_mnist"
    root: str | None = Field(None, description="folder with the idx files; the Debian package's folder is the fallback")
    normalise: NormaliseSpec = Field("dataset", description=NORMALISE_HELP)


class _SplitSource(_Spec):
    """The keys shared by the sources whose test set is either given or held out of the training set."""

    test_fraction: float | None = Field(None, gt=0, lt=1, description="hold out this fraction of the training "
                                        "files as the test set, class by class (instead of test files)")
    num_classes: int | None = Field(None, ge=1, description="default: the largest label + 1")
    normalise: NormaliseSpec = Field("dataset", description=NORMALISE_HELP)

    @model_validator(mode="after")
    def _one_test_set(self) -> _SplitSource:
        test = getattr(self, "test", None)
        if (test is None) == (self.test_fraction is None):
            raise ValueError("give exactly one of 'test' (test files) and 'test_fraction' (held out of train)")
        return self


class NpyPair(_Spec):
    """Two ``.npy`` files: inputs (N×sample shape) and labels (N)."""

    inputs: str
    labels: str


class ArraysSource(_SplitSource):
    """Arrays from ``.npz`` files (keys ``x``/``y`` or ``inputs``/``labels`` unless named) or ``.npy`` pairs."""

    source: Literal["arrays"]
    train: str | NpyPair = Field(description="an .npz file, or {inputs: x.npy, labels: y.npy}")
    test: str | NpyPair | None = None
    inputs_key: str | None = Field(None, description="the .npz key of the inputs (default: 'x', else 'inputs')")
    labels_key: str | None = Field(None, description="the .npz key of the labels (default: 'y', else 'labels')")


class ImageFolderSource(_SplitSource):
    """A folder with one subfolder of images per class (files anywhere below it, by suffix)."""

    source: Literal["image_folder"]
    train: str
    test: str | None = None
    size: int | tuple[int, int] = Field(description="resize every image to this: one side, or [height, width]")
    mode: Literal["L", "RGB"] = Field("RGB", description="Pillow mode to convert to: L (1 channel) or RGB (3)")
    resample: Literal["nearest", "bilinear", "bicubic", "lanczos"] = "bilinear"
    cache: bool = Field(True, description="keep the decoded images in a compact cache file for the next run")
    cache_dir: str | None = Field(None, description="folder of the cache files (default ~/.cache/distillery/images)")

    @model_validator(mode="after")
    def _positive_size(self) -> ImageFolderSource:
        if min(self.height_width) < 1:
            raise ValueError(f"size must be positive, got {self.size}")
        return self

    @property
    def height_width(self) -> tuple[int, int]:
        return (self.size, self.size) if isinstance(self.size, int) else self.size


class PythonSource(_SplitSource):
    """``package.module:callable`` returning a map-style torch Dataset of (input, label); runs code."""

    source: Literal["python"]
    train: str = Field(description="package.module:callable returning the training Dataset")
    test: str | None = Field(None, description="package.module:callable returning the test Dataset")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the callable(s)")


DataSource = Annotated[IdxSource | ArraysSource | ImageFolderSource | PythonSource, Field(discriminator="source")]


@dataclass(frozen=True)
class _Examples:
    """Inputs and int64 labels read from ``origin`` (a file or folder, for messages), not yet a dataset."""

    inputs: Tensor
    labels: Tensor
    origin: str


def load_data(spec: DataSource, seed: int, *, allow_code: bool = False) -> tuple[InMemoryDataset, InMemoryDataset]:
    """The (train, test) datasets ``spec`` describes; ``seed`` picks the held-out examples of ``test_fraction``.

    ``allow_code``: consent to import and run the callable of a ``python`` source (refused otherwise).
    """
    if isinstance(spec, IdxSource):
        train, test = (load_idx_dataset(spec.dataset, split, spec.root) for split in ("train", "test"))
        normalisation = resolve_normalisation(_choice(spec.normalise, train.normalisation), train.inputs)
        return train.with_normalisation(normalisation), test.with_normalisation(normalisation)
    class_names = None
    if isinstance(spec, ArraysSource):
        train_part = _read_arrays(spec.train, spec)
        test_part = _read_arrays(spec.test, spec) if spec.test is not None else None
    elif isinstance(spec, ImageFolderSource):
        class_names, train_part = read_image_folder(spec, spec.train)
        test_part = None
        if spec.test is not None:
            test_names, test_part = read_image_folder(spec, spec.test)
            _check_same_classes(spec.train, class_names, spec.test, test_names)
    elif isinstance(spec, PythonSource):
        train_part = _call_dataset(spec.train, spec, allow_code)
        test_part = _call_dataset(spec.test, spec, allow_code) if spec.test is not None else None
    else:
        raise TypeError(f"unknown data source {spec!r}")
    return _assemble(train_part, test_part, spec, seed, class_names)


def _choice(normalise: NormaliseSpec, dataset_default: Normalisation | None = None) -> NormalisationChoice:
    if isinstance(normalise, GivenNormalisation):
        return normalise.build()
    if normalise == "dataset" and dataset_default is not None:
        return dataset_default
    return normalise


def _assemble(train: _Examples, test: _Examples | None, spec: _SplitSource, seed: int,
              class_names: tuple[str, ...] | None) -> tuple[InMemoryDataset, InMemoryDataset]:
    """Datasets with one class count and the training set's normalisation, the test set given or held out."""
    if test is not None and (test.inputs.shape[1:], test.inputs.dtype) != (train.inputs.shape[1:], train.inputs.dtype):
        raise DataSourceError(
            f"test inputs {test.origin} are {test.inputs.dtype} of sample shape {tuple(test.inputs.shape[1:])}, "
            f"but training inputs {train.origin} are {train.inputs.dtype} of {tuple(train.inputs.shape[1:])}"
        )
    parts = [train] if test is None else [train, test]
    num_classes = spec.num_classes or max(0, *(int(part.labels.max()) for part in parts)) + 1

    def dataset(part: _Examples) -> InMemoryDataset:
        try:
            return InMemoryDataset(part.inputs, part.labels, Normalisation.none(), num_classes,
                                   class_names=class_names)
        except ValueError as err:
            raise DataSourceError(f"{part.origin}: {err}") from err

    train_set = dataset(train)
    if test is None:
        train_set, test_set = stratified_split(train_set, spec.test_fraction, seed)  # type: ignore[arg-type]
    else:
        test_set = dataset(test)
    normalisation = resolve_normalisation(_choice(spec.normalise), train_set.inputs)
    return train_set.with_normalisation(normalisation), test_set.with_normalisation(normalisation)


# --- arrays ---------------------------------------------------------------------------------------


def _read_arrays(files: str | NpyPair, spec: ArraysSource) -> _Examples:
    """Inputs and labels from an ``.npz`` file or an ``.npy`` pair, dtype and shape as stored."""
    if isinstance(files, NpyPair):
        inputs, labels = _load_npy(Path(files.inputs)), _load_npy(Path(files.labels))
        origin, inputs_where, labels_where = f"{files.inputs} + {files.labels}", files.inputs, files.labels
    else:
        path = Path(files)
        if path.suffix == ".npy":
            raise DataSourceError(f"{path}: a single .npy file holds one array; give an .npz file with inputs and "
                                  "labels, or a pair {inputs: x.npy, labels: y.npy}")
        inputs_key, labels_key, (inputs, labels) = _load_npz(path, spec.inputs_key, spec.labels_key)
        origin, inputs_where, labels_where = str(path), f"{path}[{inputs_key!r}]", f"{path}[{labels_key!r}]"
    if inputs.ndim < 2:
        raise DataSourceError(f"{inputs_where}: inputs must be N×(sample shape), with samples of at least one "
                              f"dimension; got shape {inputs.shape}")
    if len(inputs) == 0:
        raise DataSourceError(f"{inputs_where}: holds no examples")
    if labels.ndim != 1 or len(labels) != len(inputs):
        raise DataSourceError(f"{labels_where}: labels must have shape ({len(inputs)},), one per input; "
                              f"got {labels.shape}")
    return _Examples(_input_tensor(inputs, inputs_where), _label_tensor(labels, labels_where), origin)


def _load_npy(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DatasetNotFoundError(f"array file {path} not found")
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise DataSourceError(f"{path}: not a readable .npy array of numbers ({err})") from err
    if not isinstance(array, np.ndarray):
        raise DataSourceError(f"{path}: is an .npz archive, not one .npy array; give it as the .npz file")
    return array


def _load_npz(path: Path, inputs_key: str | None, labels_key: str | None) -> tuple[str, str, list[np.ndarray]]:
    """(inputs key, labels key, [inputs, labels]) of an ``.npz`` file, keys as given or the defaults."""
    if not path.is_file():
        raise DatasetNotFoundError(f"array file {path} not found")
    unreadable = (OSError, EOFError, ValueError, zipfile.BadZipFile)
    try:
        archive = np.load(path, allow_pickle=False)
    except unreadable as err:
        raise DataSourceError(f"{path}: not a readable .npz archive ({err})") from err
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataSourceError(f"{path}: holds a single array, not an .npz archive of inputs and labels")
    with archive:
        inputs_key = _npz_key(path, archive.files, inputs_key, DEFAULT_INPUT_KEYS, "inputs")
        labels_key = _npz_key(path, archive.files, labels_key, DEFAULT_LABEL_KEYS, "labels")
        try:
            return inputs_key, labels_key, [archive[inputs_key], archive[labels_key]]
        except unreadable as err:
            raise DataSourceError(f"{path}: cannot read its arrays as plain numbers ({err})") from err


def _npz_key(path: Path, keys: Sequence[str], given: str | None, defaults: tuple[str, ...], what: str) -> str:
    candidates = (given,) if given is not None else defaults
    found = next((key for key in candidates if key in keys), None)
    if found is None:
        raise DataSourceError(f"{path}: no {what} array under {' or '.join(map(repr, candidates))}; "
                              f"the file holds {', '.join(map(repr, keys)) or 'no arrays'}")
    return found


def _input_tensor(array: np.ndarray, where: str) -> Tensor:
    """The array as a tensor of the same dtype and values (byte order made native)."""
    if array.dtype.kind not in "biuf":
        raise DataSourceError(f"{where}: inputs must be a real numeric array, got dtype {array.dtype}")
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    return torch.from_numpy(np.ascontiguousarray(array))


def _label_tensor(array: np.ndarray, where: str) -> Tensor:
    """Integer class indices as int64; floats only if every value is a whole number."""
    if array.dtype.kind == "f":
        whole = np.isfinite(array) & (np.mod(array, 1) == 0)
        if not whole.all():
            raise DataSourceError(f"{where}: labels must be whole-number class indices; "
                                  f"found {array[~whole][0]!r}")
    elif array.dtype.kind not in "iu":
        raise DataSourceError(f"{where}: labels must be integer class indices, got dtype {array.dtype}")
    return torch.from_numpy(array.astype(np.int64))


# --- image folders --------------------------------------------------------------------------------


def list_image_folder(root: Path) -> tuple[tuple[str, ...], list[tuple[Path, int]]]:
    """(sorted class names, [(image file, label id)]) of a folder with one subfolder per class.

    Image files are found by suffix (``IMAGE_SUFFIXES``) anywhere below a class folder, in sorted
    order; hidden files and folders are skipped. A class folder without images is an error.
    """
    if not root.is_dir():
        raise DatasetNotFoundError(f"image folder {root} not found (or not a folder)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataSourceError(f"image folder {root} has no class subfolders; expected one subfolder of images "
                              "per class, named after the class")
    files: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        folder = root / name
        images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                        and not any(part.startswith(".") for part in p.relative_to(folder).parts))
        if not images:
            raise DataSourceError(f"class folder {folder} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        files.extend((path, label) for path in images)
    return tuple(classes), files


def read_image_folder(spec: ImageFolderSource, folder: str | Path) -> tuple[tuple[str, ...], _Examples]:
    """(class names, uint8 N×C×H×W images and labels) of ``folder``, from the cache file when it is current.

    The cache file is named after the folder and the decoding settings; it is current when it
    records the same list of files with the same sizes and modification times.
    """
    root = Path(folder)
    classes, files = list_image_folder(root)
    settings = (IMAGE_CACHE_FORMAT, spec.mode, spec.height_width, spec.resample)
    listing = hashlib.sha256(repr(settings).encode())
    for path, label in files:
        stat = path.stat()
        listing.update(f"{path.relative_to(root)}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    fingerprint = listing.hexdigest()
    cache_file = None
    if spec.cache:
        name = hashlib.sha256(repr((str(root.resolve()), settings)).encode()).hexdigest()[:20]
        cache_file = _image_cache_dir(spec) / f"{root.resolve().name}-{name}.npz"
        cached = _load_image_cache(cache_file, fingerprint, classes, len(files))
        if cached is not None:
            return classes, _Examples(*cached, origin=str(root))
    images = _decode_images(files, spec, f"reading {root}")
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    if cache_file is not None:
        _save_image_cache(cache_file, {"inputs": images.numpy(), "labels": labels.numpy(),
                                       "class_names": np.array(classes), "fingerprint": np.array(fingerprint)})
    return classes, _Examples(images, labels, str(root))


def _image_cache_dir(spec: ImageFolderSource) -> Path:
    if spec.cache_dir is not None:
        return Path(spec.cache_dir)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "distillery" / "images"


def _decode_images(files: Sequence[tuple[Path, int]], spec: ImageFolderSource, description: str) -> Tensor:
    height, width = spec.height_width
    channels = 1 if spec.mode == "L" else 3
    images = np.empty((len(files), channels, height, width), dtype=np.uint8)
    for i, (path, _) in enumerate(_progress(files, description)):
        images[i] = _read_image(path, spec.mode, (height, width), spec.resample)
    return torch.from_numpy(images)


def _read_image(path: Path, mode: str, size: tuple[int, int], resample: str) -> np.ndarray:
    """One image file as uint8 C×H×W: ``Image.convert(mode)``, then resized to ``size`` (height, width)."""
    from PIL import Image

    filters = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
               "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}
    try:
        with Image.open(path) as image:
            converted = image.convert(mode).resize((size[1], size[0]), resample=filters[resample])
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # a corrupt or truncated file
        raise DataSourceError(f"{path}: cannot read the image ({err})") from err
    array = np.asarray(converted, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _progress(items: Sequence[Any], description: str) -> Iterable[Any]:
    """``items``, with a tqdm progress bar when stderr is a terminal."""
    if not sys.stderr.isatty():
        return items
    from tqdm import tqdm

    return tqdm(items, desc=description, unit="image")


def _load_image_cache(path: Path, fingerprint: str, classes: tuple[str, ...], count: int,
                      ) -> tuple[Tensor, Tensor] | None:
    """(images, labels) from the cache file if it is there, intact and current; None otherwise."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            if str(archive["fingerprint"]) != fingerprint:
                return None  # the folder or the settings changed: decode again (the file is replaced)
            images, labels, names = archive["inputs"], archive["labels"], tuple(archive["class_names"].tolist())
        if images.dtype != np.uint8 or images.ndim != 4 or len(images) != count or labels.shape != (count,) \
                or names != classes:
            raise ValueError("its arrays do not match the folder")
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as err:
        warnings.warn(ImageCacheWarning(f"image cache {path} is unreadable ({err}); decoding the images again"),
                      stacklevel=3)
        return None
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def _save_image_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write the cache file atomically (:func:`distillery.fsio.atomic_write`); a failure only warns."""
    try:
        atomic_write(path, lambda f: np.savez(f, **arrays), make_parents=True, what="image cache")
    except WriteError as err:
        warnings.warn(ImageCacheWarning(f"cannot write the image cache: {err}"), stacklevel=3)


def _check_same_classes(train: str, train_names: tuple[str, ...], test: str, test_names: tuple[str, ...]) -> None:
    if train_names != test_names:
        missing, extra = sorted(set(train_names) - set(test_names)), sorted(set(test_names) - set(train_names))
        raise DataSourceError(f"test folder {test} must have the class subfolders of {train}; "
                              f"missing: {', '.join(missing) or 'none'}; not in train: {', '.join(extra) or 'none'}")


# --- python callables -----------------------------------------------------------------------------


def load_user_dataset(target: str, kwargs: dict[str, Any], *, allow_code: bool) -> torch.utils.data.Dataset:
    """The map-style Dataset that ``target`` (``package.module:callable``) returns when called with ``kwargs``.

    Importing the module and calling it runs code named by the config: refused with
    :class:`CodeNotAllowedError` unless ``allow_code``.
    """
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise DataSourceError(f"python data source {target!r}: expected 'package.module:callable'")
    if not allow_code:
        raise CodeNotAllowedError(
            f"the python data source {target!r} would import module {module_name!r} and call {attr!r}, running "
            f"code named by the config; if you trust {module_name!r}, allow it with --allow-code (allow_code=True)"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise DataSourceError(f"python data source {target!r}: cannot import module {module_name!r} ({err})") from err
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise DataSourceError(f"python data source {target!r}: module {module_name!r} has no callable {attr!r}")
    try:
        dataset = factory(**kwargs)
    except TypeError as err:  # most often keyword arguments the callable does not take
        message = f"python data source {target!r}: calling it with kwargs {kwargs!r} failed: {err}"
        raise DataSourceError(message) from err
    if isinstance(dataset, torch.utils.data.IterableDataset) or not (
            hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise DataSourceError(f"python data source {target!r} returned a {type(dataset).__name__}; expected a "
                              "map-style torch.utils.data.Dataset (with __len__ and __getitem__)")
    return dataset


def _call_dataset(target: str, spec: PythonSource, allow_code: bool) -> _Examples:
    dataset = load_user_dataset(target, spec.kwargs, allow_code=allow_code)
    try:
        materialised = from_torch_dataset(dataset, spec.num_classes, normalisation="none")
    except (TypeError, ValueError) as err:
        raise DataSourceError(f"python data source {target!r}: {err}") from err
    return _Examples(materialised.inputs, materialised.labels, target)
