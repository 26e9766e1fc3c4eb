"""Bad input through the CLI, one row per mistake: each must exit with code 2, print a message with
the given key words (which key / file / layer, what was expected), and leave every file the user
already had byte-identical.

The workspace (fake 28×28 idx data, a trained teacher and student run, a few checkpoint files) is
built once and copied for every row.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from fakes import five_class_mlp, write_fake_fmnist, write_idx
from pydantic import Field

from distillery import methods
from distillery.cli import EXIT_BAD_INPUT, main
from distillery.methods.base import Method, MethodParams
from distillery.methods.cross_entropy import CrossEntropy


class TapParams(MethodParams):
    student_layer: str = "hidden1"
    teacher_layer: str = "hidden1"
    ce_weight: float = Field(1.0, ge=0, le=1)


class Tap(CrossEntropy):
    """Test-only feature method: taps one layer of each network (exercises the layer-name checks of
    Method.setup / FeatureTaps through the CLI, as fitnets and fsp will)."""

    name = "tap"
    Params = TapParams
    needs_teacher = True

    def setup(self, student, teacher, example) -> None:
        self.student_layers, self.teacher_layers = (self.params.student_layer,), (self.params.teacher_layer,)
        Method.setup(self, student, teacher, example)


class Payload:
    """Unpickling this runs ``os.mkdir(marker)``: proof that a payload ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def base(ws: Path) -> list[str]:
    """Tiny settings: fake data, MLPs, one epoch."""
    return ["--no-progress", "--set", f"output_dir={ws / 'runs'}", "--set", f"data.root={ws / 'data'}",
            "--set", "data.eval_batch_size=64",
            "--set", "teacher.model={name: mlp, kwargs: {hidden: [16]}}",
            "--set", "teacher.train={epochs: 1, batch_size: 32}",
            "--set", "student.model={name: mlp, kwargs: {hidden: [8]}}",
            "--set", "student.train={epochs: 1, batch_size: 32}"]


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out + err


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("ws")
    write_fake_fmnist(ws / "data", n_train=64, n_test=32)
    for role in ("teacher", "student"):
        assert main(["train", "--role", role, *base(ws)]) == 0
    ckpt = ws / "ckpt"
    ckpt.mkdir()
    teacher_file = ws / "runs" / "fmnist" / "teacher" / "checkpoint.pt"
    data = teacher_file.read_bytes()
    (ckpt / "truncated.pt").write_bytes(data[: len(data) // 2])
    torch.save(five_class_mlp().state_dict(), ckpt / "five_class.pt")
    torch.save({"format_version": 1, "student": Payload(ws / "PWNED")}, ckpt / "evil.pt")
    torch.save([1, 2, 3], ckpt / "list.pt")
    (ckpt / "config_list.yaml").write_text("- a\n- b\n")
    (ckpt / "config_broken.yaml").write_text("teacher: {model: [\n")
    # datasets: empty, truncated .gz, truncated plain file, labels that do not match the images
    for name, (n_images, n_labels) in {"empty": (0, 0), "mismatch": (64, 60)}.items():
        root = write_fake_fmnist(ws / name, n_train=64, n_test=32)
        write_idx(root / "train-images-idx3-ubyte", torch.zeros(n_images, 28, 28, dtype=torch.uint8).numpy())
        write_idx(root / "train-labels-idx1-ubyte", torch.zeros(n_labels, dtype=torch.uint8).numpy())
    root = write_fake_fmnist(ws / "truncated_gz")
    gz = root / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:100])
    root = write_fake_fmnist(ws / "truncated_raw")
    (root / "train-images-idx3-ubyte.gz").unlink()
    raw = write_idx(root / "train-images-idx3-ubyte", torch.zeros(64, 28, 28, dtype=torch.uint8).numpy(), gz=False)
    raw.write_bytes(raw.read_bytes()[:-10])
    (ws / "no_data").mkdir()
    (ws / "other" / "fmnist" / "student_alone").mkdir(parents=True)
    (ws / "other" / "fmnist" / "student_alone" / "notes.txt").write_text("my notes\n")
    (ws / "runs" / "fmnist" / "student_distilled").mkdir()
    shutil.copy(ws / "ckpt" / "evil.pt", ws / "runs" / "fmnist" / "student_distilled" / "checkpoint.pt")
    return ws


