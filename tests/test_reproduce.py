"""distillery reproduce: statistics, report, run reuse, and each experiment end to end on tiny data.

Also the Trainer hook the reproductions added (weight snapshots at given epochs, for Defective KD).
"""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import pytest
import torch
from tiny_idx import one_thread, tiny_dataset, write_tiny_fmnist  # noqa: F401  (one_thread: an autouse fixture)

from distillery.cli import main
from distillery.config import ModelConfig, TrainConfig
from distillery.methods import create_method
from distillery.models.mlp import MLP
from distillery.networks import load_trained_model
from distillery.reproduce import EXPERIMENTS, Env, ExperimentResult, run_experiment
from distillery.reproduce.hinton import accuracy_with_bias, choose_bias
from distillery.reproduce.report import Claim, build_rows, markdown_table
from distillery.reproduce.runs import (
    RUN_OVERHEAD,
    DataSpec,
    RunSpec,
    TeacherRef,
    estimate_seconds,
    run_spec,
    run_status,
    stage,
)
from distillery.runner import default_folder
from distillery.stats import mean_std, paired_difference, t_cdf, t_quantile, verdict
from distillery.train import Stage as TrainStage
from distillery.train import Trainer, load_checkpoint
from distillery.train.loop import snapshot_path

# ------------------------------------------------------------------ Trainer: snapshots at given epochs


def _mlp() -> MLP:
    torch.manual_seed(0)
    return MLP(64, [16], 10)


def _fit(tmp: Path, epochs: int, snapshots: tuple[float, ...]) -> Trainer:
    train = TrainConfig.model_validate({"epochs": epochs, "batch_size": 16, "schedule": {"name": "constant"}})
    trainer = Trainer(_mlp(), tiny_dataset(128), tiny_dataset(32, seed=1), [TrainStage(create_method("ce"), train)],
                      run_dir=tmp, progress=False, echo=lambda line: None, snapshot_epochs=snapshots)
    trainer.fit()
    return trainer


def test_snapshots_hold_the_weights_reached_at_those_epochs(tmp_path: Path) -> None:
    long = _fit(tmp_path / "long", epochs=2, snapshots=(0.25, 1))
    short = _fit(tmp_path / "short", epochs=1, snapshots=())
    after_one = load_checkpoint(snapshot_path(tmp_path / "long", 1))["student"]
    quarter = load_checkpoint(snapshot_path(tmp_path / "long", 0.25))["student"]
    # Batches depend only on (seed, epoch, step) and the lr is constant: the 2-epoch run after its
    # first epoch is exactly the 1-epoch run.
    for name, value in short.student.state_dict().items():
        assert torch.equal(after_one[name], value), name
    final = long.student.state_dict()
    assert not torch.equal(quarter["classifier.weight"], after_one["classifier.weight"])
    assert not torch.equal(after_one["classifier.weight"], final["classifier.weight"])
    # A snapshot loads like a checkpoint, with the model given.
    spec = ModelConfig(name="mlp", kwargs={"hidden": [16]})
    model, _ = load_trained_model(snapshot_path(tmp_path / "long", 0.25), spec, tiny_dataset(8))
    assert torch.equal(model.state_dict()["classifier.weight"], quarter["classifier.weight"])


@pytest.mark.parametrize("bad", [0.0, -1.0, 3.0])
def test_snapshot_epochs_outside_the_run_are_refused(tmp_path: Path, bad: float) -> None:
    with pytest.raises(ValueError, match=r"snapshot_epochs must lie in \(0, 2\]"):
        _fit(tmp_path, epochs=2, snapshots=(bad,))


# ------------------------------------------------------------------ statistics


@pytest.mark.parametrize(("df", "expected"), [(1, 12.7062), (2, 4.3027), (4, 2.7764), (10, 2.2281), (30, 2.0423),
                                              (120, 1.9799)])
def test_t_quantile_matches_the_printed_tables(df: int, expected: float) -> None:
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)
    assert t_quantile(0.025, df) == pytest.approx(-expected, abs=1e-4)
    assert t_cdf(t_quantile(0.9, df), df) == pytest.approx(0.9, abs=1e-9)


