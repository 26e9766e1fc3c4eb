"""Data sources: idx, arrays (.npz / .npy), image folders (with their compact cache) and Python callables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import TypeAdapter, ValidationError

from distillery.data import DatasetNotFoundError, Normalisation, load_idx_dataset, sources
from distillery.data.sources import CodeNotAllowedError, DataSource, DataSourceError, load_data

SPEC = TypeAdapter(DataSource)


def spec(**fields) -> DataSource:
    return SPEC.validate_python(fields)


def write_image_folder(root: Path, per_class: int = 12, classes: tuple[str, ...] = ("cat", "dog")) -> Path:
    """``per_class`` tiny RGB PNGs per class subfolder, each a different random 5×7 image."""
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).save(root / name / f"{i:02d}.png")
    return root


def folder_spec(root: Path, cache_dir: Path, **fields) -> DataSource:
    return spec(source="image_folder", train=str(root), test_fraction=0.25, size=[4, 6], mode="L",
                cache_dir=str(cache_dir), **fields)


def test_idx_source_is_the_built_in_reader(fake_root: Path) -> None:
    train, test = load_data(spec(source="idx", root=str(fake_root)), seed=0)
    reference = load_idx_dataset("fashion_mnist", "train", fake_root)
    assert torch.equal(train.inputs, reference.inputs) and train.normalisation == reference.normalisation
    assert len(test) == 256
    _, plain = load_data(spec(source="idx", root=str(fake_root), normalise="none"), seed=0)
    assert plain.normalisation == Normalisation.none()


def test_arrays_npz_keeps_shape_and_dtype(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(-300, 300, (40, 2, 9)).astype(np.int16)  # N×C×L signals in their own dtype
    y = (np.arange(40) % 4).astype(np.uint8)
    np.savez(tmp_path / "train.npz", x=x, y=y)
    np.savez(tmp_path / "test.npz", inputs=x[:10], labels=y[:10])  # the other default key names
    train, test = load_data(spec(source="arrays", train=str(tmp_path / "train.npz"),
                                 test=str(tmp_path / "test.npz")), seed=0)
    assert train.inputs.dtype == torch.int16 and train.sample_shape == (2, 9) and len(test) == 10
    assert np.array_equal(train.inputs.numpy(), x) and train.labels.dtype == torch.int64 and train.num_classes == 4
    expected = Normalisation.of_data(torch.from_numpy(x))  # measured on train, applied to both
    assert train.normalisation == test.normalisation == expected


def test_arrays_npy_pair_and_split_fraction(tmp_path: Path) -> None:
    x = np.random.default_rng(1).standard_normal((30, 5)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.arange(30) % 3)
    pair = {"inputs": str(tmp_path / "x.npy"), "labels": str(tmp_path / "y.npy")}
    train, test = load_data(spec(source="arrays", train=pair, test_fraction=0.2, normalise="none"), seed=1)
    assert (len(train), len(test)) == (24, 6) and torch.bincount(test.labels).tolist() == [2, 2, 2]
    rows = {tuple(r) for r in train.inputs.tolist()} | {tuple(r) for r in test.inputs.tolist()}
    assert rows == {tuple(r) for r in x.tolist()}  # every example, bit for bit, in one part or the other


def test_arrays_errors_name_the_file_and_what_was_expected(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", features=np.zeros((4, 2)), y=np.zeros(4, dtype=int))
    with pytest.raises(DataSourceError, match=r"a\.npz: no inputs array under 'x' or 'inputs'; the file holds "
                                              r"'features', 'y'"):
        load_data(spec(source="arrays", train=str(tmp_path / "a.npz"), test_fraction=0.5), seed=0)
    train, _ = load_data(spec(source="arrays", train=str(tmp_path / "a.npz"), test_fraction=0.5,
                              inputs_key="features"), seed=0)
    assert train.inputs.dtype == torch.float64
    np.savez(tmp_path / "b.npz", x=np.zeros((4, 2)), y=np.array([0, 1, 250, 1]))
    with pytest.raises(DataSourceError, match=r"b\.npz: labels must lie in 0\.\.2 \(num_classes=3\)"):
        load_data(spec(source="arrays", train=str(tmp_path / "b.npz"), test_fraction=0.5, num_classes=3), seed=0)
    np.savez(tmp_path / "c.npz", x=np.zeros((4, 2)), y=np.array([0.0, 1.5, 1, 0]))
    with pytest.raises(DataSourceError, match=r"c\.npz\['y'\]: labels must be whole-number class indices"):
        load_data(spec(source="arrays", train=str(tmp_path / "c.npz"), test_fraction=0.5), seed=0)
    np.savez(tmp_path / "d.npz", features=np.zeros((4, 3)), y=np.zeros(4, dtype=int))
    with pytest.raises(DataSourceError, match=r"test inputs .*d\.npz are torch\.float64 of sample shape \(3,\), "
                                              r"but training inputs .*a\.npz are torch\.float64 of \(2,\)"):
        load_data(spec(source="arrays", train=str(tmp_path / "a.npz"), test=str(tmp_path / "d.npz"),
                       inputs_key="features"), seed=0)
    with pytest.raises(DatasetNotFoundError, match="missing.npz not found"):
        load_data(spec(source="arrays", train=str(tmp_path / "missing.npz"), test_fraction=0.5), seed=0)
    with pytest.raises(ValidationError, match="exactly one of 'test'"):
        spec(source="arrays", train="a.npz")


def test_image_folder_loads_uint8_images_with_recorded_class_names(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "pets")
    train, test = load_data(folder_spec(root, tmp_path / "cache"), seed=0)
    assert train.inputs.dtype == torch.uint8 and train.sample_shape == (1, 4, 6)
    assert (len(train), len(test)) == (18, 6) and train.class_names == ("cat", "dog") == test.class_names
    with Image.open(root / "dog" / "03.png") as image:
        expected = np.array(image.convert("L").resize((6, 4), Image.Resampling.BILINEAR))
    both = torch.cat([train.inputs, test.inputs])
    assert any(torch.equal(img[0], torch.from_numpy(expected)) for img in both[torch.cat([train.labels,
                                                                                          test.labels]) == 1])


def test_image_folder_corrupt_file_and_empty_class_fail_naming_them(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "pets", per_class=3)
    (root / "dog" / "01.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(DataSourceError, match=r"pets/dog/01\.png: cannot read the image"):
        load_data(folder_spec(root, tmp_path / "cache"), seed=0)
    (root / "dog" / "01.png").unlink()
    (root / "bird").mkdir()
    with pytest.raises(DataSourceError, match=r"class folder .*pets/bird holds no image files"):
        load_data(folder_spec(root, tmp_path / "cache"), seed=0)


def test_image_folder_second_load_comes_from_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_image_folder(tmp_path / "pets")
    decoded = []
    read_image = sources._read_image
    monkeypatch.setattr(sources, "_read_image", lambda path, *args: decoded.append(path) or read_image(path, *args))
    first = load_data(folder_spec(root, tmp_path / "cache"), seed=0)
    assert len(decoded) == 24 and len(list((tmp_path / "cache").glob("pets-*.npz"))) == 1
    second = load_data(folder_spec(root, tmp_path / "cache"), seed=0)
    assert len(decoded) == 24  # nothing decoded again
    for a, b in zip(first, second):
        assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels) and a.class_names == b.class_names
    Image.new("RGB", (5, 7)).save(root / "cat" / "new.png")  # the folder changed: read again, cache replaced
    third, _ = load_data(folder_spec(root, tmp_path / "cache"), seed=0)
    assert len(decoded) == 24 + 25 and len(third) == 19
    assert len(list((tmp_path / "cache").iterdir())) == 1  # no temporary file left behind


def test_image_folder_test_folder_must_have_the_same_classes(tmp_path: Path) -> None:
    train_root = write_image_folder(tmp_path / "train", per_class=2)
    test_root = write_image_folder(tmp_path / "test", per_class=2, classes=("cat", "cow"))
    with pytest.raises(DataSourceError, match="missing: dog; not in train: cow"):
        load_data(spec(source="image_folder", train=str(train_root), test=str(test_root), size=4, cache=False),
                  seed=0)


class Squares(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.full((3,), float(i)), i % 2


def make_squares(n: int = 10) -> Squares:
    return Squares(n)


def test_python_source_needs_consent_and_a_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    target = "test_data_sources:make_squares"
    with pytest.raises(CodeNotAllowedError, match="would import module 'test_data_sources'.*--allow-code"):
        load_data(spec(source="python", train=target, test_fraction=0.5), seed=0)
    train, test = load_data(spec(source="python", train=target, test_fraction=0.5, kwargs={"n": 8}), seed=0,
                            allow_code=True)
    assert (len(train), len(test)) == (4, 4) and train.inputs.dtype == torch.float32
    assert sorted(torch.cat([train.inputs, test.inputs])[:, 0].tolist()) == [float(i) for i in range(8)]
    with pytest.raises(DataSourceError, match="returned a object; expected a map-style torch.utils.data.Dataset"):
        load_data(spec(source="python", train="builtins:object", test_fraction=0.5), seed=0, allow_code=True)
    with pytest.raises(DataSourceError, match=r"calling it with kwargs \{'size': 3\} failed"):
        load_data(spec(source="python", train=target, test_fraction=0.5, kwargs={"size": 3}), seed=0, allow_code=True)
