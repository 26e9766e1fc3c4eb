"""The teacher store replays stored views exactly, is shared across seeds, checks itself and reports its cost."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from fakes import counting, random_dataset
from torch import Tensor, nn

from distillery.cache import CacheRebuiltWarning, TeacherCache
from distillery.config import TrainConfig
from distillery.data import Augment, BatchLoader, ImageDataset
from distillery.methods import Teacher, create_method
from distillery.methods.hinton import HintonKD
from distillery.models import create_model
from distillery.teacher_store import (
    CHECK_TOLERANCE,
    StoredTeacher,
    StoreFormat,
    StoreMismatchError,
    StoreSettings,
    reconstruct_top_k,
    store_key,
    top_k_kl,
)
from distillery.train import Callback, Stage, StepEvent, Trainer
from distillery.train.cost import teacher_time

AUGMENT = {"crop_padding": 2, "hflip": True}
STORE = StoreSettings(epochs=2, seed=5)


def make_teacher(seed: int = 1, classes: int = 4) -> Teacher:
    torch.manual_seed(seed)
    return Teacher(create_model("cnn", in_channels=1, num_classes=classes, input_size=8, width=4, fc_width=8))


def make_student() -> nn.Module:
    return create_model("mlp", in_channels=1, num_classes=4, input_size=8, hidden=(16,))


def config(epochs: int = 3, augment: dict | None = None) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=32, augment=AUGMENT if augment is None else augment,
                       schedule={"name": "constant"})


def trainer(data: ImageDataset, teacher: Teacher, cache: Path | None, *, seed: int = 0,
            store: StoreSettings = STORE, method: HintonKD | None = None, epochs: int = 3,
            augment: dict | None = None, echo=lambda line: None) -> Trainer:
    torch.manual_seed(seed)
    return Trainer(make_student(), data, random_dataset(32, seed=9), [Stage(method or create_method("hinton"),
                   config(epochs, augment))], teacher=teacher, teacher_cache=cache, teacher_store=store, seed=seed,
                   progress=False, echo=echo)


class RecordingKD(HintonKD):
    """Hinton KD that records, per (epoch, dataset example), the input it trained on and the teacher's logits."""

    def __init__(self) -> None:
        super().__init__()
        self.epoch = -1
        self.seen: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
        self.orders: list[list[int]] = []

    def start_epoch(self, epoch: int, epochs: int) -> None:
        self.epoch = epoch
        self.orders.append([])

    def teacher_outputs(self, teacher, inputs, index=None):
        out = super().teacher_outputs(teacher, inputs, index)
        for i, example in enumerate(index.tolist()):
            self.seen[(self.epoch, example)] = (inputs[i].clone(), out.logits[i].clone())
        self.orders[-1].extend(index.tolist())
        return out


# ------------------------------------------------------------------ exactness and replay


