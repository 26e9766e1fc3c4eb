"""The teacher-output cache is exact, is invalidated when it must be, and never serves a bad entry."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from fakes import counting
from torch import nn

from distillery.cache import CachedTeacher, CacheRebuiltWarning, TeacherCache, cache_key, entry_name
from distillery.config import AugmentConfig, TrainConfig
from distillery.data import BatchLoader, ImageDataset
from distillery.methods import Teacher, create_method
from distillery.models import create_model
from distillery.recipe import load_config, teacher_cache_dir
from distillery.train import Stage, Trainer


def make_data(n: int = 192, seed: int = 0) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 4, (n,), generator=g)
    return ImageDataset(images, labels, (0.5,), (0.25,), num_classes=4)


def make_teacher(seed: int = 1, kind: str = "mlp") -> Teacher:
    torch.manual_seed(seed)
    if kind == "cnn":  # convolutional: the Trainer runs it channels-last on CPU
        return Teacher(create_model("cnn", in_channels=1, num_classes=4, input_size=8, width=4, fc_width=8))
    return Teacher(create_model("mlp", in_channels=1, num_classes=4, input_size=8, hidden=(32,)))


def train(data: ImageDataset, teacher: Teacher, cache_dir, *, augment: AugmentConfig | None = None,
          method: str = "hinton") -> tuple[nn.Module, list[dict]]:
    torch.manual_seed(0)
    student = create_model("mlp", in_channels=1, num_classes=4, input_size=8, hidden=(16,))
    cfg = TrainConfig(epochs=2, batch_size=32, augment=augment or AugmentConfig())
    trainer = Trainer(student, data, make_data(64, seed=9), [Stage(create_method(method), cfg)], teacher=teacher,
                      teacher_cache=cache_dir, progress=False, echo=lambda line: None)
    history = trainer.fit()
    return student, history


# ------------------------------------------------------------------ exactness


def test_cached_logits_equal_teacher_logits(tmp_path):
    data, teacher = make_data(), make_teacher()
    cached = CachedTeacher.build(teacher, data, tmp_path)
    loader = BatchLoader(data, 50, shuffle=True, seed=3)
    for batch in loader.epoch(1):
        expected = teacher(batch.inputs).logits
        assert torch.equal(cached(batch.inputs, index=batch.index).logits, expected)


def test_ensemble_logits_are_cached_member_by_member(tmp_path):
    data = make_data()
    ensemble = Teacher([make_teacher(1).members[0], make_teacher(2).members[0]])
    cached = CachedTeacher.build(ensemble, data, tmp_path)
    batch = next(BatchLoader(data, 40, shuffle=True).epoch(0))
    out = cached(batch.inputs, index=batch.index).logits
    assert out.shape == (2, 40, 4)
    assert torch.equal(out, ensemble(batch.inputs).logits)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_training_with_cache_reaches_the_same_weights_without_running_the_teacher(tmp_path, kind):
    data, teacher = make_data(), make_teacher(kind=kind)
    plain, plain_history = train(data, teacher, None)
    first = counting(teacher)
    cached, cached_history = train(data, first, tmp_path / "cache")
    assert first.calls == 2  # setup's class check + one batch (of 512) building the cache
    for a, b in zip(plain.state_dict().values(), cached.state_dict().values()):
        assert torch.equal(a, b)
    assert [r["train_loss"] for r in plain_history] == [r["train_loss"] for r in cached_history]
    again = counting(teacher)
    train(data, again, tmp_path / "cache")
    assert again.calls == 1  # only setup's class check: the logits come from disk


# ------------------------------------------------------------------ invalidation


def test_changed_teacher_weights_change_the_key_and_are_recomputed(tmp_path):
    data, teacher = make_data(), make_teacher()
    CachedTeacher.build(teacher, data, tmp_path)
    key = cache_key(teacher, data)
    with torch.no_grad():
        teacher.members[0].classifier.bias.add_(1.0)
    assert cache_key(teacher, data) != key
    rebuilt = CachedTeacher.build(teacher, data, tmp_path)
    batch = next(BatchLoader(data, 64).epoch(0))
    assert torch.equal(rebuilt(batch.inputs, index=batch.index).logits, teacher(batch.inputs).logits)


@pytest.mark.parametrize("change", ["pixel", "label", "normalisation"])
def test_changed_data_changes_the_key(tmp_path, change):
    data, teacher = make_data(), make_teacher()
    images, labels, mean = data.images.clone(), data.labels.clone(), data.mean
    if change == "pixel":
        images[5, 0, 3, 3] ^= 1
    elif change == "label":
        labels[7] = (labels[7] + 1) % 4
    else:
        mean = (0.4,)
    changed = ImageDataset(images, labels, mean, data.std, data.num_classes)
    assert cache_key(teacher, changed) != cache_key(teacher, data)
    CachedTeacher.build(teacher, data, tmp_path)
    fresh = counting(teacher)
    cached = CachedTeacher.build(fresh, changed, tmp_path)
    assert fresh.calls > 0
    batch = next(BatchLoader(changed, 64).epoch(0))
    assert torch.equal(cached(batch.inputs, index=batch.index).logits, teacher(batch.inputs).logits)


def _entry(tmp_path, teacher, data):
    key = cache_key(teacher, data)
    return tmp_path / key / "logits.bin", tmp_path / key / "logits.json"


@pytest.mark.parametrize("damage", ["truncate", "flip_bytes", "no_header", "bad_header", "wrong_count"])
def test_damaged_entry_is_rebuilt_never_used(tmp_path, damage):
    data, teacher = make_data(), make_teacher()
    CachedTeacher.build(teacher, data, tmp_path)
    data_path, header_path = _entry(tmp_path, teacher, data)
    raw = bytearray(data_path.read_bytes())
    if damage == "truncate":
        data_path.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip_bytes":  # same size, plausible floats: only the checksum can tell
        raw[100:108] = torch.tensor([1e3, -1e3]).numpy().tobytes()
        data_path.write_bytes(raw)
    elif damage == "no_header":  # killed between writing the data and the header
        header_path.unlink()
        data_path.write_bytes(bytes(len(raw)))
    elif damage == "bad_header":
        header_path.write_text("{ not json")
    else:
        header = json.loads(header_path.read_text())
        header["count"] = 7
        header_path.write_text(json.dumps(header))
    fresh = counting(teacher)
    with pytest.warns(CacheRebuiltWarning, match="logits.bin"):
        cached = CachedTeacher.build(fresh, data, tmp_path)
    assert fresh.calls > 0
    batch = next(BatchLoader(data, len(data)).epoch(0))
    assert torch.equal(cached(batch.inputs, index=batch.index).logits, teacher(batch.inputs).logits)
    with warnings.catch_warnings():  # the rebuilt entry is now good
        warnings.simplefilter("error")
        assert TeacherCache(tmp_path, cache_key(teacher, data)).load("logits", len(data)) is not None


def test_cache_stores_any_named_per_example_tensor(tmp_path):
    cache = TeacherCache(tmp_path, "k")
    fsp = torch.randn(10, 3, 16, 32)
    cache.save("fsp_stage1", fsp)
    assert torch.equal(cache.load("fsp_stage1", 10), fsp)
    assert cache.load("fsp_stage2") is None
    with pytest.raises(ValueError, match="plain file name"):
        cache.save("../escape", fsp)


def test_entry_names_are_file_names_that_keep_layers_apart():
    assert entry_name("fsp", "stem", "stage1") == "fsp_stem__stage1"
    assert entry_name("hint", "stage2.0.conv1") == "hint_stage2.0.conv1"
    odd = [entry_name("fsp", "a/b", "c"), entry_name("fsp", "a_b", "c"), entry_name("fsp", "a__b", "c"),
           entry_name("fsp", "a", "b__c"), entry_name("fsp", "a b", "c")]
    assert len(set(odd)) == len(odd)  # sanitised or ambiguous names get a hash of the exact names
    cache = TeacherCache(Path("/nonexistent"), "k")
    for name in odd:
        assert "/" not in name and " " not in name
        cache._paths(name)  # accepted as an entry name


# ------------------------------------------------------------------ when it is (not) used


def test_not_used_when_augmentation_is_active(tmp_path):
    data = make_data()
    teacher = counting(make_teacher())
    train(data, teacher, tmp_path / "cache", augment=AugmentConfig(crop_padding=1, hflip=True))
    assert not (tmp_path / "cache").exists()
    assert teacher.calls == 1 + 2 * (len(data) // 32)  # setup + every training step


def test_not_used_by_methods_without_a_teacher_or_reading_features(tmp_path):
    data, teacher = make_data(), make_teacher()
    train(data, teacher, tmp_path / "cache", method="ce")
    assert not (tmp_path / "cache").exists()
    cached = CachedTeacher.build(teacher, data, tmp_path / "c2")
    batch = next(BatchLoader(data, 16).epoch(0))
    out = cached(batch.inputs, ["hidden1"], index=batch.index)  # features asked for: runs the teacher
    assert "hidden1" in out.features


def test_turned_off_by_config(tmp_path):
    base = [f"output_dir={tmp_path}"]
    assert teacher_cache_dir(load_config(None, base)) == tmp_path / "cache"
    assert teacher_cache_dir(load_config(None, [*base, "teacher.cache_dir=/x/y"])) == type(tmp_path)("/x/y")
    assert teacher_cache_dir(load_config(None, [*base, "teacher.cache=off"])) is None
    data = make_data()
    teacher = counting(make_teacher())
    train(data, teacher, teacher_cache_dir(load_config(None, [*base, "teacher.cache=off"])))
    assert not (tmp_path / "cache").exists()
    assert teacher.calls == 1 + 2 * (len(data) // 32)