def test_mean_std_is_the_sample_standard_deviation() -> None:
    values = [88.1, 89.4, 87.2, 90.0]
    mean, std = mean_std(values)
    assert mean == pytest.approx(statistics.mean(values))
    assert std == pytest.approx(statistics.stdev(values))
    assert mean_std([3.0]) == (3.0, 0.0)


def test_paired_interval_by_hand() -> None:
    # d = (2.0, 2.5, 3.0, 2.5): mean 2.5, sd = sqrt(0.5 / 3), t_{0.975, 3} = 3.18245,
    # half-width = 3.18245 · 0.408248 / 2 = 0.649614.
    diff = paired_difference([90.0, 91.5, 90.0, 92.5], [88.0, 89.0, 87.0, 90.0])
    assert diff.mean == pytest.approx(2.5)
    assert (diff.low, diff.high) == (pytest.approx(1.850386, abs=1e-5), pytest.approx(3.149614, abs=1e-5))
    assert diff.n == 4
    assert verdict(diff, +1) == "yes"
    assert verdict(diff, -1) == "no"
    # d = (1, 2, -3): mean 0, the interval spans 0.
    spans = paired_difference([1.0, 2.0, -3.0], [0.0, 0.0, 0.0])
    assert spans.low < 0 < spans.high
    assert verdict(spans, +1) == verdict(spans, -1) == "inconclusive"
    one = paired_difference([5.0], [4.0])
    assert (one.mean, one.low, one.high) == (1.0, None, None)
    assert verdict(one, +1) == "inconclusive (1 seed)"
    with pytest.raises(ValueError, match="one baseline per setting"):
        paired_difference([1.0, 2.0], [1.0])


# ------------------------------------------------------------------ report table


def test_report_table_rows() -> None:
    values = {"alone": [88.0, 89.0, 87.0, 90.0], "distilled": [90.0, 91.5, 90.0, 92.5], "worse": [80.0, 81, 79, 80]}
    claims = [Claim("alone", None, "146 errors"), Claim("distilled", "alone", "74 vs 146 errors", +1),
              Claim("worse", "alone", "paper says better", +1), Claim("distilled", "worse", "no claim")]
    rows = build_rows(claims, values)
    assert [r.reproduced for r in rows] == ["—", "yes", "no", "—"]
    table = markdown_table(rows).splitlines()
    assert table[0].startswith("| setting | mean ± std | baseline | Δ vs baseline [95 % CI] | paper |")
    assert table[2] == "| alone | 88.50 ± 1.29 | — | — | 146 errors | — |"
    assert table[3] == "| distilled | 91.00 ± 1.22 | alone | +2.50 [+1.85, +3.15] | 74 vs 146 errors | yes |"
    assert "| worse | 80.00 ± 0.82 | alone | -8.50 " in table[4] and table[4].endswith("| no |")
    one_seed = build_rows([Claim("distilled", "alone", "x", +1)], {"alone": [1.0], "distilled": [2.0]})
    assert "+1.00 CI n/a (1 seed)" in markdown_table(one_seed)
    with pytest.raises(KeyError, match="no values for setting 'missing'"):
        build_rows([Claim("missing", "alone")], values)


# ------------------------------------------------------------------ Hinton's bias correction


def test_bias_correction_picks_the_smallest_shift_that_maximises_accuracy() -> None:
    # Class 1 examples score 2.05 lower on their own logit than on class 0: a shift of 2.1 (grid
    # 0.1) makes them right, and larger shifts than 3.0 start to take class-0 examples.
    logits = torch.tensor([[3.0, 0.0]] * 6 + [[2.05, 0.0]] * 4)
    labels = torch.tensor([0] * 6 + [1] * 4)
    bias = choose_bias(logits, labels, cls=1)
    assert bias == pytest.approx(2.1)
    assert accuracy_with_bias(logits, labels, 1, 0.0) == (pytest.approx(60.0), pytest.approx(0.0))
    assert accuracy_with_bias(logits, labels, 1, bias) == (pytest.approx(100.0), pytest.approx(100.0))
    assert accuracy_with_bias(logits, labels, 1, 3.5) == (pytest.approx(40.0), pytest.approx(100.0))