def test_a_run_reading_the_store_gives_the_losses_of_a_run_with_the_live_teacher_on_the_same_views(tmp_path):
    data, teacher = random_dataset(96), make_teacher()
    live = trainer(data, teacher, None)  # no cache: the teacher runs every step, on the store's views
    live_history = live.fit()
    counted = counting(teacher)
    stored = trainer(data, counted, tmp_path / "cache")
    stored_history = stored.fit()
    assert [c["kind"] for c in live.cost["teacher_calls"]] == ["live"]
    assert [c["kind"] for c in stored.cost["teacher_calls"]] == ["stored"]
    # set-up's class check, the store's class probe, one batch per stored epoch, one check per run epoch
    assert counted.calls == 1 + 1 + STORE.epochs + 3
    for a, b in zip(live_history, stored_history):
        assert math.isclose(a["train_loss"], b["train_loss"], rel_tol=1e-5)
        assert math.isclose(a["train_kd"], b["train_kd"], rel_tol=1e-5)
    for a, b in zip(live.student.state_dict().values(), stored.student.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_runs_of_different_seeds_read_the_same_stored_views_per_example_and_epoch(tmp_path):
    data, teacher = random_dataset(96), make_teacher()
    runs = []
    for seed in (0, 1):
        method = RecordingKD()
        run = trainer(data, teacher, tmp_path / "cache", seed=seed, method=method)
        run.fit()
        runs.append((method, run))
    (first, a), (second, b) = runs
    assert a.cost["stores"][0]["built_epochs"] == 2 and b.cost["stores"][0]["built_epochs"] == 0  # shared
    assert first.orders != second.orders  # the seed still sets the batch order ...
    assert not torch.equal(next(iter(a.student.state_dict().values())), next(iter(b.student.state_dict().values())))
    assert first.seen.keys() == second.seen.keys() and len(first.seen) == 3 * len(data)
    for key, (inputs, logits) in first.seen.items():  # ... but every (epoch, example) sees one view
        assert torch.equal(inputs, second.seen[key][0])
        assert torch.equal(logits, second.seen[key][1])
    for example in range(len(data)):  # 3 epochs cycle through 2 stored ones: epoch 2 replays epoch 0
        assert torch.equal(first.seen[(2, example)][0], first.seen[(0, example)][0])
    assert any(not torch.equal(first.seen[(1, i)][0], first.seen[(0, i)][0]) for i in range(len(data)))
    assert a.cost["stores"][0]["cycles"] == 2 and a.cost["stores"][0]["epochs_run"] == 3


def test_the_views_of_a_stage_the_store_cannot_serve_are_fresh_every_epoch(tmp_path):
    """Only stages the store serves replay its views: the teacher's own training (no teacher) does not."""
    data = random_dataset(96)
    run = Trainer(make_student(), data, random_dataset(32, seed=9), [Stage(create_method("ce"), config())],
                  teacher_cache=tmp_path, teacher_store=STORE, progress=False, echo=lambda line: None)
    loader = run._train_loader(0)
    assert loader.augment_epochs is None and loader.augment_seed == 0  # the run's own seed


def test_a_longer_store_reuses_the_stored_epochs_and_builds_only_the_missing_one(tmp_path):
    data, teacher = random_dataset(96), make_teacher()
    trainer(data, teacher, tmp_path / "cache", epochs=1).fit()
    longer = trainer(data, teacher, tmp_path / "cache", store=StoreSettings(epochs=3, seed=5), epochs=1)
    longer.fit()
    report = longer.cost["stores"][0]
    assert report["epochs_stored"] == 3 and report["built_epochs"] == 1


def test_an_un_augmented_stage_uses_the_store_for_a_compact_format(tmp_path):
    data, teacher = random_dataset(96), make_teacher()
    run = trainer(data, teacher, tmp_path, store=StoreSettings(dtype="float16"), augment={}, epochs=1)
    run.fit()
    report = run.cost["stores"][0]
    assert report["format"] == "float16 logits" and report["epochs_stored"] == 1
    assert report["worst_check_error"] <= 1e-3  # float16 rounding only
    stored: StoredTeacher = run.current.teacher.inner
    batch = next(BatchLoader(data, 40).epoch(0))
    served, live = stored(batch.inputs, index=batch.index).logits, teacher(batch.inputs).logits
    assert served.dtype == torch.float32
    assert torch.allclose(served, live, rtol=2**-10, atol=1e-4)


# ------------------------------------------------------------------ the store checks itself


def _views(data: ImageDataset, store: StoreSettings = STORE) -> BatchLoader:
    return BatchLoader(data, 32, shuffle=True, augment=Augment(**AUGMENT), augment_seed=store.seed,
                       augment_epochs=store.epochs)


def test_a_store_written_by_another_teacher_is_refused_at_the_first_check(tmp_path):
    data, teacher, other = random_dataset(96), make_teacher(1), make_teacher(2)
    views = _views(data)
    written = StoredTeacher.build(other, views, tmp_path, STORE)  # the other teacher's outputs ...
    run = trainer(data, teacher, tmp_path)  # (the trainer lays the teacher out channels-last: part of the key)
    cache = TeacherCache(tmp_path, store_key(teacher, views))
    for epoch, tensor in enumerate(written.epochs):  # ... filed, checksums and all, under this teacher's key
        cache.save(written.format.entry(epoch), tensor.clone())
    with pytest.raises(StoreMismatchError, match=r"entry logits-float32_e0 \(stored epoch 1 of 2\), dataset "
                                                 r"example \d+: .*another teacher"):
        run.fit()
    assert run.history == []  # stopped before the first step


def test_a_store_with_flipped_data_bytes_is_rebuilt_never_used(tmp_path):
    data, teacher = random_dataset(96), make_teacher()
    views = _views(data)
    first = StoredTeacher.build(teacher, views, tmp_path, STORE)
    expected = first.epochs[1].clone()  # (the stored tensors map the file, which is changed in place below)
    entry = Path(first.report.folder) / f"{first.format.entry(1)}.bin"
    raw = bytearray(entry.read_bytes())
    raw[10] ^= 0xFF
    entry.write_bytes(bytes(raw))
    with pytest.warns(CacheRebuiltWarning, match="checksum mismatch"):
        rebuilt = StoredTeacher.build(teacher, views, tmp_path, STORE)
    assert rebuilt.report.built_epochs == 1
    assert torch.equal(rebuilt.epochs[1], expected)


def test_corrupt_values_under_a_valid_checksum_are_refused_at_the_first_check(tmp_path):
    data, teacher = random_dataset(96), make_teacher()
    run = trainer(data, teacher, tmp_path)
    written = StoredTeacher.build(teacher, _views(data), tmp_path, STORE)
    corrupt = written.epochs[0].clone()
    corrupt[:, 0] += 1.0  # every example's first logit moved: whichever entries the check draws are wrong
    TeacherCache(tmp_path, written.report.key).save(written.format.entry(0), corrupt)
    with pytest.raises(StoreMismatchError, match="entry logits-float32_e0"):
        run.fit()


def test_a_check_within_tolerance_passes_and_records_its_error(tmp_path):
    data, teacher = random_dataset(96), make_teacher()
    stored = StoredTeacher.build(teacher, _views(data), tmp_path, STORE)
    stored.set_epoch(3)  # stored epoch 1
    assert stored.report.checked_examples == 32 and stored.report.worst_check_error < CHECK_TOLERANCE
    assert stored.report.epochs_run == [3]


# ------------------------------------------------------------------ top-k


def test_top_k_reconstruction_error_is_bounded_by_the_tail_mass():
    """KL(p ‖ p̃) ≤ r · log(K − k), r the mass outside the top k; 0 when the tail is already uniform."""
    torch.manual_seed(0)
    K, k, T = 20, 5, 4.0
    logits = torch.randn(64, K) * 6
    fmt = StoreFormat(K, top_k=k, temperature=T)
    stored = fmt.encode(logits)
    assert stored.dtype == torch.int16 and stored.shape == (64, k, 2)
    probs, classes = fmt.unpack(stored)
    kl = top_k_kl(logits, probs, classes, T)
    p = torch.softmax(logits / T, dim=-1)
    tail_mass = 1 - p.topk(k, dim=-1).values.sum(-1)
    assert (kl >= -1e-6).all() and (kl <= tail_mass * math.log(K - k) + 2e-3).all()
    assert kl.max() > 1e-3  # a real price on this case
    flat_tail = logits.clone()
    top = flat_tail.topk(k, dim=-1).indices
    flat_tail[torch.ones_like(flat_tail, dtype=torch.bool).scatter(-1, top, False)] = -3.0
    assert top_k_kl(flat_tail, *fmt.unpack(fmt.encode(flat_tail)), T).abs().max() < 2e-3  # float16 only
    served = torch.softmax(fmt.decode(stored) / T, dim=-1)  # the served logits soften to p̃ itself
    assert torch.allclose(served, reconstruct_top_k(probs, classes, K), atol=1e-6)
    assert torch.allclose(served.gather(-1, classes), p.gather(-1, classes), atol=1e-3)


def test_a_top_k_store_reports_its_kl_in_the_run_and_serves_the_reconstruction(tmp_path):
    data, teacher = random_dataset(96), make_teacher(classes=12)
    student = create_model("mlp", in_channels=1, num_classes=12, input_size=8, hidden=(16,))
    run = Trainer(student, data, random_dataset(32, seed=9), [Stage(create_method("hinton", temperature=2.0),
                  config(2))], teacher=teacher, teacher_cache=tmp_path, teacher_store=StoreSettings(2, top_k=3),
                  progress=False, echo=lambda line: None)
    run.fit()
    report = run.cost["stores"][0]
    assert report["format"] == "top-3 of 12 probabilities at T=2 (float16)"
    assert report["checked_examples"] == 64
    assert 0 <= report["top_k_kl_mean"] <= report["top_k_kl_max"] <= math.log(12 - 3)
    assert report["size_mb"] == pytest.approx(2 * 96 * 3 * 2 * 2 / 2**20)  # 2 epochs × N × k × (float16, int16)


@pytest.mark.parametrize(("method", "options"), [("logits", {}), ("hinton", {"standardize": True}),
                                                 ("hinton", {"learnable_temperature": True})])
def test_top_k_is_refused_for_a_method_that_does_not_read_softmax_at_a_fixed_temperature(tmp_path, method, options):
    data, teacher = random_dataset(96), make_teacher()
    run = trainer(data, teacher, tmp_path, store=StoreSettings(2, top_k=2), method=create_method(method, **options))
    with pytest.raises(ValueError, match=f"teacher.store_top_k=2 .* method '{method}' reads the teacher's raw"):
        run.fit()


@pytest.mark.parametrize(("settings", "key"), [({"epochs": -1}, "store_epochs"), ({"top_k": 0}, "store_top_k"),
                                               ({"dtype": "bfloat16"}, "store_dtype")])
def test_bad_store_settings_name_their_key(settings, key):
    with pytest.raises(ValueError, match=f"teacher.{key}"):
        StoreSettings(**settings)


# ------------------------------------------------------------------ the cost report


def test_the_cost_report_splits_the_run_and_estimates_the_store_speedup(tmp_path):
    data, teacher = random_dataset(96), make_teacher()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        live = trainer(data, teacher, None, epochs=1)
        live.fit()
        alone = Trainer(make_student(), data, random_dataset(32, seed=9), [Stage(create_method("ce"), config(1))],
                        progress=False, echo=lambda line: None)
        alone.fit()
        stored = trainer(data, teacher, tmp_path, epochs=1)
        stored.fit()
    assert set(live.cost["seconds"]) == {"teacher", "student", "data", "evaluation", "other"}
    assert live.cost["seconds"]["teacher"] > 0 and live.cost["teacher_calls"][0]["examples"] == 96
    assert alone.cost["seconds"]["teacher"] == 0 and alone.cost["teacher_calls"] == []
    assert live.cost["store_speedup"] is None and live.cost["stores"] == []
    for cost in (live.cost, alone.cost, stored.cost):
        assert all(v >= 0 for v in cost["seconds"].values())
        assert cost["steps_s"] == pytest.approx(sum(cost["seconds"][k] for k in ("teacher", "student", "data")),
                                                abs=1e-5)
    report = stored.cost["stores"][0]
    assert report["served_examples"] == 96 and report["teacher_s_per_example"] > 0
    assert report["build_s"] > 0 and report["built_epochs"] == 2
    assert stored.cost["store_speedup"] == pytest.approx(
        (stored.cost["steps_s"] + report["estimated_saving_s"]) / stored.cost["steps_s"])
    # summed over runs, as `tune` and `compare` report it: each kind of call, the build and the saving
    spent = teacher_time([live.cost, alone.cost, None, stored.cost, stored.cost])
    assert spent.runs == 3  # the run without a teacher and the one without a report are not counted
    assert spent.live_s == pytest.approx(live.cost["teacher_calls"][0]["seconds"]) and spent.cached_s == 0
    assert spent.stored_s == pytest.approx(2 * stored.cost["teacher_calls"][0]["seconds"])
    assert spent.store_build_s == pytest.approx(2 * report["build_s"])
    assert spent.saved_s == pytest.approx(2 * report["estimated_saving_s"])
    assert "saved an estimated" in spent.describe() and teacher_time([live.cost]).saved_s is None


def test_the_echo_says_what_is_stored_and_that_a_longer_stage_cycles(tmp_path):
    lines: list[str] = []
    data, teacher = random_dataset(96), make_teacher()
    trainer(data, teacher, tmp_path, echo=lines.append).fit()
    line = next(line for line in lines if "teacher store" in line)
    assert "float32 logits on 2 stored epoch(s) of augmented views (2 built now" in line
    assert "the stage's 3 epochs cycle through them (epoch e replays stored epoch e mod 2)" in line


def test_store_settings_enter_the_key_of_the_runs_they_change_only():
    from distillery.recipe import load_config, recipe_runs

    base = recipe_runs(load_config(None, ["student.train.augment.crop_padding=2"]))
    stored = recipe_runs(load_config(None, ["student.train.augment.crop_padding=2", "teacher.store_epochs=4"]))
    assert stored.distilled.cache.store == StoreSettings(epochs=4)
    assert stored.distilled.key != base.distilled.key  # its views are the store's
    assert stored.alone.key == base.alone.key and stored.teacher_run.key == base.teacher_run.key
    plain = recipe_runs(load_config(None, ["teacher.store_epochs=4"]))  # no augmentation: nothing changes
    assert plain.distilled.key == recipe_runs(load_config(None, [])).distilled.key
    compact = recipe_runs(load_config(None, ["teacher.store_top_k=3"]))
    assert compact.distilled.key != plain.distilled.key


class Killed(RuntimeError):
    pass


class DieAt(Callback):
    """Raises at the end of a given (epoch, step), as a crash would (its checkpoint is not written)."""

    def __init__(self, epoch: int, step: int) -> None:
        self.at = (epoch, step)

    def on_step_end(self, event: StepEvent) -> None:
        if (event.epoch, event.step) == self.at:
            raise Killed("simulated crash")


def test_a_run_on_the_store_resumed_mid_epoch_reaches_the_uninterrupted_weights(tmp_path):
    data, teacher = random_dataset(96), make_teacher()

    def run(folder: Path, callbacks=()) -> Trainer:
        torch.manual_seed(0)
        cfg = TrainConfig(epochs=3, batch_size=32, augment=AUGMENT, checkpoint_every_steps=1)
        return Trainer(make_student(), data, random_dataset(32, seed=9), [Stage(create_method("hinton"), cfg)],
                       teacher=teacher, teacher_cache=tmp_path / "cache", teacher_store=STORE, run_dir=folder,
                       progress=False, echo=lambda line: None, callbacks=callbacks)

    whole = run(tmp_path / "whole")
    whole.fit()
    with pytest.raises(Killed):
        run(tmp_path / "cut", [DieAt(epoch=2, step=1)]).fit()  # inside the replay of stored epoch 0
    resumed = run(tmp_path / "cut")
    resumed.fit(resume=True)
    assert resumed.cost["stores"][0]["epochs_run"] == 1 and resumed.cost["stores"][0]["built_epochs"] == 0
    for a, b in zip(whole.student.state_dict().values(), resumed.student.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("top_k", [None, 2])
def test_an_ensemble_is_stored_member_by_member(tmp_path, top_k):
    data = random_dataset(96)
    ensemble = Teacher([make_teacher(1).members[0], make_teacher(2).members[0]])
    views = _views(data)
    stored = StoredTeacher.build(ensemble, views, tmp_path, StoreSettings(2, top_k=top_k), temperature=4.0)
    stored.set_epoch(1)
    batch = views.batch_of(torch.arange(40), 1)
    served, live = stored(batch.inputs, index=batch.index).logits, ensemble(batch.inputs).logits
    assert served.shape == live.shape == (2, 40, 4)
    if top_k is None:
        assert torch.equal(served, live)
    else:  # the served logits soften to each member's top-k reconstruction at T
        p_live, p_served = torch.softmax(live / 4.0, dim=-1), torch.softmax(served / 4.0, dim=-1)
        top = p_live.topk(2, dim=-1).indices
        assert torch.allclose(p_served.gather(-1, top), p_live.gather(-1, top), atol=1e-3)