def _set(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


Row = tuple[str, Callable[[Path], list[str]], list[str]]
TEACHER = "runs/fmnist/teacher/checkpoint.pt"
ROWS: list[Row] = [
    # config keys and values
    ("misspelled key", lambda ws: ["train", *base(ws), *_set("student.trian.epochs=2")],
     ["student.trian", "unknown key", "Did you mean 'train'"]),
    ("unknown top-level key", lambda ws: ["train", *base(ws), *_set("learning_rate=0.1")],
     ["learning_rate: unknown key", "Allowed here:", "output_dir"]),
    ("unknown method parameter", lambda ws: ["distill", *base(ws), *_set("distill.stages.0.method.temprature=4")],
     ["temprature", "unknown key", "Did you mean 'temperature'"]),
    ("wrong type (text for an integer)", lambda ws: ["train", *base(ws), *_set("student.train.epochs=ten")],
     ["student.train.epochs", "valid integer", "'ten'"]),
    ("wrong type (list for an integer)", lambda ws: ["train", *base(ws), *_set("student.train.batch_size=[1, 2]")],
     ["student.train.batch_size", "valid integer"]),
    ("temperature zero", lambda ws: ["distill", *base(ws), *_set("distill.stages.0.method.temperature=0")],
     ["temperature", "greater than 0"]),
    ("temperature infinite", lambda ws: ["distill", *base(ws), *_set("distill.stages.0.method.temperature=.inf")],
     ["distill.stages.0.method.temperature", "finite"]),
    ("learning rate infinite", lambda ws: ["train", *base(ws), *_set("student.train.optimizer.lr=.inf")],
     ["student.train.optimizer.lr", "finite"]),
    ("crop padding absurd", lambda ws: ["train", *base(ws), *_set("student.train.augment.crop_padding=100000")],
     ["student.train.augment.crop_padding", "64"]),
    ("duplicate YAML key in --set", lambda ws: ["train", *base(ws), "--set", "seed={a: 1, a: 2}"],
     ["--set seed", "duplicate"]),
    ("invalid YAML in --set", lambda ws: ["train", *base(ws), "--set", "seed=[1, 2"],
     ["--set seed", "not valid YAML"]),
    ("run name with a newline", lambda ws: ["train", *base(ws), "--set", "name=\"a\\nb\""],
     ["name must be a plain folder name"]),
    ("training subset larger than the data", lambda ws: ["train", *base(ws), *_set("data.train_subset=100000")],
     ["100000", "data.train_subset", "holds"]),
    ("test subset larger than the data", lambda ws: ["train", *base(ws), *_set("data.test_subset=100000")],
     ["100000", "data.test_subset", "holds"]),
    ("output folder is a file", lambda ws: ["train", *base(ws), *_set(f"output_dir={ws / 'ckpt' / 'list.pt'}")],
     ["list.pt"]),
    ("temperature negative", lambda ws: ["distill", *base(ws), *_set("distill.stages.0.method.temperature=-2")],
     ["temperature", "greater than 0", "-2"]),
    ("weight above 1", lambda ws: ["distill", *base(ws), *_set("distill.stages.0.method.kd_weight=1.5")],
     ["kd_weight", "less than or equal to 1"]),
    ("weight below 0", lambda ws: ["distill", *base(ws), *_set("distill.stages.0.method.ce_weight=-0.1")],
     ["ce_weight", "greater than or equal to 0"]),
    ("learning rate zero", lambda ws: ["train", *base(ws), *_set("student.train.optimizer.lr=0")],
     ["student.train.optimizer.lr", "greater than 0"]),
    ("unknown method", lambda ws: ["distill", *base(ws), "--method", "hintn"],
     ["unknown method 'hintn'", "Did you mean hinton"]),
    ("unknown model", lambda ws: ["train", "--role", "student", *base(ws), *_set("student.model.name=mlpp")],
     ["unknown model 'mlpp'", "Did you mean mlp"]),
    ("model option it does not take",
     lambda ws: ["train", "--role", "student", *base(ws), *_set("student.model.kwargs.depth=3")],
     ["model 'mlp' cannot be built", "'depth'"]),
    ("unknown device", lambda ws: ["train", *base(ws), *_set("device=tpu")],
     ["device must be cpu, cuda, cuda:N or mps", "'tpu'"]),
    ("CUDA not available", lambda ws: ["train", *base(ws), *_set("device=cuda")] if not torch.cuda.is_available()
     else pytest.skip("this machine has CUDA"), ["CUDA is not available", "device: cpu"]),
    ("run name with a slash", lambda ws: ["train", *base(ws), *_set("name=../escape")],
     ["name must be a plain folder name"]),
    ("--set without =", lambda ws: ["train", *base(ws), "--set", "student.train.epochs"],
     ["--set expects key=value", "student.train.epochs"]),
    ("--set list index out of range", lambda ws: ["distill", *base(ws), *_set("distill.stages.3.method.name=ce")],
     ["distill.stages.3", "must index the list (0..0)"]),
    ("config file missing", lambda ws: ["train", "--config", str(ws / "nope.yaml")],
     ["config file not found", "nope.yaml"]),
    ("config not YAML", lambda ws: ["train", "--config", str(ws / "ckpt" / "config_broken.yaml")],
     ["config_broken.yaml", "not valid YAML"]),
    ("config not a mapping", lambda ws: ["train", "--config", str(ws / "ckpt" / "config_list.yaml")],
     ["config_list.yaml", "must be a mapping", "list"]),
    ("unknown --role", lambda ws: ["train", "--role", "assistant"], ["invalid choice: 'assistant'"]),
    ("model is a standard-library function",
     lambda ws: ["train", "--role", "student", *base(ws),
                 *_set(f"student.model={{name: 'os:system', kwargs: {{command: 'touch {ws / 'PWNED'}'}}}}")],
     ["model 'os:system'", "'os' is the Python standard library", "never calls its functions"]),
    ("model is user code without consent",
     lambda ws: ["train", "--role", "student", *base(ws), *_set("student.model={name: 'fakes:five_class_mlp'}")],
     ["would import module 'fakes' and run its code", "--allow-code fakes"]),
    ("model size mistyped", lambda ws: ["train", "--role", "student", *base(ws),
                                        *_set("student.model.kwargs.hidden=[8000000]")],
     ["model 'mlp'", "hidden[0] must be a whole number from 1 to 65,536", "8000000"]),
    ("model far too large", lambda ws: ["train", "--role", "student", *base(ws),
                                        *_set("student.model.kwargs.hidden=[65536, 65536]")],
     ["model 'mlp'", "parameters", "is a size mistyped?"]),
    # data files
    ("dataset files missing", lambda ws: ["train", *base(ws), *_set(f"data.root={ws / 'no_data'}")],
     ["fashion_mnist train split: file not found", "no_data", "To get it"]),
    ("dataset .gz truncated", lambda ws: ["train", *base(ws), *_set(f"data.root={ws / 'truncated_gz'}")],
     ["truncated_gz/train-images-idx3-ubyte.gz", "truncated or corrupt"]),
    ("dataset file truncated", lambda ws: ["train", *base(ws), *_set(f"data.root={ws / 'truncated_raw'}")],
     ["truncated_raw/train-images-idx3-ubyte", "header declares shape (64, 28, 28)", "truncated"]),
    ("empty dataset", lambda ws: ["train", *base(ws), *_set(f"data.root={ws / 'empty'}")],
     ["fashion_mnist train split", "empty/train-images-idx3-ubyte.gz holds no examples"]),
    ("images and labels differ in count", lambda ws: ["train", *base(ws), *_set(f"data.root={ws / 'mismatch'}")],
     ["fashion_mnist train split", "(64, 28, 28)", "(60,)"]),
    ("more classes in the data than the model outputs",
     lambda ws: ["train", "--role", "student", "--allow-code", "fakes", *base(ws),
                 *_set(f"output_dir={ws / 'fresh'}", "student.model={name: 'fakes:five_class_mlp'}")],
     ["[student_alone] the network outputs 5 classes but the data has 10 classes"]),
    # checkpoints
    ("teacher checkpoint missing", lambda ws: ["distill", *base(ws), "--teacher", str(ws / "nope.pt")],
     ["checkpoint not found", "nope.pt"]),
    ("teacher checkpoint truncated", lambda ws: ["distill", *base(ws), "--teacher", str(ws / "ckpt/truncated.pt")],
     ["truncated.pt", "cannot be loaded: the file is truncated or corrupt"]),
    ("teacher checkpoint of another architecture",
     lambda ws: ["distill", *base(ws), "--teacher", str(ws / TEACHER), *_set("teacher.model={name: cnn}")],
     ["teacher/checkpoint.pt", "do not fit a SmallCNN", "another architecture"]),
    ("teacher and student class counts differ",
     lambda ws: ["distill", "--allow-code", "fakes", *base(ws), "--teacher", str(ws / "ckpt/five_class.pt"),
                 *_set(f"output_dir={ws / 'fresh'}", "teacher.model={name: 'fakes:five_class_mlp'}")],
     ["teacher outputs 5 classes and the student 10", "hinton"]),
    ("tampered teacher checkpoint (pickle payload)",
     lambda ws: ["distill", *base(ws), "--teacher", str(ws / "ckpt/evil.pt")],
     ["evil.pt", "refused", "would call posix.mkdir", "tampered", "nothing in it was run"]),
    ("tampered checkpoint in the run folder", lambda ws: ["distill", *base(ws), "--teacher", str(ws / TEACHER)],
     ["student_distilled/checkpoint.pt", "holds objects other than tensors"]),
    ("eval: not a checkpoint", lambda ws: ["eval", *base(ws)[:5], str(ws / "ckpt/list.pt")],
     ["list.pt", "neither a distillery checkpoint nor a state_dict"]),
    ("eval: plain state_dict without a model", lambda ws: ["eval", *base(ws)[:5], str(ws / "ckpt/five_class.pt")],
     ["five_class.pt", "plain state_dict needs the model"]),
    ("eval: tampered checkpoint", lambda ws: ["eval", *base(ws)[:5], str(ws / "ckpt/evil.pt")],
     ["evil.pt", "holds objects other than tensors"]),
    # run folders
    ("output folder holds a run of other settings",
     lambda ws: ["train", "--role", "student", *base(ws), *_set("student.train.epochs=2")],
     ["student_alone holds a run made from other settings", "--overwrite"]),
    ("output folder holds other files",
     lambda ws: ["train", "--role", "student", *base(ws), *_set(f"output_dir={ws / 'other'}")],
     ["student_alone exists and holds files but no checkpoint", "--overwrite"]),
    ("distill without a teacher", lambda ws: ["distill", *base(ws), *_set(f"output_dir={ws / 'fresh'}")],
     ["distill needs a teacher", "--teacher"]),
    # feature layers
    ("unknown student layer", lambda ws: ["distill", *base(ws), "--teacher", str(ws / TEACHER),
                                          *_set(f"output_dir={ws / 'fresh'}",
                                                "distill.stages=[{method: {name: tap, student_layer: hiden1}}]")],
     ["student (MLP) has no layer named 'hiden1'", "Closest names: hidden1"]),
    ("unknown teacher layer", lambda ws: ["distill", *base(ws), "--teacher", str(ws / TEACHER),
                                          *_set(f"output_dir={ws / 'fresh'}",
                                                "distill.stages=[{method: {name: tap, teacher_layer: stage2}}]")],
     ["teacher (MLP) has no layer named 'stage2'"]),
]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("row", ROWS, ids=[row[0] for row in ROWS])
def test_bad_input_exits_2_with_a_specific_message_and_loses_nothing(row, workspace, tmp_path, capsys, monkeypatch):
    _, argv_of, words = row
    ws = tmp_path / "ws"
    shutil.copytree(workspace, ws)
    monkeypatch.chdir(ws)
    monkeypatch.setitem(methods.METHODS, Tap.name, Tap)
    before = _snapshot(ws)
    code, output = run_cli(argv_of(ws), capsys)
    assert code == EXIT_BAD_INPUT, output
    for word in words:
        assert word in output, f"{word!r} not in: {output}"
    assert "Traceback" not in output
    after = _snapshot(ws)
    assert {k: after.get(k) for k in before} == before  # nothing changed or lost
    assert not (ws / "PWNED").exists()  # no pickle payload ran


def test_fsp_layers_whose_channels_differ(workspace, tmp_path, capsys):
    ws = tmp_path / "ws"
    shutil.copytree(workspace, ws)
    nets = _set(f"output_dir={ws / 'fresh'}", "teacher.model={name: cnn, kwargs: {width: 8}}",
                "student.model={name: cnn, kwargs: {width: 4}}")
    assert main(["train", "--role", "teacher", *base(ws), *nets]) == 0
    before = _snapshot(ws)
    code, output = run_cli(["distill", *base(ws), *nets,
                            *_set("distill.stages=[{method: {name: fsp, pairs: [[stage1, stage2]]}}]")], capsys)
    assert code == EXIT_BAD_INPUT, output
    assert "student layer 'stage1' has 4 channels but teacher layer 'stage1' has 8" in output
    assert _snapshot(ws) == before


def test_a_warning_is_one_plain_line_unless_debug(monkeypatch, capsys) -> None:
    """A warning during a command reads ``warning: <message>``, not Python's file:line and source
    line; --debug leaves it to Python's machinery, and the display is restored after the command."""
    import warnings

    from distillery import cli
    from distillery.train.sanity import TrainingWarning

    def warns(args) -> int:
        warnings.warn("the loss has not fallen", TrainingWarning, stacklevel=1)
        return 0

    before = warnings.showwarning
    monkeypatch.setitem(cli.COMMANDS, "tune", warns)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["tune"]) == 0
    assert capsys.readouterr().err == "warning: the loss has not fallen\n"
    with pytest.warns(TrainingWarning, match="has not fallen"):  # Python's machinery, which pytest records
        assert main(["tune", "--debug"]) == 0
    assert capsys.readouterr().err == ""
    assert warnings.showwarning is before