# ------------------------------------------------------------------ run keys and cost estimates


def _folder(spec, out):
    return default_folder(out)(spec)


def _spec(**changes) -> RunSpec:
    base = {"label": "student alone", "model": {"name": "mlp", "kwargs": {"hidden": [800, 800]}},
            "stages": (stage("ce", {}, {"epochs": 2}),), "data": DataSpec(train_size=1000, test_size=100), "seed": 0}
    return run_spec(**{**base, **changes})


def test_run_key_covers_the_config_and_teachers_but_not_label_or_device() -> None:
    spec = _spec()
    assert spec.key == _spec(label="another name", device="cuda").key
    assert spec.key == _spec(stages=(stage("ce", {}, {"epochs": 2, "batch_size": 128}),)).key  # a default spelled out
    assert spec.key != _spec(seed=1).key
    assert spec.key != _spec(data=DataSpec(train_size=1000, test_size=100, omit_classes=(3,))).key
    teacher = _spec(label="teacher", model={"name": "mlp_hinton_teacher"})
    taught = _spec(stages=(stage("hinton", {}, {"epochs": 2}),), teachers=(TeacherRef(teacher),))
    assert taught.key != _spec(stages=(stage("hinton", {}, {"epochs": 2}),),
                               teachers=(TeacherRef(teacher, snapshot=0.5),)).key
    assert taught.key != _spec(stages=(stage("hinton", {}, {"epochs": 2}),),
                               teachers=(TeacherRef(_spec(label="teacher", model={"name": "mlp_hinton_teacher"},
                                                          seed=7)),)).key


def test_cost_estimate_by_hand() -> None:
    # mlp 800-800: 0.104 ms per training image, 0.032 per test image; 2 epochs of 1000 and of 100.
    k = RUN_OVERHEAD / 1000
    assert estimate_seconds(_spec(), 1000, 100) == pytest.approx(k * (2 * 1000 * 0.104 + 2 * 100 * 0.032))
    teacher = _spec(model={"name": "mlp_hinton_teacher"})
    cached = _spec(stages=(stage("hinton", {}, {"epochs": 2}),), teachers=(TeacherRef(teacher),))
    on_the_fly = _spec(stages=(stage("hinton", {}, {"epochs": 2, "augment": {"hflip": True}}),),
                       teachers=(TeacherRef(teacher),))
    # Cached logits: one teacher pass over the data; augmented batches: one per step.
    assert estimate_seconds(cached, 1000, 100) == pytest.approx(k * (2 * 1000 * 0.104 + 1000 * 0.061 + 6.4))
    assert estimate_seconds(on_the_fly, 1000, 100) == pytest.approx(k * (2 * 1000 * (0.104 + 0.061) + 6.4))
    assert estimate_seconds(_spec(model={"name": "pkg.mod:net"}), 1000, 100) is None


# ------------------------------------------------------------------ experiments end to end


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_fmnist(tmp_path_factory.mktemp("data"), n_train=256, n_test=64, size=8)


def _reproduce(name: str, root: Path, out: Path, seeds: int = 2, **kwargs) -> ExperimentResult:
    return run_experiment(EXPERIMENTS[name], "smoke", seeds, out, env=Env("cpu", str(root)), progress=False,
                          echo=lambda line: None, **kwargs)


def _final_accuracy(run_dir: Path) -> float:
    return 100 * json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["test_accuracy"]


def _check_report(result: ExperimentResult, experiment: str, extra_plots: tuple[str, ...]) -> str:
    report = result.report.read_text()
    budget = EXPERIMENTS[experiment].budgets["smoke"]
    claims = EXPERIMENTS[experiment].claims(budget)
    table = report.split("## Results")[1].split("\n## ")[0]
    for claim in claims:  # every setting is in the table, with its baseline when it has one
        assert f"| {claim.setting} | " in table
        if claim.baseline:
            assert f" | {claim.baseline} | " in table
    assert len([line for line in table.splitlines() if line.startswith("| ")]) == len(claims) + 1
    for name in ("settings.png", "differences.png", *extra_plots):
        path = result.out / name
        assert path.read_bytes()[:4] == b"\x89PNG", name
        assert f"]({name})" in report
    assert all(len(v) == 2 for v in result.values.values())  # one value per seed
    return report


