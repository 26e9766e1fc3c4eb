"""Feature taps: what they capture, that they clean up, and how they fail."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distillery.methods import Teacher
from distillery.taps import FeatureTaps, UnknownLayerError, check_layer_names


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Sequential(nn.Linear(5, 4), nn.Tanh()), nn.Linear(4, 3))


def test_captured_features_equal_a_manual_computation() -> None:
    net = _net()
    x = torch.randn(7, 6)
    with FeatureTaps(net, ["1", "2.0", "2"]) as taps:
        out = net(x)
    hidden = torch.relu(net[0](x))
    inner = net[2][0](hidden)
    torch.testing.assert_close(taps.features["1"], hidden)
    torch.testing.assert_close(taps.features["2.0"], inner)
    torch.testing.assert_close(taps.features["2"], torch.tanh(inner))
    torch.testing.assert_close(out, net[3](torch.tanh(inner)))


def test_hooks_are_removed_after_the_with_block() -> None:
    net = _net()
    with FeatureTaps(net, ["1", "2.0"]) as taps:
        net(torch.randn(2, 6))
        assert sum(len(m._forward_hooks) for m in net.modules()) == 2
    assert all(len(m._forward_hooks) == 0 for m in net.modules())
    before = taps.features["1"]
    net(torch.randn(2, 6))  # a forward pass after the block records nothing
    assert taps.features["1"] is before


def test_hooks_are_removed_when_the_block_raises() -> None:
    net = _net()
    with pytest.raises(RuntimeError), FeatureTaps(net, ["1"]):
        raise RuntimeError("boom")
    assert all(len(m._forward_hooks) == 0 for m in net.modules())


def test_wrong_name_fails_listing_the_closest_names() -> None:
    net = nn.Sequential()
    net.add_module("stage1", nn.Linear(2, 2))
    net.add_module("stage2", nn.Linear(2, 2))
    with pytest.raises(UnknownLayerError, match=r"no layer named 'stag2'.*Closest names: stage2"):
        FeatureTaps(net, ["stag2"], role="student")
    with pytest.raises(UnknownLayerError, match="student"):
        check_layer_names(net, ["nothing_like_it"], role="student")
    with pytest.raises(UnknownLayerError):
        check_layer_names(net, [""])  # the root module is not a layer name


def test_teacher_taps_carry_no_grad() -> None:
    net = _net()
    net.train()
    teacher = Teacher(net)
    x = torch.randn(3, 6, requires_grad=True)
    out = teacher(x, ["1", "2"])
    assert not net.training
    assert not out.logits.requires_grad
    assert all(not f.requires_grad for f in out.features.values())
    assert all(not p.requires_grad for p in net.parameters())
