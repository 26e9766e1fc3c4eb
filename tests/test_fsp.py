"""FSP: the matrix against its double sum, channel shuffling, stored teacher matrices, set-up checks."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_idx import one_thread, tiny_dataset  # noqa: F401  (one_thread: autouse fixture)

from distillery.config import TrainConfig
from distillery.data import BatchLoader
from distillery.losses import fsp_loss, fsp_matrix
from distillery.methods import Teacher, create_method, run_student
from distillery.models import create_model
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


def test_stored_and_recomputed_teacher_matrices_give_the_same_loss(tmp_path, monkeypatch) -> None:
    data = tiny_dataset(40)
    student, teacher = _resnet(8, seed=1), Teacher(_resnet(14, seed=2))
    x = _example()
    stored = create_method("fsp", store_teacher=True, store_dir=str(tmp_path), shuffle_seed=3)
    live = create_method("fsp", shuffle_seed=3)
    for method in (stored, live):
        method.setup(student, teacher, x)
        method.prepare(teacher, _loader(data))
    assert stored.store_file is not None and stored.store_file.exists()
    batch = next(_loader(data).epoch(1))
    assert stored.teacher_outputs(teacher, batch.inputs) is None  # no teacher pass with stored targets
    s_out = run_student(student, batch.inputs, live.student_layers)
    torch.testing.assert_close(
        stored(s_out, None, batch.targets, batch.index)["fsp"],
        live(s_out, live.teacher_outputs(teacher, batch.inputs), batch.targets, batch.index)["fsp"])
    with pytest.raises(ValueError, match="needs the batch's dataset indices"):
        stored(s_out, None, batch.targets)

    # a second run reuses the file instead of recomputing ...
    def no_recompute(*args, **kwargs):
        raise AssertionError("recomputed although a valid stored file exists")

    monkeypatch.setattr(type(stored), "_compute_store", no_recompute)
    reused = create_method("fsp", store_teacher=True, store_dir=str(tmp_path))
    reused.setup(student, teacher, x)
    reused.prepare(teacher, _loader(data))
    assert reused.store_file == stored.store_file
    # ... but a teacher with other weights, or other data, is never served the stale file
    changed = Teacher(_resnet(14, seed=4))
    assert reused.store_key(changed, data) != reused.store_key(teacher, data)
    assert reused.store_key(teacher, tiny_dataset(40, seed=9)) != reused.store_key(teacher, data)
    with pytest.raises(AssertionError, match="recomputed"):
        reused.prepare(changed, _loader(data))


def test_stored_matrices_are_refused_with_augmentation_before_training() -> None:
    data = tiny_dataset(40)
    method = create_method("fsp", store_teacher=True)
    train = TrainConfig(epochs=1, batch_size=16, augment={"crop_padding": 1})
    with pytest.raises(ValueError, match=r"only valid without augmentation.*crop_padding=1"):
        Trainer(_resnet(8), data, data, [Stage(method, train)], teacher=Teacher(_resnet(8, seed=2)), progress=False)


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
    with pytest.raises(ValueError, match="fsp pair 1: student layers 'stem'.*'head'.*must both give N×C×H×W"):
        bad.setup(student, Teacher(teacher_net), _example())
    with pytest.raises(ValueError, match=r"pairs / teacher_pairs.*no layer named 'stage1\.9'"):
        create_method("fsp", pairs=[["stem", "stage1.9"]]).setup(student, Teacher(_resnet(8)), _example())
