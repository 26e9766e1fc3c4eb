"""FSP: the matrix against its double sum, channel shuffling, teacher matrices stored in the teacher
cache (exact, reused, rebuilt when damaged, keyed by teacher and data), set-up checks."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from fakes import counting
from tiny_idx import one_thread, tiny_dataset  # noqa: F401  (one_thread: autouse fixture)

from distillery.cache import CacheRebuiltWarning, TeacherCache, cache_key
from distillery.config import TrainConfig
from distillery.data import Augment, BatchLoader
from distillery.losses import fsp_loss, fsp_matrix
from distillery.methods import Teacher, create_method, run_student
from distillery.models import create_model
from distillery.stored_targets import prepare_stored_targets
from distillery.train import Stage, Trainer


def _resnet(depth: int = 8, width: int = 1, seed: int = 0, size: int = 8, num_classes: int = 10):
    torch.manual_seed(seed)
    return create_model(f"resnet{depth}", in_channels=1, num_classes=num_classes, input_size=size, width=width)


def _example(size: int = 8) -> torch.Tensor:
    return torch.randn(4, 1, size, size, generator=torch.Generator().manual_seed(3))


def test_fsp_matrix_equals_the_explicit_double_sum() -> None:
    g = torch.Generator().manual_seed(0)
    f1, f2 = torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 2, 4, 5, generator=g)
    expected = torch.zeros(2, 3, 2)
    for x in range(2):
        for i in range(3):
            for j in range(2):
                expected[x, i, j] = sum(f1[x, i, s, t] * f2[x, j, s, t] for s in range(4) for t in range(5)) / 20
    torch.testing.assert_close(fsp_matrix(f1, f2), expected)
    # a larger map is max-pooled down first: 8×10 → 4×5 with 2×2 windows
    big = torch.randn(2, 3, 8, 10, generator=g)
    pooled = big.unfold(2, 2, 2).unfold(3, 2, 2).amax(dim=(-1, -2))
    torch.testing.assert_close(fsp_matrix(big, f2), fsp_matrix(pooled, f2))
    # channels-last maps (how the trainer stores conv nets on CPU) take another path to the same G
    last = [t.to(memory_format=torch.channels_last) for t in (f1, f2, big)]
    torch.testing.assert_close(fsp_matrix(last[0], last[1]), expected)
    torch.testing.assert_close(fsp_matrix(last[2], last[1]), fsp_matrix(pooled, f2))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_fsp_matrix_gradient_is_exact_and_keeps_the_maps_memory_layout(layout: torch.memory_format) -> None:
    g = torch.Generator().manual_seed(2)
    f1 = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64).to(memory_format=layout).requires_grad_()
    f2 = torch.randn(2, 5, 2, 2, generator=g, dtype=torch.float64).to(memory_format=layout).requires_grad_()
    assert torch.autograd.gradcheck(fsp_matrix, (f1, f2))  # f1 is max-pooled 4×4 → 2×2 on the way
    # ∂/∂F1 of Σ_ij W_ij·G_ij is Σ_j W_ij·F2[j] / (h·w), spread back through the pooling
    w = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    (fsp_matrix(f1, f2) * w).sum().backward()
    torch.testing.assert_close(f2.grad, torch.einsum("nij,nihw->njhw", w, torch.nn.functional.max_pool2d(f1, 2)) / 4)
    # gradients come back in the maps' own layout, so the layers before need no copy to theirs
    for f in (f1, f2):
        assert f.grad.is_contiguous(memory_format=layout)


def test_fsp_matrix_stays_float32_under_autocast() -> None:
    g = torch.Generator().manual_seed(4)
    maps = [torch.randn(2, 4, 6, 6, generator=g).requires_grad_(), torch.randn(2, 8, 3, 3, generator=g)]
    expected = fsp_matrix(*maps)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), maps[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed precision would otherwise round G's sums
        got = fsp_matrix(*maps)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)
    (got_grad,) = torch.autograd.grad(got.square().sum(), maps[0])
    torch.testing.assert_close(got_grad, expected_grad)


def test_channel_permutation_of_the_teacher_permutes_rows_and_columns_of_g() -> None:
    g = torch.Generator().manual_seed(1)
    f1, f2 = torch.randn(3, 4, 6, 6, generator=g), torch.randn(3, 5, 3, 3, generator=g)
    p1, p2 = torch.randperm(4, generator=g), torch.randperm(5, generator=g)
    torch.testing.assert_close(fsp_matrix(f1[:, p1], f2[:, p2]), fsp_matrix(f1, f2)[:, p1][:, :, p2])


def test_shuffled_targets_permute_each_teacher_layer_consistently() -> None:
    student, teacher_net = _resnet(8, seed=1), _resnet(14, seed=2)
    teacher, x = Teacher(teacher_net), _example()
    pairs = [["stem", "stage1"], ["stage1", "stage2"]]
    shuffled = create_method("fsp", pairs=pairs, shuffle_seed=5)
    shuffled.setup(student, teacher, x)
    again = create_method("fsp", pairs=pairs, shuffle_seed=5)
    again.setup(student, teacher, x)
    s_out = run_student(student, x, shuffled.student_layers)
    t_out = teacher(x, shuffled.teacher_layers)
    y = torch.zeros(4, dtype=torch.long)
    # one permutation per teacher layer: stage1's is the columns of pair 1 and the rows of pair 2
    perms = shuffled._permutations
    assert set(perms) == {"stem", "stage1", "stage2"}
    feats = {name: t_out.features[name][:, perms[name]] for name in perms}
    expected = fsp_loss([fsp_matrix(s_out.features[a], s_out.features[b]) for a, b in pairs],
                        [fsp_matrix(feats[a], feats[b]) for a, b in pairs], [1.0, 1.0])
    torch.testing.assert_close(shuffled(s_out, t_out, y)["fsp"], expected)
    torch.testing.assert_close(again(s_out, t_out, y)["fsp"], expected)  # same seed, same targets
    other = create_method("fsp", pairs=pairs, shuffle_seed=6)
    other.setup(student, teacher, x)
    assert not torch.equal(other._permutations["stage1"], perms["stage1"])
    # a copy of the student as teacher (both in eval mode) gives zero loss; its shuffled copy does not
    self_t = Teacher(copy.deepcopy(student))
    plain = create_method("fsp", pairs=pairs)
    plain.setup(student, self_t, x)
    s_eval = run_student(student.eval(), x, plain.student_layers)
    assert plain(s_eval, self_t(x, plain.teacher_layers), y)["fsp"].item() == pytest.approx(0.0, abs=1e-6)
    assert shuffled(s_eval, self_t(x, plain.teacher_layers), y)["fsp"].item() > 1e-3


def test_pair_weights_weight_each_pair() -> None:
    student, teacher, x = _resnet(8, seed=1), Teacher(_resnet(8, seed=2)), _example()
    y = torch.zeros(4, dtype=torch.long)
    terms = []
    for weights in ([1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.5, 2.0, 3.0]):
        method = create_method("fsp", pair_weights=weights)
        method.setup(student, teacher, x)
        s_out = run_student(student, x, method.student_layers)
        terms.append(method(s_out, method.teacher_outputs(teacher, x), y)["fsp"])
    torch.testing.assert_close(terms[3], 0.5 * terms[0] + 2.0 * terms[1] + 3.0 * terms[2])


def _loader(dataset) -> BatchLoader:
    return BatchLoader(dataset, 16, shuffle=True, seed=0)


def _prepared(student, teacher, data, cache_dir=None, **params):
    method = create_method("fsp", **params)
    method.setup(student, teacher, _example())
    prepare_stored_targets(method, teacher, _loader(data), cache_dir)
    return method


def _entries(root, teacher, data) -> dict[str, int]:
    """The stored entries under the teacher's cache key: data file name -> its header's mtime."""
    folder = root / cache_key(teacher, data)
    return {p.name: (folder / f"{p.stem}.json").stat().st_mtime_ns for p in sorted(folder.glob("*.bin"))}


def test_stored_and_recomputed_teacher_matrices_give_the_same_loss(tmp_path) -> None:
    data = tiny_dataset(40)
    student, teacher = _resnet(8, seed=1), Teacher(_resnet(14, seed=2))
    stored = _prepared(student, teacher, data, store_teacher=True, store_dir=str(tmp_path), shuffle_seed=3)
    live = _prepared(student, teacher, data, store_teacher=False, shuffle_seed=3)
    assert not stored.runs_teacher_every_step and live.runs_teacher_every_step
    # one teacher-cache entry per teacher pair, under the key of (teacher weights, data, preprocessing, device)
    assert set(_entries(tmp_path, teacher, data)) == {"fsp_stem__stage1.bin", "fsp_stage1__stage2.bin",
                                                      "fsp_stage2__stage3.bin"}
    batch = next(_loader(data).epoch(1))
    assert stored.teacher_outputs(teacher, batch.inputs) is None  # no teacher pass with stored targets
    s_out = run_student(student, batch.inputs, live.student_layers)
    torch.testing.assert_close(
        stored(s_out, None, batch.targets, batch.index)["fsp"],
        live(s_out, live.teacher_outputs(teacher, batch.inputs), batch.targets, batch.index)["fsp"])
    with pytest.raises(ValueError, match="needs the batch's dataset indices"):
        stored(s_out, None, batch.targets)


def test_the_stored_matrices_are_unshuffled_and_each_seed_shuffles_them_when_read(tmp_path) -> None:
    data = tiny_dataset(40)
    student, teacher = _resnet(8, seed=1), Teacher(_resnet(14, seed=2))
    pairs = [["stem", "stage1"], ["stage1", "stage2"]]
    first = _prepared(student, teacher, data, store_teacher=True, store_dir=str(tmp_path), pairs=pairs,
                      shuffle_seed=5)
    files = _entries(tmp_path, teacher, data)
    # on disk: G of the teacher as it is, whatever the seed
    everything = next(BatchLoader(data, len(data)).epoch(0))
    feats = teacher(everything.inputs, first.teacher_layers).features
    on_disk = TeacherCache(tmp_path, cache_key(teacher, data)).load("fsp_stage1__stage2", len(data))
    torch.testing.assert_close(on_disk, fsp_matrix(feats["stage1"], feats["stage2"]))
    batch = next(_loader(data).epoch(2))
    s_out = run_student(student, batch.inputs, first.student_layers)
    t_out = teacher(batch.inputs, first.teacher_layers)
    for seed, method in ((5, first), (6, None), (None, None)):
        if method is None:
            method = _prepared(student, teacher, data, store_teacher=True, store_dir=str(tmp_path), pairs=pairs,
                               shuffle_seed=seed)
        live = _prepared(student, teacher, data, store_teacher=False, pairs=pairs, shuffle_seed=seed)
        torch.testing.assert_close(method(s_out, None, batch.targets, batch.index)["fsp"],
                                   live(s_out, t_out, batch.targets)["fsp"])
    assert _entries(tmp_path, teacher, data) == files  # the other seeds read the same entries, unchanged


def _fit(student, teacher, data, cache_dir, *, augment=None, **params) -> list[dict]:
    train = TrainConfig(epochs=2, batch_size=16, augment=augment or {},
                        optimizer={"name": "adamw", "lr": 0.001, "weight_decay": 0.0})
    torch.manual_seed(0)
    trainer = Trainer(copy.deepcopy(student), data, data, [Stage(create_method("fsp", **params), train)],
                      teacher=teacher, teacher_cache=cache_dir, progress=False, echo=lambda line: None)
    return trainer.fit()


def test_the_trainer_stores_the_matrices_once_and_reuses_them(tmp_path) -> None:
    data = tiny_dataset(48)
    student, teacher = _resnet(8, seed=1), Teacher(_resnet(14, seed=2))
    live = counting(teacher)
    live_history = _fit(student, live, data, None)  # teacher.cache off: the teacher runs every step
    assert live.calls == 1 + 2 * 3  # setup's shape check + 2 epochs of 3 steps
    first = counting(teacher)
    first_history = _fit(student, first, data, tmp_path)  # store_teacher auto, cache on, no augmentation
    assert first.calls == 1 + 1  # setup + one batch (of 512) computing every example's matrices
    assert len(_entries(tmp_path, teacher, data)) == 3
    again = counting(teacher)
    again_history = _fit(student, again, data, tmp_path)
    assert again.calls == 1  # setup only: the matrices come from disk
    for history in (first_history, again_history):
        assert [r["train_loss"] for r in history] == pytest.approx([r["train_loss"] for r in live_history],
                                                                  rel=1e-4)


@pytest.mark.parametrize("damage", ["truncate", "flip_bytes", "no_header"])
def test_a_damaged_stored_entry_is_rebuilt_alone(tmp_path, damage) -> None:
    data = tiny_dataset(40)
    student, teacher = _resnet(8, seed=1), Teacher(_resnet(14, seed=2))
    reference = _prepared(student, teacher, data, tmp_path)  # auto, with a cache folder: stored
    assert (not reference.runs_teacher_every_step)
    expected = [g.clone() for g in reference._stored.targets.values()]
    before = _entries(tmp_path, teacher, data)
    folder = tmp_path / cache_key(teacher, data)
    damaged = folder / "fsp_stage1__stage2.bin"
    raw = bytearray(damaged.read_bytes())
    if damage == "truncate":  # a write cut short
        damaged.write_bytes(raw[: len(raw) // 3])
    elif damage == "flip_bytes":  # same size, plausible floats: only the checksum can tell
        raw[64:72] = torch.tensor([1e3, -1e3]).numpy().tobytes()
        damaged.write_bytes(raw)
    else:  # killed after the data, before the header
        damaged.with_suffix(".json").unlink()
    fresh = counting(teacher)
    with pytest.warns(CacheRebuiltWarning, match="fsp_stage1__stage2.bin"):
        rebuilt = _prepared(student, fresh, data, tmp_path)
    assert fresh.calls == 1 + 1  # setup + one pass over the data for the damaged entry
    for got, want in zip(rebuilt._stored.targets.values(), expected):
        assert torch.equal(got, want)
    after = _entries(tmp_path, teacher, data)
    assert after["fsp_stem__stage1.bin"] == before["fsp_stem__stage1.bin"]  # the intact entries were not rewritten
    assert after["fsp_stage2__stage3.bin"] == before["fsp_stage2__stage3.bin"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rebuilt entry is good
        assert not _prepared(student, counting(teacher), data, tmp_path).runs_teacher_every_step


def test_another_teacher_data_or_pair_gets_its_own_entries(tmp_path) -> None:
    data = tiny_dataset(40)
    student, teacher = _resnet(8, seed=1), Teacher(_resnet(14, seed=2))
    _prepared(student, teacher, data, tmp_path)
    changed = Teacher(_resnet(14, seed=4))
    other_data = tiny_dataset(40, seed=9)
    assert cache_key(changed, data) != cache_key(teacher, data)
    assert cache_key(teacher, other_data) != cache_key(teacher, data)
    for t, d in ((changed, data), (teacher, other_data)):
        fresh = counting(t)
        method = _prepared(student, fresh, d, tmp_path)
        assert fresh.calls == 2  # never served the stale matrices: computed anew
        assert len(_entries(tmp_path, t, d)) == 3
        batch = next(BatchLoader(d, len(d)).epoch(0))
        feats = t(batch.inputs, method.teacher_layers).features
        stored = list(method._stored.targets.values())
        torch.testing.assert_close(stored[2], fsp_matrix(feats["stage2"], feats["stage3"]))
    # a new pair under the same key adds its entry next to the others
    pair = _prepared(student, counting(teacher), data, tmp_path, pairs=[["stem", "stage2"]])
    assert pair.entry_names == ["fsp_stem__stage2"]
    assert len(_entries(tmp_path, teacher, data)) == 4


def test_when_auto_stores_and_where_true_stores(tmp_path) -> None:
    data = tiny_dataset(40)
    student, teacher = _resnet(8, seed=1), Teacher(_resnet(14, seed=2))
    augmented = BatchLoader(data, 16, shuffle=True, augment=Augment(crop_padding=1))

    def prepare(loader=None, cache_dir=None, **kwargs):
        params = {k: kwargs.pop(k) for k in ("store_teacher", "store_dir") if k in kwargs}
        method = create_method("fsp", **params)
        method.setup(student, teacher, _example())
        prepare_stored_targets(method, teacher, loader or _loader(data), cache_dir, **kwargs)
        return (not method.runs_teacher_every_step)

    assert prepare(cache_dir=tmp_path / "c1")  # auto, cache on
    assert not prepare()  # auto, teacher cache off (no folder): runs the teacher
    assert not prepare(augmented, tmp_path / "c2")  # auto never stores for augmented batches
    size_mb = 40 * (16 * 16 + 16 * 32 + 32 * 64) * 4 / 2**20
    assert prepare(cache_dir=tmp_path / "c3", max_mb=size_mb)
    assert not prepare(cache_dir=tmp_path / "c4", max_mb=0.99 * size_mb)  # over the budget
    assert not prepare(cache_dir=tmp_path / "c5", store_teacher=False)
    assert not (tmp_path / "c2").exists() and not (tmp_path / "c4").exists() and not (tmp_path / "c5").exists()
    # true: whatever the budget; store_dir, else the cache, else the run folder, else memory
    assert prepare(cache_dir=tmp_path / "c6", max_mb=0.001, store_teacher=True)
    assert prepare(run_dir=tmp_path / "run", store_teacher=True)
    assert prepare(store_teacher=True)
    assert prepare(store_teacher="auto", store_dir=str(tmp_path / "mine"))
    for folder in ("c1", "c3", "c6", "run", "mine"):
        assert len(_entries(tmp_path / folder, teacher, data)) == 3, folder
    with pytest.raises(ValueError, match="store_teacher=true keeps one teacher target per training example"):
        prepare(augmented, tmp_path / "c7", store_teacher=True)


def test_stored_matrices_are_refused_with_augmentation_before_training() -> None:
    data = tiny_dataset(40)
    method = create_method("fsp", store_teacher=True)
    train = TrainConfig(epochs=1, batch_size=16, augment={"crop_padding": 1})
    with pytest.raises(ValueError, match=r"only valid without augmentation.*crop_padding=1"):
        Trainer(_resnet(8), data, data, [Stage(method, train)], teacher=Teacher(_resnet(8, seed=2)),
                progress=False).fit()


def test_channel_counts_that_differ_are_named() -> None:
    method = create_method("fsp")
    with pytest.raises(ValueError, match="fsp pair 1: student layer 'stem' has 16 channels but teacher layer "
                                         "'stem' has 32"):
        method.setup(_resnet(8), Teacher(_resnet(8, width=2)), _example())


def test_spatial_sizes_that_cannot_be_pooled_are_named() -> None:
    # on 10×10 inputs the stages give 10×10, 5×5 and 3×3 maps: 10 is no multiple of 3
    method = create_method("fsp", pairs=[["stage1", "stage3"]])
    with pytest.raises(ValueError, match=r"fsp pair 1: student layers 'stage1' \(10×10\) and 'stage3' \(3×3\).*"
                                         "cannot be max-pooled"):
        method.setup(_resnet(8, size=10), Teacher(_resnet(8, size=10, seed=2)), _example(10))


def test_teacher_pairs_with_other_names_and_vector_layers() -> None:
    student = _resnet(8)
    teacher_net = create_model("cnn", in_channels=1, num_classes=10, input_size=8, width=16)
    method = create_method("fsp", pairs=[["stem", "stage1"]], teacher_pairs=[["stage1.0", "stage1.1"]])
    method.setup(student, Teacher(teacher_net), _example())  # 16 channels on both sides: fine
    bad = create_method("fsp", pairs=[["stem", "head"]], teacher_pairs=[["stage1.0", "stage1.1"]])
    with pytest.raises(ValueError, match="fsp pair 1: student layers 'stem'.*'head'.*must both give feature maps"):
        bad.setup(student, Teacher(teacher_net), _example())
    with pytest.raises(ValueError, match=r"pairs / teacher_pairs.*no layer named 'stage1\.9'"):
        create_method("fsp", pairs=[["stem", "stage1.9"]]).setup(student, Teacher(_resnet(8)), _example())
