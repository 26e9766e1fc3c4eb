"""A hostile or careless user's input (issue 19): configs naming code to run, absurd model sizes,
idx files declaring or inflating to gigabytes, checkpoints without weights, a NaN teacher, a full
disk under the cache. Each is refused before harm, with a message naming what and where."""

from __future__ import annotations

import errno
import gzip
import os
import struct
import sys
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import random_dataset
from torch import nn

from distillery.cache import CacheBusyWarning, CachedTeacher, CacheRebuiltWarning, NonFiniteTeacherError, TeacherCache
from distillery.data import IdxFormatError, read_idx
from distillery.fsio import FolderLock, WriteError
from distillery.methods import Teacher
from distillery.models import create_model
from distillery.models.registry import MAX_SIZE, CodePolicy, call_user_factory, load_user_callable
from distillery.pipeline import load_trained_model
from distillery.safe_yaml import YamlError
from distillery.train import CheckpointError, save_checkpoint
from distillery.train.checkpoint import load_weights

# ---------------------------------------------------------------- code named by a config


@pytest.fixture
def user_modules(tmp_path, monkeypatch) -> Path:
    """Importable user modules: one that leaves a marker when imported, one re-exporting os.system,
    one whose factory returns no module, one building a dataset."""
    folder = tmp_path / "user"
    folder.mkdir()
    marker = str(tmp_path / "IMPORTED")
    (folder / "marks_on_import.py").write_text(
        f"open({marker!r}, 'w').close()\nfrom torch import nn\ndef net():\n    return nn.Linear(2, 2)\n")
    (folder / "reexports.py").write_text("from os import system\nfrom shutil import rmtree as clean\n")
    (folder / "not_a_model.py").write_text("def factory(**kwargs):\n    return 42\n")
    (folder / "user_data.py").write_text("import torch\nfrom torch.utils.data import TensorDataset\n"
                                         "def points(n=4):\n    return TensorDataset(torch.zeros(n, 2))\n")
    monkeypatch.syspath_prepend(str(folder))
    for name in ("marks_on_import", "reexports", "not_a_model", "user_data"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return tmp_path


@pytest.mark.parametrize("allow", [False, True, ["os", "shutil", "subprocess", "builtins"]])
def test_standard_library_functions_are_never_called_even_with_consent(tmp_path, allow):
    marker, victim = tmp_path / "PWNED", tmp_path / "victim"
    victim.mkdir()
    attacks = [("os:system", {"command": f"touch {marker}"}), ("shutil:rmtree", {"path": str(victim)}),
               ("subprocess:call", {"args": ["touch", str(marker)]}), ("builtins:exec", {"source": "1"})]
    for spec, kwargs in attacks:
        top = spec.split(":")[0]
        with pytest.raises(ValueError, match=f"{top!r} is the Python standard library; a config never calls"):
            create_model(spec, allow_code=allow, **kwargs)
    assert not marker.exists() and victim.is_dir()


@pytest.mark.parametrize("spec,hint", [
    ("torch:save", "torch.nn:Linear"), ("torch.hub:load", "torch.nn:Linear"),
    ("torch.nn.functional:relu", "torch.nn:Linear"), ("numpy:save", ""),
    ("distillery.cli:main", "name a registered model without a colon"),
    ("distillery.models.mlp:mlp", "name a registered model without a colon"),
])
def test_tool_packages_are_never_called_even_with_consent(spec, hint):
    with pytest.raises(ValueError, match="a tool, not a model package; a config never calls") as info:
        create_model(spec, allow_code=True)
    assert hint in str(info.value)


def test_module_classes_of_torch_nn_and_distillery_models_need_no_consent():
    assert isinstance(create_model("torch.nn:Linear", in_features=3, out_features=2), nn.Linear)
    resnet = create_model("distillery.models.resnet:CifarResNet", depth=8, in_channels=1, num_classes=3)
    assert resnet(torch.zeros(1, 1, 8, 8)).shape == (1, 3)


def test_user_code_without_consent_is_refused_before_it_is_imported(user_modules):
    with pytest.raises(ValueError) as info:
        create_model("marks_on_import:net")
    message = str(info.value)
    assert "would import module 'marks_on_import' and run its code" in message
    assert "--allow-code marks_on_import" in message and "allow_code: [marks_on_import]" in message
    assert not (user_modules / "IMPORTED").exists() and "marks_on_import" not in sys.modules
    with pytest.raises(ValueError, match="would import module"):
        create_model("marks_on_import:net", allow_code=["marks_on_imports", "marks"])  # other packages only


@pytest.mark.parametrize("allow", [True, ["marks_on_import"], CodePolicy(frozenset({"marks_on_import"}))])
def test_user_code_with_consent_is_built(user_modules, allow):
    model = create_model("marks_on_import:net", allow_code=allow)
    assert isinstance(model, nn.Linear) and (user_modules / "IMPORTED").exists()


def test_a_stdlib_function_re_exported_by_an_allowed_package_is_still_refused(user_modules):
    for spec, real in (("reexports:system", "posix.system"), ("reexports:clean", "shutil.rmtree")):
        with pytest.raises(ValueError, match=f"is {real} under another name;.*never calls"):
            create_model(spec, allow_code=["reexports"])


def test_what_a_user_factory_returns_is_checked(user_modules):
    with pytest.raises(ValueError, match="'not_a_model:factory' returned a builtins.int, not a torch.nn.modules"):
        create_model("not_a_model:factory", allow_code=["not_a_model"])
    dataset_type = torch.utils.data.Dataset
    factory = load_user_callable("user_data:points", ["user_data"], expected=dataset_type, what="dataset")
    assert len(call_user_factory(factory, "user_data:points", {"n": 3}, expected=dataset_type, what="dataset")) == 3
    net = load_user_callable("torch.nn:Linear", False)
    with pytest.raises(ValueError, match="dataset 'torch.nn:Linear' returned a torch.nn.modules.linear.Linear, not a "
                                         "torch.utils.data.dataset.Dataset"):
        call_user_factory(net, "torch.nn:Linear", {"in_features": 1, "out_features": 1}, dataset_type, "dataset")


@pytest.mark.parametrize("spec,words", [
    ("no_such_package_xyz:f", "cannot import module 'no_such_package_xyz'"),
    ("torch.nn:Nope", "module 'torch.nn' has no attribute 'Nope'"),
    ("mypkg:", "expected 'package.module:callable'"), (":f", "expected 'package.module:callable'"),
    ("my pkg:f", "expected 'package.module:callable'"), ("mypkg:a.b", "expected 'package.module:callable'"),
    ("torch.nn:_reduction", "is private"),
])
def test_malformed_or_missing_specs_are_named(spec, words):
    with pytest.raises(ValueError) as info:
        create_model(spec, allow_code=True)
    assert words in str(info.value)


def test_code_policy_from_arguments_and_the_settings_file(tmp_path):
    policy = CodePolicy.of(["mypkg", "other.models"])
    assert policy.permits("mypkg") and policy.permits("mypkg.nets") and not policy.permits("mypkgx")
    assert policy.permits("other.models.big") and not policy.permits("other")
    assert CodePolicy.of(True).permits("anything") and not CodePolicy.of(False).permits("anything")
    with pytest.raises(ValueError, match="a list of package names, got 'mypkg'"):
        CodePolicy.of("mypkg")  # a bare string is not a list of names
    settings = tmp_path / "settings.yaml"
    assert CodePolicy.from_settings(settings) == CodePolicy()  # no file: refuse all
    settings.write_text("allow_code: [mypkg]\n")
    assert CodePolicy.from_settings(settings).union(CodePolicy.of(["cli_pkg"])).allowed == {"mypkg", "cli_pkg"}
    settings.write_text("allow_code: mypkg\n")
    with pytest.raises(ValueError, match=f"{settings}: allow_code must be true, false or a list"):
        CodePolicy.from_settings(settings)
    settings.write_text("allow_code: [a]\nallow_code: true\n")
    with pytest.raises(YamlError, match="line 2: duplicate key 'allow_code'"):
        CodePolicy.from_settings(settings)


# ---------------------------------------------------------------- model sizes


@pytest.mark.parametrize("name,kwargs,words", [
    ("mlp", {"hidden": [10**6]}, f"hidden[0] must be a whole number from 1 to {MAX_SIZE:,}, got 1000000"),
    ("mlp", {"hidden": [16, 0]}, "hidden[1] must be a whole number"),
    ("mlp", {"hidden": [-3]}, "hidden[0] must be a whole number"),
    ("mlp", {"hidden": [1.5]}, "got 1.5"),
    ("mlp", {"hidden": [True]}, "got True"),
    ("mlp", {"hidden": "800"}, "hidden must be a list of layer sizes, got '800'"),
    ("cnn", {"width": 0}, "width must be a whole number"),
    ("resnet20", {"width": 10**5}, "width must be a whole number"),
    ("mlp", {"num_classes": 0}, "num_classes must be a whole number"),
    ("cnn", {"input_size": 2**20}, "input_size must be a whole number"),
    ("mlp", {"hidden": [8] * 5000}, "hidden lists 5,000 layers, more than 1,024"),
    ("distillery.models.resnet:CifarResNet", {"depth": 6 * 10**8 + 2}, "depth must be a whole number from 1 to 1,202"),
    ("torch.nn:Conv2d", {"in_channels": 0, "out_channels": 2, "kernel_size": 3}, "in_channels must be a whole"),
])
def test_model_sizes_must_be_whole_numbers_in_range(name, kwargs, words):
    with pytest.raises(ValueError) as info:
        create_model(name, **kwargs)
    assert f"model {name!r}: " in str(info.value) and words in str(info.value)


def test_a_model_too_large_to_allocate_is_refused_before_allocating():
    width = MAX_SIZE  # each size is allowed; together they would be 17 GB
    expected = 784 * width + width + width * width + width + width * 10 + 10
    with pytest.raises(ValueError, match=f"would have {expected:,} parameters .* is a size mistyped"):
        create_model("mlp", hidden=[width, width])
    with pytest.raises(ValueError, match=f"would have {10**6 * 10**6 + 10**6:,} parameters"):
        create_model("torch.nn:Linear", in_features=10**6, out_features=10**6)
    with pytest.raises(ValueError, match="'torch.nn:Linear' cannot be built with .*negative dimension"):
        create_model("torch.nn:Linear", in_features=-1, out_features=2)
    with pytest.raises(ValueError, match="more than the limit of 100"):
        create_model("mlp", hidden=[8], max_parameters=100)


def test_a_checkpoint_declaring_absurd_sizes_is_refused_before_building(tmp_path):
    path = tmp_path / "checkpoint.pt"
    meta = {"model": {"name": "mlp", "kwargs": {"hidden": [MAX_SIZE] * 3}}, "num_classes": 10}
    save_checkpoint({"kind": "distillery-run", "meta": meta, "student": {"w": torch.zeros(1)}}, path)
    with pytest.raises(ValueError, match="model 'mlp' with .* would have .* parameters"):
        load_trained_model(path, None, random_dataset(8, size=28))


# ---------------------------------------------------------------- idx files


def idx_header(shape: tuple[int, ...], type_code: int = 0x08) -> bytes:
    return bytes([0, 0, type_code, len(shape)]) + struct.pack(f">{len(shape)}I", *shape)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_an_idx_header_declaring_gigabytes_is_refused_before_reading(tmp_path, suffix):
    path = tmp_path / f"train-images-idx3-ubyte{suffix}"
    raw = idx_header((60000, 28000, 28000)) + bytes(100)
    path.write_bytes(gzip.compress(raw) if suffix else raw)
    with pytest.raises(IdxFormatError, match=r"declares shape \(60000, 28000, 28000\) \(47,040,000,000,000 bytes"):
        read_idx(path)
    small = _write(tmp_path / f"small{suffix}", idx_header((8, 8)) + bytes(64), suffix)
    assert read_idx(small).shape == (8, 8)
    with pytest.raises(IdxFormatError, match="more than the 50 bytes an idx file may hold"):
        read_idx(small, max_bytes=50)


def _write(path: Path, raw: bytes, suffix: str) -> Path:
    path.write_bytes(gzip.compress(raw) if suffix else raw)
    return path


def test_a_gzip_bomb_is_refused_without_inflating_it(tmp_path):
    path = tmp_path / "bomb-idx3-ubyte.gz"
    inflated = 64 << 20
    with gzip.open(path, "wb", compresslevel=9) as f:  # a header for 10 images, then 64 MB of zeros
        f.write(idx_header((10, 28, 28)))
        for _ in range(inflated >> 20):
            f.write(bytes(1 << 20))
    assert path.stat().st_size < inflated // 500
    tracemalloc.start()
    try:
        with pytest.raises(IdxFormatError, match=r"declares shape \(10, 28, 28\) \(7840 bytes of data\) but the "
                                                 "file holds more than that"):
            read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak  # the declared 7840 bytes plus one read chunk, not the 64 MB


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_files_of_other_types_and_trailing_data(tmp_path, suffix):
    values = np.array([[1, -2, 300], [70000, -80000, 0]], dtype=">i4")
    path = _write(tmp_path / f"ints{suffix}", idx_header((2, 3), 0x0C) + values.tobytes(), suffix)
    assert np.array_equal(read_idx(path), values.astype(np.int64))
    longer = _write(tmp_path / f"longer{suffix}", idx_header((2, 3), 0x0C) + values.tobytes() + b"\0", suffix)
    with pytest.raises(IdxFormatError, match=r"longer.*declares shape \(2, 3\) \(24 bytes of data\) but the file "
                                             r"holds (25|more than that)"):
        read_idx(longer)


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("student,words", [(None, "has none"), ([1, 2], "holds a list there")])
def test_a_checkpoint_without_its_student_weights_is_refused_naming_the_file(tmp_path, student, words):
    path = tmp_path / "checkpoint.pt"
    state = {"kind": "distillery-run", "meta": {}}
    if student is not None:
        state["student"] = student
    save_checkpoint(state, path)
    with pytest.raises(CheckpointError, match="without the student's weights") as info:
        load_weights(path)
    assert str(path) in str(info.value) and words in str(info.value)


def test_a_full_disk_when_saving_a_checkpoint_names_the_file_and_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "run" / "checkpoint.pt"
    save_checkpoint({"generation": 1}, path)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(WriteError) as info:
        save_checkpoint({"generation": 2}, path)
    assert str(info.value) == (f"cannot write the checkpoint {path}: No space left on device (the disk is full: free "
                               "some space or write elsewhere); the previous checkpoint there is unchanged")
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["generation"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]


# ---------------------------------------------------------------- the teacher cache


def _teacher(poison: str | None = None) -> Teacher:
    torch.manual_seed(0)
    net = create_model("mlp", in_channels=1, num_classes=4, input_size=8, hidden=[8])
    if poison == "weights":
        with torch.no_grad():
            net.classifier.weight[0, 0] = float("nan")
    return Teacher(net)


class BlowsUpOnBrightImages(nn.Module):
    """Finite weights, infinite logits for images whose first pixel is bright."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.linear(x.flatten(1))
        return torch.where(x.flatten(1)[:, :1] > 1.5, torch.full_like(logits, float("inf")), logits)


def test_a_teacher_with_nan_weights_is_refused_and_nothing_is_cached(tmp_path):
    data = random_dataset(64)
    with pytest.raises(NonFiniteTeacherError) as info:
        CachedTeacher.build(_teacher("weights"), data, tmp_path)
    message = str(info.value)
    assert "the teacher (MLP) gives NaN or inf for 'logits' on 64 example(s)" in message
    assert "its weights hold NaN or inf" in message and "Nothing was cached" in message
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.json"))


def test_a_teacher_whose_outputs_overflow_is_refused_naming_the_first_example(tmp_path):
    data = random_dataset(64)
    bright = ((data.images[:, 0, 0, 0].float() / 255 - 0.5) / 0.29 > 1.5).nonzero().flatten()
    assert len(bright) > 0
    with pytest.raises(NonFiniteTeacherError, match=f"on {len(bright)} example.* dataset index {int(bright[0])}"
                                                    r".*its weights are finite"):
        CachedTeacher.build(Teacher(BlowsUpOnBrightImages()), data, tmp_path)


def test_any_non_finite_computed_entry_is_not_stored(tmp_path):
    cache = TeacherCache(tmp_path, "key")
    with pytest.raises(NonFiniteTeacherError, match="the computed entry 'hint_x' holds NaN or inf; it is not stored"):
        cache.get_or_compute("hint_x", lambda: torch.tensor([[1.0], [float("-inf")]]), count=2)
    assert not list(tmp_path.rglob("hint_x*"))


def test_when_another_process_keeps_the_lock_the_entry_is_computed_in_memory(tmp_path):
    cache = TeacherCache(tmp_path, "key")
    cache.lock_wait_s = 0.1
    with FolderLock(cache.dir, "another run writing"):
        with pytest.warns(CacheBusyWarning, match="another run writing.*Computing logits in memory, without storing"):
            got = cache.get_or_compute("logits", lambda: torch.ones(3, 2), count=3)
        assert torch.equal(got, torch.ones(3, 2))
    assert sorted(p.name for p in cache.dir.iterdir()) == []


def test_a_reader_leaves_a_damaged_entry_alone_and_only_a_writer_rebuilds_it(tmp_path):
    cache = TeacherCache(tmp_path, "key")
    cache.save("logits", torch.arange(12.0).reshape(6, 2))
    data_path = cache.dir / "logits.bin"
    raw = bytearray(data_path.read_bytes())
    raw[0] ^= 0xFF  # complete but corrupt
    data_path.write_bytes(raw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.load("logits", 6) is None
    assert data_path.read_bytes() == raw and (cache.dir / "logits.json").exists()  # untouched
    with pytest.warns(CacheRebuiltWarning, match="logits.bin: checksum mismatch"):
        rebuilt = cache.get_or_compute("logits", lambda: torch.arange(12.0).reshape(6, 2), count=6)
    assert torch.equal(rebuilt, torch.arange(12.0).reshape(6, 2))


def test_a_full_disk_under_the_cache_is_a_write_error_naming_the_entry(tmp_path, monkeypatch):
    cache = TeacherCache(tmp_path, "key")

    def fsync_fails(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync_fails)
    with pytest.raises(WriteError, match=f"cannot write the teacher cache entry {cache.dir / 'logits.bin'}: No space"):
        cache.get_or_compute("logits", lambda: torch.ones(3, 2), count=3)
    monkeypatch.undo()
    assert sorted(p.name for p in cache.dir.iterdir()) == []  # no temp, no header, no lock left
