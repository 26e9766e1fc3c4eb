"""Measurements: agreement and KL against their formulas, the timer's summary, threads and batch sizes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from distillery.deploy import (
    SpeedSettings,
    export_model,
    mean_kl,
    model_logits,
    onnx_session,
    onnx_speed,
    top1_accuracy,
    top1_agreement,
    torch_speed,
)
from distillery.deploy.measure import timing_batch
from distillery.models import create_model
from distillery.report import measure
from distillery.report.measure import percentile_nearest_rank, time_calls, torch_threads

FEW_CALLS = SpeedSettings(latency_calls=3, latency_warmup=1, throughput_batch=16, throughput_calls=2,
                          throughput_warmup=0)


def test_agreement_is_the_fraction_of_equal_argmaxes() -> None:
    teacher = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.0, 1.0], [5.0, 4.0, 0.0]])
    model = torch.tensor([[2.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 9.0], [0.0, 4.0, 0.0]])
    assert top1_agreement(teacher, model) == 0.5  # rows 0 and 2 agree
    assert top1_agreement(teacher, teacher) == 1.0
    assert top1_accuracy(teacher, torch.tensor([0, 1, 0, 1])) == 0.5


def test_mean_kl_matches_its_formula() -> None:
    g = torch.Generator().manual_seed(0)
    teacher, model = torch.randn(6, 5, generator=g) * 3, torch.randn(6, 5, generator=g)
    expected = 0.0
    for t_row, m_row in zip(teacher.tolist(), model.tolist()):
        p = [math.exp(v) / sum(math.exp(u) for u in t_row) for v in t_row]
        q = [math.exp(v) / sum(math.exp(u) for u in m_row) for v in m_row]
        expected += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q)) / len(teacher)
    assert mean_kl(teacher, model) == pytest.approx(expected, rel=1e-5)
    assert mean_kl(teacher, teacher) == pytest.approx(0.0, abs=1e-7)
    assert mean_kl(teacher, model + 7.0) == pytest.approx(expected, rel=1e-5)  # softmax ignores a shift
    assert mean_kl(model, teacher) != pytest.approx(expected, rel=1e-2)  # KL is not symmetric


def test_fidelity_functions_refuse_mismatched_logits() -> None:
    with pytest.raises(ValueError, match=r"\(4, 3\) and \(4, 2\)"):
        mean_kl(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="one shape"):
        top1_agreement(torch.zeros(4, 3), torch.zeros(5, 3))


def test_nearest_rank_percentile() -> None:
    assert percentile_nearest_rank([float(v) for v in range(10, 0, -1)], 0.9) == 9.0
    assert percentile_nearest_rank([5.0, 1.0, 3.0], 0.9) == 5.0
    assert percentile_nearest_rank([2.0], 0.9) == 2.0
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        percentile_nearest_rank([1.0], 0.0)


def test_time_calls_summarises_the_timed_calls_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # A fake clock: each timed call takes the next of these durations (seconds).
    durations = iter([0.004, 0.001, 0.003, 0.010, 0.002])
    clock = {"now": 0.0, "started": False}

    def perf_counter() -> float:
        if clock["started"]:
            clock["now"] += next(durations)
        clock["started"] = not clock["started"]
        return clock["now"]

    calls = []
    monkeypatch.setattr(measure.time, "perf_counter", perf_counter)
    timing = time_calls(lambda: calls.append(1), calls=5, warmup=2, batch_size=8)
    assert len(calls) == 7
    assert timing.median_ms == pytest.approx(3.0) and timing.p90_ms == pytest.approx(10.0)
    assert (timing.calls, timing.warmup, timing.batch_size) == (5, 2, 8)
    assert timing.images_per_second == pytest.approx(8 / 0.003)


def test_torch_threads_restores_the_count() -> None:
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads must be >= 1"):
        with torch_threads(0):
            pass


def test_speeds_state_their_batches_calls_and_threads(tmp_path: Path) -> None:
    model = create_model("mlp", in_channels=1, num_classes=10, input_size=8, hidden=[16]).train()
    inputs = torch.randn(5, 1, 8, 8)
    speed = torch_speed(model, inputs, threads=1, settings=FEW_CALLS)
    assert model.training  # timed in eval mode, then put back
    assert (speed.latency.batch_size, speed.throughput.batch_size, speed.threads) == (1, 16, 1)
    assert (speed.latency.calls, speed.latency.warmup, speed.throughput.calls) == (3, 1, 2)
    assert speed.latency.p90_ms >= speed.latency.median_ms > 0
    path = export_model(model, inputs[:2], tmp_path / "m.onnx", "onnx").path
    ort_speed = onnx_speed(onnx_session(path, threads=1), inputs, FEW_CALLS)
    assert (ort_speed.threads, ort_speed.throughput.batch_size) == (1, 16)
    assert ort_speed.images_per_second == pytest.approx(16 / (ort_speed.throughput.median_ms / 1000))


def test_timing_batch_cycles_through_the_inputs() -> None:
    inputs = torch.arange(3.0).view(3, 1)
    assert timing_batch(inputs, 7).flatten().tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert timing_batch(inputs, 2).flatten().tolist() == [0, 1]


def test_model_logits_are_eval_mode_logits_and_leave_the_model_alone() -> None:
    model = create_model("mlp", in_channels=1, num_classes=10, input_size=8, hidden=[16], dropout=0.5).train()
    x = torch.randn(300, 1, 8, 8)
    logits = model_logits(model, x, batch_size=64)
    assert model.training
    with torch.no_grad():
        torch.testing.assert_close(logits, model.eval()(x))
