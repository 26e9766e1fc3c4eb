"""In-memory datasets of any sample shape: kept as given, normalised as stated, labels checked, split by class."""

from __future__ import annotations

import pytest
import torch

from distillery.data import (
    BatchLoader,
    ImageDataset,
    InMemoryDataset,
    Normalisation,
    from_torch_dataset,
    normalise,
    stratified_split,
)

SHAPES = {"vectors": (6,), "signals": (2, 9), "images": (3, 5, 4), "volumes": (2, 3, 4, 5)}  # N×D … N×C×D×H×W


def _served(loader: BatchLoader, epoch: int = 0) -> torch.Tensor:
    """Every example's batch input, put back in dataset order by the batches' indices."""
    out = torch.empty((len(loader.dataset), *loader.dataset.sample_shape))
    for batch in loader.epoch(epoch):
        out[batch.index] = batch.inputs
    return out


def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of each channel (dimension 1) as float32 1×C×1… tensors, computed here independently."""
    dims = [0, *range(2, x.dim())]
    shape = (1, -1, *([1] * (x.dim() - 2)))
    x64 = x.double()
    return x64.mean(dims).float().view(shape), x64.std(dims).float().view(shape)


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, inputs: torch.Tensor, labels: list) -> None:
        self.inputs, self.labels = inputs, labels

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int):
        return self.inputs[i], self.labels[i]


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_any_sample_shape_round_trips_through_the_loader(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, *shape, generator=g) * 3 + 1
    labels = torch.arange(40) % 4
    plain = InMemoryDataset(x, labels, Normalisation.none(), 4)
    assert plain.sample_shape == shape and plain.in_channels == shape[0]
    loader = BatchLoader(plain, 7, shuffle=True, seed=2)
    assert torch.equal(_served(loader), x)  # bit for bit: nothing scaled, clamped or reshaped
    assert torch.equal(_served(BatchLoader(plain, 7, keep_normalised=True)), x)
    standardised = plain.with_normalisation(Normalisation.of_data(x))
    mean, std = _channel_stats(x)
    torch.testing.assert_close(torch.tensor(standardised.mean).view(mean.shape), mean)
    torch.testing.assert_close(torch.tensor(standardised.std).view(std.shape), std)
    exact_mean, exact_std = standardised.normalisation.per_channel(len(shape))
    assert torch.equal(_served(BatchLoader(standardised, 7, shuffle=True, seed=2)), (x - exact_mean) / exact_std)


def test_from_torch_dataset_keeps_float_data_bit_identical() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 1, 16, generator=g)  # a 1×L signal: once taken for H×W and made N×1×1×L
    materialised = from_torch_dataset(ListDataset(x, [i % 3 for i in range(30)]), normalisation="none")
    assert materialised.inputs.shape == (30, 1, 16) and torch.equal(materialised.inputs, x)
    assert torch.equal(_served(BatchLoader(materialised, 8, shuffle=True, seed=4)), x)
    standardised = from_torch_dataset(ListDataset(x, [i % 3 for i in range(30)]))  # its own statistics
    assert torch.equal(standardised.inputs, x)  # the data keeps its values; the loader normalises
    mean, std = standardised.normalisation.per_channel(2)
    assert torch.equal(_served(BatchLoader(standardised, 8)), (x - mean) / std)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.int64])
def test_from_torch_dataset_keeps_dtype_and_values(dtype: torch.dtype) -> None:
    x = torch.arange(0, 17).repeat(4, 1).to(dtype)  # values 0..16 (once binarised by a clamp to [0, 1])
    data = from_torch_dataset(ListDataset(x, [0, 1, 0, 1]))
    assert data.inputs.dtype == dtype and torch.equal(data.inputs, x) and data.sample_shape == (17,)


def test_uint8_images_stay_compact_and_are_scaled_by_1_over_255() -> None:
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (12, 3, 4, 4), generator=g, dtype=torch.uint8)
    data = from_torch_dataset(ListDataset(images, [0, 1, 2] * 4))
    assert data.inputs.dtype == torch.uint8 and torch.equal(data.inputs, images)
    mean, std = _channel_stats(images.double() / 255)
    torch.testing.assert_close(torch.tensor(data.mean).view(mean.shape), mean)
    exact_mean, exact_std = data.normalisation.per_channel(3)
    expected = (images.float() / 255 - exact_mean) / exact_std
    assert torch.equal(next(BatchLoader(data, 12).epoch(0)).inputs, expected)
    assert torch.equal(normalise(images, data.normalisation), expected)
    assert torch.equal(normalise(images, Normalisation.none()), images.float() / 255)


def test_a_constant_channel_is_centred_not_divided() -> None:
    x = torch.stack([torch.full((20,), 5.0), torch.linspace(-1, 1, 20)], dim=1)  # N×2, feature 0 constant
    n = Normalisation.of_data(x)
    assert n.mean[0] == 5.0 and n.std[0] == 1.0
    assert n.std[1] == pytest.approx(x[:, 1].double().std().item())


def test_labels_out_of_range_are_refused_naming_them() -> None:
    x = torch.zeros(5, 3)
    with pytest.raises(ValueError, match=r"0\.\.9 \(num_classes=10\); 2 example\(s\) have label\(s\) -1, 200"):
        InMemoryDataset(x, torch.tensor([0, 200, 3, -1, 9]), Normalisation.none(), 10)
    for count in (0, -3):
        with pytest.raises(ValueError, match=f"num_classes must be a positive integer, got {count}"):
            InMemoryDataset(x, torch.zeros(5, dtype=torch.int64), Normalisation.none(), count)
    with pytest.raises(ValueError, match="labels must be integer class indices, got dtype torch.float32"):
        InMemoryDataset(x, torch.zeros(5), Normalisation.none(), 2)
    with pytest.raises(ValueError, match="5 inputs but 4 labels"):
        InMemoryDataset(x, torch.zeros(4, dtype=torch.int64), Normalisation.none(), 2)
    with pytest.raises(ValueError, match=r"label 1\.5 is not a whole-number class index"):
        from_torch_dataset(ListDataset(x, [0, 1, 1.5, 0, 1]))


def test_bad_inputs_and_normalisations_are_refused() -> None:
    with pytest.raises(ValueError, match=r"got shape \(5,\)"):
        InMemoryDataset(torch.zeros(5), torch.zeros(5, dtype=torch.int64), Normalisation.none(), 1)
    with pytest.raises(ValueError, match="2 values per statistic but .* have 3 channels"):
        InMemoryDataset(torch.zeros(5, 3, 4), torch.zeros(5, dtype=torch.int64), Normalisation((0, 0), (1, 1)), 1)
    with pytest.raises(ValueError, match="std must be positive"):
        Normalisation((0.0,), (0.0,))
    with pytest.raises(ValueError, match=r"item 1 of ListDataset has shape \(4,\)"):
        from_torch_dataset(ListDataset([torch.zeros(3), torch.zeros(4)], [0, 1]))
    with pytest.raises(ValueError, match="no spatial size; use sample_shape"):
        _ = InMemoryDataset(torch.zeros(5, 3), torch.zeros(5, dtype=torch.int64), Normalisation.none(), 1).input_size


def test_the_older_image_dataset_form_still_builds_the_same_dataset() -> None:
    images, labels = torch.zeros(4, 1, 3, 3, dtype=torch.uint8), torch.tensor([0, 1, 0, 1])
    new = InMemoryDataset(images, labels, Normalisation((0.2,), (0.3,)), 2)
    for old in (ImageDataset(images, labels, (0.2,), (0.3,), 2), ImageDataset(images, labels, (0.2,), (0.3,),
                                                                              num_classes=2)):
        assert old.normalisation == new.normalisation and old.num_classes == 2
        assert old.images is old.inputs and (old.mean, old.std) == ((0.2,), (0.3,)) and old.input_size == 3
    with pytest.raises(TypeError, match="without a std"):
        ImageDataset(images, labels, (0.2,), 2)


def test_stratified_split_is_disjoint_seeded_and_keeps_class_proportions() -> None:
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 17 + [3] * 3)
    data = InMemoryDataset(torch.arange(100.0)[:, None], labels, Normalisation.none(), 4)  # input = position
    train, val = stratified_split(data, 0.2, seed=3)
    train_ids, val_ids = set(train.inputs[:, 0].tolist()), set(val.inputs[:, 0].tolist())
    assert not train_ids & val_ids and len(train_ids | val_ids) == 100 and len(val) == 20
    held = torch.bincount(val.labels, minlength=4)
    exact = torch.bincount(labels).double() * 0.2  # 10, 6, 3.4, 0.6
    assert ((held - exact).abs() < 1).all(), held
    assert torch.equal(labels[val.inputs[:, 0].long()], val.labels)  # each example keeps its own label
    assert torch.equal(stratified_split(data, 0.2, seed=3)[1].inputs, val.inputs)
    other = stratified_split(data, 0.2, seed=4)[1]
    assert not torch.equal(other.inputs, val.inputs)
    assert train.normalisation == val.normalisation == data.normalisation
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        stratified_split(data, 1.0, seed=0)


def test_subset_and_without_classes_keep_everything_else() -> None:
    data = InMemoryDataset(torch.arange(20.0).view(10, 2), torch.arange(10) % 3, Normalisation((1.0,), (2.0,)), 3,
                           class_names=("a", "b", "c"))
    small = data.subset(4, seed=1)
    assert len(small) == 4 and small.class_names == ("a", "b", "c") and small.normalisation == data.normalisation
    rest = data.without_classes((1,))
    assert 1 not in rest.labels.tolist() and len(rest) == 7 and rest.num_classes == 3


def test_statistics_over_many_chunks_equal_the_one_pass_formula(monkeypatch: pytest.MonkeyPatch) -> None:
    from distillery.data import datasets

    monkeypatch.setattr(datasets, "_STATS_CHUNK_VALUES", 7)  # 2×3×4 values a sample: one example per chunk
    x = torch.randint(0, 256, (25, 3, 2, 4), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    n = Normalisation.of_data(x)
    mean, std = _channel_stats(x.double() / 255)
    torch.testing.assert_close(torch.tensor(n.mean).view(mean.shape), mean)
    torch.testing.assert_close(torch.tensor(n.std).view(std.shape), std)