def test_hinton_end_to_end(tiny_root: Path, tmp_path: Path) -> None:
    result = _reproduce("hinton", tiny_root, tmp_path / "hinton")
    report = _check_report(result, "hinton", ("accuracy_vs_temperature.png", "omitted_class.png"))
    assert "## Omitted class" in report and "Chosen δ per seed" in report
    # The reported values are the runs' own final test accuracies, seed by seed.
    plan = EXPERIMENTS["hinton"].plan(EXPERIMENTS["hinton"].budgets["smoke"], 1, Env("cpu", str(tiny_root)))
    assert result.values["distilled T=20"][1] == pytest.approx(_final_accuracy(_folder(plan["distilled T=20"],
        result.out)))
    omitted = plan["omitted"]
    assert omitted.data.omit_classes == (3,)
    assert result.values["omit 3: overall accuracy, uncorrected"][1] == pytest.approx(
        _final_accuracy(_folder(omitted, result.out)))
    extras = json.loads((result.out / "results.json").read_text())["extras"]
    assert all(extras[s]["bias"] >= 0 for s in ("0", "1"))
    # The ensemble teacher is made of the seed's teacher and the extra members (other seeds).
    ensemble = plan["ensemble distilled"]
    assert [t.run.seed for t in ensemble.teachers] == [1, 1001]


def test_little_data_end_to_end(tiny_root: Path, tmp_path: Path) -> None:
    result = _reproduce("little_data", tiny_root, tmp_path / "little")
    report = _check_report(result, "little_data", ("accuracy_vs_data.png",))
    assert "## Best epochs" in report
    budget = EXPERIMENTS["little_data"].budgets["smoke"]
    plan = EXPERIMENTS["little_data"].plan(budget, 1, Env("cpu", str(tiny_root)))
    assert plan["teacher"].seed == 0 and plan["teacher"].data.train_size == 160  # one teacher for all seeds
    soft = plan["20 % of the data, soft targets"]
    assert soft.data.train_size == 40 and soft.stages[0].method.ce_weight == 0.0
    # best epoch: the test accuracy at the epoch of the highest validation accuracy, read from the run
    records = [json.loads(line) for line in (_folder(soft, result.out) / "metrics.jsonl").read_text().splitlines()]
    assert all("val_accuracy" in r for r in records) and len(records) == 3
    best = max(range(3), key=lambda k: (records[k]["val_accuracy"], -k))
    assert result.values["20 % of the data, soft targets: best epoch"][1] == pytest.approx(
        100 * records[best]["test_accuracy"])
    assert result.values["20 % of the data, soft targets: last epoch"][1] == pytest.approx(
        100 * records[-1]["test_accuracy"])


def test_best_epoch_is_the_first_highest_validation_epoch() -> None:
    from distillery.reproduce.little_data import best_and_last

    history = [{"val_accuracy": v, "test_accuracy": t} for v, t in ((0.5, 0.4), (0.7, 0.6), (0.7, 0.9), (0.6, 0.5))]
    assert best_and_last(history) == (pytest.approx(60.0), pytest.approx(50.0), 2)


def test_fsp_end_to_end(tiny_root: Path, tmp_path: Path) -> None:
    result = _reproduce("fsp", tiny_root, tmp_path / "fsp")
    report = _check_report(result, "fsp", ("accuracy_vs_iteration.png",))
    assert "## Fast optimisation" in report
    plan = EXPERIMENTS["fsp"].plan(EXPERIMENTS["fsp"].budgets["smoke"], 0, Env("cpu", str(tiny_root)))
    shuffles = [plan[f"shuffled {k}"].stages[0].method.shuffle_seed for k in (1, 2)]
    assert shuffles == [1, 2]
    assert [s.method.name for s in plan["small fitnets"].stages] == ["fitnets", "hinton"]
    fast = plan["fast FSP"]
    assert [s.method.name for s in fast.stages] == ["fsp", "ce"] and fast.stages[1].train.epochs == 1  # 3 / 3
    curves = json.loads((result.out / "results.json").read_text())["extras"]["0"]["curves"]
    assert len(curves["teacher (trained alone)"]) == 3


