"""Each distillation method against its formula, its gradient against autograd, and its set-up checks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from fakes import counting
from tiny_idx import one_thread, tiny_dataset  # noqa: F401  (one_thread: autouse fixture)
from torch import nn

from distillery.cache import cache_key
from distillery.config import AugmentConfig, TrainConfig
from distillery.losses import virtual_teacher_probs
from distillery.methods import METHODS, ModelOutputs, Teacher, create_method, parse_method_spec, run_student
from distillery.models import create_model
from distillery.train import Stage, Trainer

N, K = 6, 5


def _logits(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2


def _targets() -> torch.Tensor:
    return torch.randint(0, K, (N,), generator=torch.Generator().manual_seed(7))


def _total(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(terms.values())


# ---------------------------------------------------------------- logit methods


def test_logit_matching_formula_and_gradient() -> None:
    z_s = _logits(0, N, K).requires_grad_()
    z_t = _logits(1, N, K)
    y = _targets()
    method = create_method("logits", logit_weight=0.7, ce_weight=0.2)
    terms = method(ModelOutputs(z_s), ModelOutputs(z_t), y)
    expected = 0.7 * 0.5 * ((z_s - z_t) ** 2).sum(1).mean() / K + 0.2 * F.cross_entropy(z_s, y)
    torch.testing.assert_close(_total(terms), expected)
    (grad,) = torch.autograd.grad(terms["logits"], z_s)
    torch.testing.assert_close(grad, 0.7 * (z_s - z_t).detach() / (N * K))  # per example (z_s − z_t)/K
    assert set(create_method("logits")(ModelOutputs(z_s), ModelOutputs(z_t), y)) == {"logits"}  # ce_weight 0


def test_ensemble_of_one_teacher_equals_hinton() -> None:
    z_s, z_t, y = _logits(0, N, K), _logits(1, N, K), _targets()
    params = {"temperature": 3.0, "kd_weight": 0.6, "ce_weight": 0.4}
    ens = create_method("ensemble", **params)(ModelOutputs(z_s), ModelOutputs(z_t), y)
    hinton = create_method("hinton", **params)(ModelOutputs(z_s), ModelOutputs(z_t), y)
    assert ens.keys() == hinton.keys()
    for key in ens:
        torch.testing.assert_close(ens[key], hinton[key])


def test_ensemble_averages_the_members_softened_distributions() -> None:
    t = 2.5
    z_s = _logits(0, N, K).requires_grad_()
    members = _logits(1, 3, N, K)  # M×N×K, as Teacher stacks them
    y = _targets()
    method = create_method("ensemble", temperature=t, kd_weight=0.8, ce_weight=0.2)
    terms = method(ModelOutputs(z_s), ModelOutputs(members), y)
    p = sum(torch.softmax(members[m] / t, -1) for m in range(3)) / 3
    q = torch.softmax(z_s / t, -1)
    expected_kd = 0.8 * t**2 * (p * (p.log() - q.log())).sum(1).mean()
    torch.testing.assert_close(terms["kd"], expected_kd)
    torch.testing.assert_close(terms["ce"], 0.2 * F.cross_entropy(z_s, y))
    (grad,) = torch.autograd.grad(terms["kd"], z_s)
    torch.testing.assert_close(grad, 0.8 * t * (q - p).detach() / N)  # ∂(T²·KL)/∂z_s = T·(q_s − p)


def test_label_smoothing_target_and_loss() -> None:
    z_s = _logits(0, N, K).requires_grad_()
    y = _targets()
    eps = 0.2
    terms = create_method("label_smoothing", smoothing=eps)(ModelOutputs(z_s), None, y)
    target = (1 - eps) * F.one_hot(y, K).float() + eps / K
    expected = -(target * torch.log_softmax(z_s, -1)).sum(1).mean()
    torch.testing.assert_close(terms["ls"], expected)
    torch.testing.assert_close(terms["ls"], F.cross_entropy(z_s, y, label_smoothing=eps))
    (grad,) = torch.autograd.grad(terms["ls"], z_s)
    torch.testing.assert_close(grad, (torch.softmax(z_s, -1) - target).detach() / N)


def test_virtual_teacher_puts_a_on_the_true_class_and_sums_to_one() -> None:
    y = _targets()
    probs = virtual_teacher_probs(y, K, 0.9)
    torch.testing.assert_close(probs.sum(1), torch.ones(N))
    torch.testing.assert_close(probs[torch.arange(N), y], torch.full((N,), 0.9))
    off = probs.masked_fill(F.one_hot(y, K).bool(), float("nan"))
    torch.testing.assert_close(off[~off.isnan()], torch.full((N * (K - 1),), 0.1 / (K - 1)))


def test_tfkd_reg_formula_and_gradient() -> None:
    a, t = 0.95, 4.0
    z_s = _logits(0, N, K).requires_grad_()
    y = _targets()
    terms = create_method("tfkd_reg", correct_prob=a, temperature=t, kd_weight=0.3, ce_weight=0.7)(
        ModelOutputs(z_s), None, y)
    p_d = torch.full((N, K), (1 - a) / (K - 1))
    p_d[torch.arange(N), y] = a
    p_t = p_d ** (1 / t) / (p_d ** (1 / t)).sum(1, keepdim=True)  # softened virtual teacher
    q = torch.softmax(z_s / t, -1)
    torch.testing.assert_close(terms["kd"], 0.3 * t**2 * (p_t * (p_t.log() - q.log())).sum(1).mean())
    torch.testing.assert_close(terms["ce"], 0.7 * F.cross_entropy(z_s, y))
    (grad,) = torch.autograd.grad(terms["kd"], z_s)
    torch.testing.assert_close(grad, 0.3 * t * (q - p_t).detach() / N)
    assert p_t.argmax(1).eq(y).all()


# ---------------------------------------------------------------- set-up checks on small real nets


def _resnet(depth: int = 8, num_classes: int = 10, width: int = 1, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(f"resnet{depth}", in_channels=1, num_classes=num_classes, input_size=8, width=width)


EXAMPLE = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("name", ["hinton", "logits", "ensemble", "tfkd_self"])
def test_logit_methods_refuse_a_teacher_with_another_class_count(name: str) -> None:
    with pytest.raises(ValueError, match="teacher outputs 5 classes and the student 10"):
        create_method(name).setup(_resnet(), Teacher(_resnet(num_classes=5)), EXAMPLE)


@pytest.mark.parametrize("name", ["fsp", "fitnets"])
def test_feature_methods_accept_a_teacher_from_another_task(name: str) -> None:
    method = create_method(name)
    teacher = Teacher(_resnet(14, num_classes=5))
    method.setup(_resnet(), teacher, EXAMPLE)
    student = _resnet()
    terms = method(run_student(student, EXAMPLE, method.student_layers),
                   method.teacher_outputs(teacher, EXAMPLE), torch.zeros(4, dtype=torch.long))
    assert all(torch.isfinite(v) and v > 0 for v in terms.values())


def test_single_teacher_methods_refuse_an_ensemble() -> None:
    ensemble = Teacher([_resnet(seed=1), _resnet(seed=2)])
    with pytest.raises(ValueError, match="takes a single teacher, got an ensemble of 2.*'ensemble'"):
        create_method("hinton").setup(_resnet(), ensemble, EXAMPLE)
    method = create_method("ensemble")
    method.setup(_resnet(), ensemble, EXAMPLE)
    assert method.teacher_outputs(ensemble, EXAMPLE).logits.shape == (2, 4, 10)


def test_tfkd_self_needs_the_students_architecture() -> None:
    with pytest.raises(ValueError, match="tfkd_self.*student's architecture.*use method 'hinton'"):
        create_method("tfkd_self").setup(_resnet(8), Teacher(_resnet(14)), EXAMPLE)
    z_s, z_t, y = _logits(0, N, K), _logits(1, N, K), _targets()
    method = create_method("tfkd_self", temperature=2.0)
    method.setup(_resnet(8, seed=1), Teacher(_resnet(8, seed=2)), EXAMPLE)
    hinton = create_method("hinton", temperature=2.0)
    torch.testing.assert_close(_total(method(ModelOutputs(z_s), ModelOutputs(z_t), y)),
                               _total(hinton(ModelOutputs(z_s), ModelOutputs(z_t), y)))


def test_methods_without_teacher_do_not_run_one() -> None:
    teacher = Teacher(_resnet())
    for name in ("ce", "label_smoothing", "tfkd_reg"):
        method = create_method(name)
        method.setup(_resnet(), None, EXAMPLE)
        assert method.teacher_outputs(teacher, EXAMPLE) is None


# ---------------------------------------------------------------- FitNets


def test_fitnets_builds_a_1x1_conv_regressor_and_matches_the_hint_formula() -> None:
    student, teacher = _resnet(8), Teacher(_resnet(14, width=2))  # stage2: 32 vs 64 channels
    method = create_method("fitnets", student_layer="stage2", teacher_layer="stage2", hint_weight=0.5)
    method.setup(student, teacher, EXAMPLE)
    reg = method.regressor
    assert isinstance(reg, nn.Conv2d) and reg.kernel_size == (1, 1)
    assert (reg.in_channels, reg.out_channels) == (32, 64)
    s_out = run_student(student, EXAMPLE, method.student_layers)
    t_out = method.teacher_outputs(teacher, EXAMPLE)
    terms = method(s_out, t_out, torch.zeros(4, dtype=torch.long))
    diff = reg(s_out.features["stage2"]) - t_out.features["stage2"]
    torch.testing.assert_close(terms["hint"], 0.5 * 0.5 * diff.pow(2).mean())  # ½ · mean over examples, elements
    terms["hint"].backward()
    assert reg.weight.grad is not None and reg.weight.grad.abs().sum() > 0
    assert student.stage1[0].conv1.weight.grad.abs().sum() > 0  # below the guided layer: trained
    assert student.stage3[0].conv1.weight.grad is None  # above it: untouched in stage 1
    assert student.head.weight.grad is None


def test_fitnets_uses_a_linear_regressor_for_vectors() -> None:
    torch.manual_seed(0)
    student = create_model("mlp", in_channels=1, num_classes=10, input_size=8, hidden=[12, 6])
    teacher = Teacher(create_model("mlp", in_channels=1, num_classes=3, input_size=8, hidden=[20, 9]))
    method = create_method("fitnets", student_layer="hidden2", teacher_layer="hidden2")
    method.setup(student, teacher, EXAMPLE)
    assert isinstance(method.regressor, nn.Linear)
    assert (method.regressor.in_features, method.regressor.out_features) == (6, 9)


def test_fitnets_hints_are_stored_in_the_teacher_cache_within_the_budget(tmp_path) -> None:
    data = tiny_dataset(48)  # 8×8 images: the stage2 hint is 32×4×4 per example
    student, teacher = _resnet(8, seed=1), Teacher(_resnet(14, seed=2))
    train = TrainConfig(epochs=2, batch_size=16, optimizer={"name": "adamw", "lr": 0.001, "weight_decay": 0.0})

    def fit(cache_dir, max_mb=None, **params):
        counted = counting(teacher)
        torch.manual_seed(0)
        trainer = Trainer(copy.deepcopy(student), data, data, [Stage(create_method("fitnets", **params), train)],
                          teacher=counted, teacher_cache=cache_dir, teacher_cache_max_mb=max_mb, progress=False,
                          echo=lambda line: None)
        losses = [r["train_loss"] for r in trainer.fit()]
        return counted.calls, losses, (not trainer.stages[0].method.runs_teacher_every_step)

    live_calls, live_losses, stored = fit(None)  # teacher cache off: the teacher runs every step
    assert (live_calls, stored) == (1 + 2 * 3, False)
    calls, losses, stored = fit(tmp_path)  # store_teacher auto, cache on, no augmentation, small
    assert (calls, stored) == (1 + 1, True)  # setup + one batch computing every example's hint
    assert losses == pytest.approx(live_losses, rel=1e-4)
    entry = tmp_path / cache_key(teacher, data) / "hint_stage2.bin"
    assert entry.stat().st_size == 48 * 32 * 4 * 4 * 4
    calls, losses, stored = fit(tmp_path)
    assert (calls, stored) == (1, True)  # read back from disk
    assert losses == pytest.approx(live_losses, rel=1e-4)
    size_mb = 48 * 32 * 4 * 4 * 4 / 2**20
    calls, _, stored = fit(tmp_path / "small", max_mb=0.9 * size_mb)  # over the budget: not stored
    assert (calls, stored) == (1 + 2 * 3, False) and not (tmp_path / "small").exists()
    calls, _, stored = fit(tmp_path / "small", max_mb=0.9 * size_mb, store_teacher=True)  # asked: stored
    assert (calls, stored) == (2, True)
    augmented = train.model_copy(update={"augment": AugmentConfig(hflip=True)})
    method = create_method("fitnets", store_teacher=True)
    with pytest.raises(ValueError, match="fitnets' store_teacher=true .* only valid without augmentation"):
        Trainer(_resnet(8), data, data, [Stage(method, augmented)], teacher=teacher, progress=False).fit()


def test_fitnets_refuses_a_map_guiding_a_vector_and_names_the_layers() -> None:
    torch.manual_seed(0)
    teacher = Teacher(create_model("mlp", in_channels=1, num_classes=10, input_size=8, hidden=[9]))
    method = create_method("fitnets", student_layer="stage2", teacher_layer="hidden1")
    with pytest.raises(ValueError, match=r"guided student layer 'stage2' \(32, 4, 4\), teacher hint layer "
                                         r"'hidden1' \(9,\)"):
        method.setup(_resnet(), teacher, EXAMPLE)


def test_fitnets_names_the_parameter_of_an_unknown_layer() -> None:
    method = create_method("fitnets", student_layer="stage9")
    with pytest.raises(ValueError, match="student_layer='stage9'.*no layer named 'stage9'"):
        method.setup(_resnet(), Teacher(_resnet()), EXAMPLE)


# ---------------------------------------------------------------- registry and default stages


def test_every_method_is_registered_and_its_default_stages_are_valid_config() -> None:
    assert set(METHODS) >= {"ce", "hinton", "logits", "ensemble", "label_smoothing", "fitnets", "fsp",
                             "tfkd_self", "tfkd_reg"}
    for name, cls in METHODS.items():
        stages = cls.default_stages()
        assert stages[0]["method"]["name"] == name
        for stage in stages:
            parse_method_spec(stage["method"])
    assert [s["method"]["name"] for s in METHODS["fsp"].default_stages()] == ["fsp", "ce"]
    assert [s["method"]["name"] for s in METHODS["fitnets"].default_stages()] == ["fitnets", "hinton"]


def test_unknown_method_parameter_is_an_error() -> None:
    with pytest.raises(ValueError, match="temprature"):
        create_method("tfkd_reg", temprature=3)
    with pytest.raises(ValueError, match="teacher_pairs has 1 entries but pairs has 3"):
        create_method("fsp", teacher_pairs=[["a", "b"]])


def test_a_method_in_a_plain_user_training_loop() -> None:
    """The README's loop: any method, the user's own optimiser and batches."""
    from tiny_idx import tiny_dataset

    data = tiny_dataset(64, seed=1)
    inputs_all = (data.images.float() / 255 - 0.5) / 0.3
    student, teacher = _resnet(8, seed=1), Teacher(_resnet(14, seed=2))
    method = create_method("fitnets")
    method.setup(student, teacher, inputs_all[:8])
    # the hint loss averages over one example's hint elements: SGD's step scales up by as many
    hint_elements = teacher(inputs_all[:1], method.teacher_layers).features["stage2"][0].numel()
    optimizer = torch.optim.SGD([*student.parameters(), *method.parameters()], lr=1e-3 * hint_elements,
                                momentum=0.9)
    losses = []
    for _ in range(4):
        for inputs, targets in zip(inputs_all.split(16), data.labels.split(16)):
            student_out = run_student(student, inputs, method.student_layers)
            terms = method(student_out, method.teacher_outputs(teacher, inputs), targets)
            loss = sum(terms.values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert sum(losses[-4:]) < 0.5 * sum(losses[:4])
    assert all(not p.requires_grad for p in teacher.members[0].parameters())


def test_fitnets_names_spatial_sizes_that_cannot_be_pooled() -> None:
    x = torch.randn(2, 1, 10, 10)  # ResNet stages give 10×10, 5×5 and 3×3 maps
    student = create_model("resnet8", in_channels=1, num_classes=10, input_size=10)
    teacher = Teacher(create_model("resnet8", in_channels=1, num_classes=10, input_size=10))
    method = create_method("fitnets", student_layer="stage1", teacher_layer="stage3")
    with pytest.raises(ValueError, match=r"'stage1' \(16, 10, 10\).*'stage3' \(64, 3, 3\): spatial sizes cannot be "
                                         "pooled to match"):
        method.setup(student, teacher, x)
    ok = create_method("fitnets", student_layer="stage1", teacher_layer="stage2")  # 10×10 pools to 5×5
    ok.setup(student, teacher, x)
    terms = ok(run_student(student, x, ok.student_layers), ok.teacher_outputs(teacher, x), torch.zeros(2).long())
    assert terms["hint"] > 0


def test_kd_weight_schedule_anneals_the_soft_term_linearly() -> None:
    """FitNets' annealed KD weight as Yim et al. ran it: 4 at the first epoch, 1 at the last."""
    from distillery.losses import kd_loss

    method = create_method("hinton", kd_weight_schedule=(4.0, 1.0), temperature=3.0)
    torch.manual_seed(0)
    s, t, y = torch.randn(6, 5), torch.randn(6, 5), torch.randint(0, 5, (6,))
    expected = kd_loss(s, t, 3.0)
    weights = []
    for epoch in range(4):
        method.start_epoch(epoch, 4)
        weights.append(method(ModelOutputs(s), ModelOutputs(t), y)["kd"] / expected)
    assert [round(float(w), 5) for w in weights] == [4.0, 3.0, 2.0, 1.0]
    with pytest.raises(ValueError, match=">= 0"):
        create_method("hinton", kd_weight_schedule=(4.0, -1.0))
