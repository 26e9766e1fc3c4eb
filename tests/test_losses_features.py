"""Feature-map losses on maps of any rank (N×C×L, N×C×H×W, N×C×D×H×W): FSP matrices and the
pooling to a common size against explicit sums and windows, and against autograd."""

from __future__ import annotations

import pytest
import torch

from distillery.losses import fsp_matrix, pool_to_common_size


def _maps(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _max_over_windows(fmap: torch.Tensor, kernel: tuple[int, ...]) -> torch.Tensor:
    """Non-overlapping max-pooling written out with unfold: one window per output position."""
    for dim, k in enumerate(kernel, start=2):
        fmap = fmap.unfold(dim, k, k)
    return fmap.amax(dim=tuple(range(-len(kernel), 0)))


def test_fsp_matrix_of_1d_maps_is_the_explicit_sum_over_positions() -> None:
    f1, f2 = _maps(2, 3, 5), _maps(2, 4, 5, seed=1)
    expected = torch.zeros(2, 3, 4)
    for x in range(2):
        for i in range(3):
            for j in range(4):
                expected[x, i, j] = sum(f1[x, i, s] * f2[x, j, s] for s in range(5)) / 5
    torch.testing.assert_close(fsp_matrix(f1, f2), expected)


def test_fsp_matrix_of_3d_maps_sums_over_all_positions() -> None:
    f1, f2 = _maps(2, 3, 2, 3, 4), _maps(2, 5, 2, 3, 4, seed=1)
    expected = torch.einsum("nidhw,njdhw->nij", f1, f2) / (2 * 3 * 4)
    torch.testing.assert_close(fsp_matrix(f1, f2), expected)
    # channels-last 3-D maps are read as they lie in memory, to the same G
    last = [f.to(memory_format=torch.channels_last_3d) for f in (f1, f2)]
    torch.testing.assert_close(fsp_matrix(*last), expected)


@pytest.mark.parametrize(("big", "small", "kernel"), [
    ((2, 3, 12), (2, 4, 4), (3,)),
    ((2, 3, 4, 6, 8), (2, 4, 2, 3, 4), (2, 2, 2)),
])
def test_the_larger_map_is_max_pooled_first(big: tuple[int, ...], small: tuple[int, ...],
                                            kernel: tuple[int, ...]) -> None:
    f_big, f_small = _maps(*big), _maps(*small, seed=1)
    pooled = _max_over_windows(f_big, kernel)
    torch.testing.assert_close(fsp_matrix(f_big, f_small), fsp_matrix(pooled, f_small))
    got_big, got_small = pool_to_common_size(f_big, f_small)
    torch.testing.assert_close(got_big, pooled)
    assert got_small is f_small  # the map already at the common size is passed through unchanged


def test_each_spatial_dimension_is_pooled_to_the_smaller_size() -> None:
    tall, wide = _maps(1, 2, 8, 6), _maps(1, 3, 4, 12, seed=1)
    got_tall, got_wide = pool_to_common_size(tall, wide)
    assert got_tall.shape == (1, 2, 4, 6) and got_wide.shape == (1, 3, 4, 6)
    torch.testing.assert_close(got_tall, _max_over_windows(tall, (2, 1)))
    torch.testing.assert_close(got_wide, _max_over_windows(wide, (1, 2)))


@pytest.mark.parametrize(("first", "second", "layout"), [
    ((2, 3, 8), (2, 2, 4), None),
    ((2, 3, 4, 4, 2), (2, 2, 2, 2, 2), None),
    ((2, 3, 4, 4, 2), (2, 2, 2, 2, 2), torch.channels_last_3d),
])
def test_fsp_matrix_gradients_of_other_ranks(first: tuple[int, ...], second: tuple[int, ...],
                                             layout: torch.memory_format | None) -> None:
    f1, f2 = _maps(*first, dtype=torch.float64), _maps(*second, seed=1, dtype=torch.float64)
    if layout is not None:
        f1, f2 = f1.to(memory_format=layout), f2.to(memory_format=layout)
    f1.requires_grad_()
    f2.requires_grad_()
    assert torch.autograd.gradcheck(fsp_matrix, (f1, f2))  # f1 is max-pooled on the way
    if layout is not None:  # the gradients come back in the maps' own layout
        fsp_matrix(f1, f2).square().sum().backward()
        assert f1.grad.is_contiguous(memory_format=layout) and f2.grad.is_contiguous(memory_format=layout)


def test_maps_of_different_layouts_each_keep_their_own() -> None:
    f1 = _maps(2, 3, 4, 4, dtype=torch.float64).to(memory_format=torch.channels_last).requires_grad_()
    f2 = _maps(2, 5, 4, 4, seed=1, dtype=torch.float64).requires_grad_()
    expected = torch.einsum("nihw,njhw->nij", f1, f2) / 16
    torch.testing.assert_close(fsp_matrix(f1, f2), expected)
    assert torch.autograd.gradcheck(fsp_matrix, (f1, f2))
    fsp_matrix(f1, f2).sum().backward()
    assert f1.grad.is_contiguous(memory_format=torch.channels_last) and f2.grad.is_contiguous()


def test_bad_ranks_and_sizes_are_named() -> None:
    with pytest.raises(ValueError, match=r"FSP needs two feature maps of the same rank.*\(2, 3, 8\) and "
                                         r"\(2, 3, 4, 4\)"):
        fsp_matrix(_maps(2, 3, 8), _maps(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"N×C×L, N×C×H×W, N×C×D×H×W; got shapes \(2, 3\) and \(2, 3\)"):
        pool_to_common_size(_maps(2, 3), _maps(2, 3))
    with pytest.raises(ValueError, match="cannot max-pool a 7×4×4 feature map to 2×2×2: along each dimension"):
        pool_to_common_size(_maps(1, 1, 7, 4, 4), _maps(1, 1, 2, 2, 2))
    with pytest.raises(ValueError, match="cannot max-pool a 9 feature map to 4"):
        fsp_matrix(_maps(1, 1, 9), _maps(1, 1, 4))