def test_the_plan_counts_the_experiments_seeds_not_its_runs(tiny_root: Path, tmp_path: Path) -> None:
    # fsp's shuffled teachers train with seeds of their own (seed + 1000 × member); they are not extra seeds.
    lines: list[str] = []
    run_experiment(EXPERIMENTS["fsp"], "smoke", 2, tmp_path, env=Env("cpu", str(tiny_root)), dry_run=True,
                   progress=False, echo=lines.append)
    assert "budget smoke, 2 seed(s):" in lines[0]


def test_tfkd_end_to_end_and_resume(tiny_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "tfkd"
    args = ["reproduce", "tfkd", "--budget", "smoke", "--seeds", "2", "--out", str(out), "--data-root",
            str(tiny_root), "--no-progress"]
    assert main([*args, "--dry-run"]) == 0
    plan_text = capsys.readouterr().out
    assert "16 runs (0 already done)" in plan_text and "De-KD (teacher after 0.2 epochs)" in plan_text
    assert not (out / "runs").exists()  # a dry run trains nothing

    assert main(args) == 0
    report = (out / "report.md").read_text()
    assert "16 trained or continued now, 0 reused" in report
    assert "De-KD teacher after 0.2 epochs (its own accuracy)" in report
    checkpoints = sorted(out.glob("runs/*/*/checkpoint.pt"))
    assert len(checkpoints) == 16
    stamps = {p: p.stat().st_mtime_ns for p in checkpoints}

    assert main(args) == 0  # everything reused: nothing trains, nothing is rewritten
    assert "0 trained or continued now, 16 reused" in (out / "report.md").read_text()
    assert stamps == {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/checkpoint.pt")}

    leaf = next(out.glob("runs/label_smoothing-s1-*"))
    shutil.rmtree(leaf)
    result = _reproduce("tfkd", tiny_root, out)
    assert result.counts == {"trained": 1, "reused": 15}
    _check_report(result, "tfkd", ())


def test_bad_reproduce_input_exits_2(tiny_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for args, message in (
        (["reproduce", "hintn"], "unknown experiment 'hintn'; choose one of hinton, fsp, tfkd"),
        (["reproduce", "fsp", "--budget", "huge"], "has no budget 'huge'; choose one of quick, full"),
        (["reproduce", "fsp", "--seeds", "0"], "--seeds must be >= 1"),
        (["reproduce", "fsp", "--threads", "0"], "--threads must be >= 1"),
    ):
        assert main([*args, "--out", str(tmp_path / "x"), "--dry-run"]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_an_interrupted_run_is_continued_to_the_same_weights(tiny_root: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # The first run trained is seed 0's teacher (2 epochs of 5 batches); stop it in its second epoch.
    original, calls = Trainer._step, []

    def stop_in_epoch_two(self, *args):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(Trainer, "_step", stop_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        _reproduce("hinton", tiny_root, tmp_path / "a", seeds=1)
    monkeypatch.setattr(Trainer, "_step", original)
    plan = EXPERIMENTS["hinton"].plan(EXPERIMENTS["hinton"].budgets["smoke"], 0, Env("cpu", str(tiny_root)))
    teacher = plan["teacher"]
    assert run_status(teacher, tmp_path / "a") == "partial"  # the checkpoint after its first epoch

    result = _reproduce("hinton", tiny_root, tmp_path / "a", seeds=1)
    assert result.counts["trained"] == len(result.specs) and result.counts["reused"] == 0
    fresh = _reproduce("hinton", tiny_root, tmp_path / "b", seeds=1)
    continued = load_checkpoint(_folder(teacher, tmp_path / "a") / "checkpoint.pt")
    uninterrupted = load_checkpoint(_folder(teacher, tmp_path / "b") / "checkpoint.pt")
    assert continued["complete"] and len(continued["history"]) == 2
    for name, value in uninterrupted["student"].items():
        assert torch.equal(continued["student"][name], value), name
    assert result.values == fresh.values
