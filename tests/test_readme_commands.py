"""The README works as written: every command of "The command line", and the Python snippets.

The commands are read from the ```bash block under "## The command line" and run in-process
through :func:`distillery.cli.main`, each in a fresh working folder, with tiny settings appended
(a small synthetic Fashion-MNIST, 64 examples, one epoch per network; ``reproduce`` with
``--dry-run``). The README's shorthand is expanded: ``hinton|fsp|tfkd`` is one command per
choice, ``<command>`` every command. The files a command names (``my.yaml``,
``path/to/teacher.pt``, ``a.pt``, ``s1.pt``, ``runs/fmnist/...``) come from a workspace in which
the quick start's networks were trained (teacher, student alone, student distilled):
:data:`PLACEHOLDERS` says what each one stands for.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_fake_mnist
from tiny_idx import one_thread  # noqa: F401 (an autouse fixture: one intra-op thread)

from distillery.cli import COMMANDS, build_parser, main
from distillery.config import default_recipe
from distillery.data import InMemoryDataset

README = Path(__file__).resolve().parent.parent / "README.md"

# The untrained networks of one-epoch runs set off the trainer's sanity warnings; they are expected here.
pytestmark = pytest.mark.filterwarnings("ignore::distillery.train.sanity.TrainingWarning")

TINY = ("--no-progress",
        "--set", "data.train_subset=64", "--set", "data.test_subset=64",
        "--set", "teacher.train.epochs=1", "--set", "student.train.epochs=1",
        "--set", "teacher.train.batch_size=32", "--set", "student.train.batch_size=32")

# What the file names in the README's commands stand for, as files of the quick-start workspace.
PLACEHOLDERS = {
    "my.yaml": "the shipped default recipe, copied as a user starts their own",
    "path/to/teacher.pt": "runs/fmnist/teacher/checkpoint.pt",
    "a.pt": "runs/fmnist/teacher/checkpoint.pt",
    "b.pt": "runs/fmnist/teacher/checkpoint.pt",
    "c.pt": "runs/fmnist/teacher/checkpoint.pt",
    "s1.pt": "runs/fmnist/student_alone/checkpoint.pt",
    "s2.pt": "runs/fmnist/student_distilled/checkpoint.pt",
    "s3.pt": "runs/fmnist/teacher/checkpoint.pt",
}

SKIPPED = {
    "bench": "times a fixed Fashion-MNIST workload for minutes (--quick too) and has no size options; "
             "tests/test_bench.py tests its statistics",
}

# Commands refused after the quick start because their output folder already holds the quick
# start's run of other settings (exit 2, "pass --overwrite ... or choose another --set name=...").
# Each also runs on its own (test_refused_readme_command_runs_on_its_own). Left for the lead to settle
# (name the folders by method and seed, or add --set name=... to the README); remove an entry once fixed.
REFUSED_AFTER_QUICK_START: dict[str, str] = {}
REFUSAL = "holds a run made from other settings"


# ---------------------------------------------------------------- reading the README


def section(title: str) -> str:
    """The README's text under ``## title``, up to the next ``## `` heading."""
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start: end if end >= 0 else len(text)]


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


@dataclass(frozen=True)
class Command:
    """One README command line (after ``distillery``), possibly several commands joined by ``&&``."""

    argvs: tuple[tuple[str, ...], ...]

    @property
    def name(self) -> str:
        return " && ".join(" ".join(argv) for argv in self.argvs)


def expand(argv: list[str]) -> list[list[str]]:
    """The README's shorthand as real commands: ``a|b|c`` one per choice, ``<command>`` every command."""
    for i, token in enumerate(argv):
        choices = list(COMMANDS) if token == "<command>" else token.split("|") if "|" in token else None
        if choices is not None:
            return [expanded for choice in choices for expanded in expand([*argv[:i], choice, *argv[i + 1:]])]
    return [argv]


def readme_commands() -> list[Command]:
    block = code_blocks(section("The command line"), "bash")[0]
    commands = []
    for line in block.splitlines():
        tokens = shlex.split(line, comments=True)
        if not tokens:
            continue  # a comment continuing the line above
        argvs: list[list[str]] = [[]]
        for token in tokens:
            if token == "&&":
                argvs.append([])
            else:
                argvs[-1].append(token)
        for argv in argvs:
            assert argv[0] == "distillery", f"README command line {line.strip()!r} runs {argv[0]!r}, not distillery"
        for combination in _combinations([expand(argv[1:]) for argv in argvs]):
            commands.append(Command(tuple(tuple(argv) for argv in combination)))
    return commands


def _combinations(options: list[list[list[str]]]) -> list[list[list[str]]]:
    if not options:
        return [[]]
    return [[first, *rest] for first in options[0] for rest in _combinations(options[1:])]


def params(commands: list[Command]) -> list:
    """Each command as a pytest parameter: skipped, expected to be refused, or plain."""
    out = []
    for command in commands:
        marks = []
        if command.argvs[0][0] in SKIPPED and "--help" not in command.argvs[0]:
            marks.append(pytest.mark.skip(reason=SKIPPED[command.argvs[0][0]]))
        if command.name in REFUSED_AFTER_QUICK_START:
            marks.append(pytest.mark.xfail(strict=True, raises=RunFolderRefused,
                                           reason=REFUSED_AFTER_QUICK_START[command.name]))
        out.append(pytest.param(command, id=command.name, marks=marks))
    return out


# ---------------------------------------------------------------- running the commands


class RunFolderRefused(AssertionError):
    """A command exited 2 because its output folder holds a run made from other settings."""


@contextmanager
def working_folder(path: Path) -> Iterator[Path]:
    before = Path.cwd()
    os.chdir(path)
    try:
        yield path
    finally:
        os.chdir(before)


def tiny_argv(argv: tuple[str, ...], data_root: Path) -> list[str]:
    """``argv`` with the tiny settings its command accepts appended."""
    if "--help" in argv or "-h" in argv:
        return list(argv)
    parsed = build_parser().parse_args(argv)
    if hasattr(parsed, "overrides"):  # the commands that read a recipe
        return [*argv, *TINY, "--set", f"data.root={data_root}"]
    if parsed.command == "reproduce":
        return [*argv, "--dry-run", "--data-root", str(data_root), "--out", "reproduce-plan"]
    return list(argv)


def run_cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)


def run_command(command: Command, data_root: Path, capsys: pytest.CaptureFixture) -> None:
    for argv in command.argvs:
        code = run_cli(tiny_argv(argv, data_root))
        err = capsys.readouterr().err
        where = f"README command `distillery {' '.join(argv)}` exited {code}: {err.strip()[-2000:]}"
        if code == 2 and REFUSAL in err:
            raise RunFolderRefused(where)
        assert code == 0, where


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_mnist(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def quick_start(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    """A working folder after the quick start's networks are trained, with the README's placeholder files."""
    folder = tmp_path_factory.mktemp("quick_start")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks only lose time to threading
    try:
        with working_folder(folder):
            for argv in (["train", "--role", "teacher"], ["train", "--role", "student"], ["distill"]):
                assert main([*argv, *TINY, "--set", f"data.root={data_root}"]) == 0, argv
    finally:
        torch.set_num_threads(threads)
    for name, source in PLACEHOLDERS.items():
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(default_recipe() if name == "my.yaml" else folder / source, target)
    return folder


def named_files(command: Command, quick_start: Path) -> list[str]:
    """The arguments of ``command`` that name a file of the quick-start workspace."""
    return sorted({token for argv in command.argvs for token in argv
                   if token in PLACEHOLDERS or (("/" in token or "." in token) and (quick_start / token).is_file())})


COMMANDS_IN_README = readme_commands()


def test_the_readme_lists_the_commands_this_test_expects() -> None:
    names = {command.argvs[0][0] for command in COMMANDS_IN_README}
    assert {"run", "train", "distill", "eval", "models", "methods", "reproduce"} <= names
    assert all(name in {c.name for c in COMMANDS_IN_README} for name in REFUSED_AFTER_QUICK_START), \
        "an entry of REFUSED_AFTER_QUICK_START is no longer a README command; remove it"


@pytest.mark.parametrize("command", params(COMMANDS_IN_README))
def test_readme_command_runs_after_the_quick_start(command: Command, quick_start: Path, data_root: Path,
                                                   tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "work"
    shutil.copytree(quick_start, folder)
    with working_folder(folder):
        run_command(command, data_root, capsys)


@pytest.mark.parametrize("command", [c for c in COMMANDS_IN_README if c.name in REFUSED_AFTER_QUICK_START],
                         ids=lambda c: c.name)
def test_refused_readme_command_runs_on_its_own(command: Command, quick_start: Path, data_root: Path,
                                               tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """In a folder holding only the files it names, the command runs: the refusal is the folder's."""
    for name in named_files(command, quick_start):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(quick_start / name, tmp_path / name)
    with working_folder(tmp_path):
        run_command(command, data_root, capsys)


# ---------------------------------------------------------------- the Python snippets


def test_the_own_training_loop_snippets_run_as_pasted(tmp_path: Path) -> None:
    blocks = code_blocks(section("In your own training loop"), "python")
    assert len(blocks) == 2
    namespace: dict = {"__name__": "readme"}
    with working_folder(tmp_path):
        for block in blocks:
            exec(compile(block, str(README), "exec"), namespace)
    assert torch.isfinite(namespace["loss"])
    assert set(namespace["terms"]) == {"ce", "kd"}
    assert [record["epoch"] for record in namespace["history"]] == [1, 2]
    assert (tmp_path / "runs/my_student/checkpoint.pt").is_file()
    assert list((tmp_path / "runs/my_student/tensorboard").glob("events.out.tfevents.*"))


def test_the_your_own_data_snippet_runs_on_files_named_as_in_it(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("test", 10)):
        np.savez(tmp_path / f"{split}.npz", x=rng.normal(size=(n, 3, 16)).astype(np.float32),
                 y=rng.integers(0, 4, n))
    for label in ("cat", "dog"):
        (tmp_path / "photos" / label).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "photos" / label /
                                                                                    f"{i}.png")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    my_dataset = torch.utils.data.TensorDataset(torch.randn(12, 5, 7, dtype=torch.float64), torch.arange(12) % 3)
    namespace: dict = {"__name__": "readme", "my_dataset": my_dataset}
    [block] = code_blocks(section("Your own data"), "python")
    with working_folder(tmp_path):
        exec(compile(block, str(README), "exec"), namespace)
    train = namespace["train"]
    assert isinstance(train, InMemoryDataset)
    assert torch.equal(train.inputs, my_dataset.tensors[0])  # float64 5×7 samples kept as given
    assert namespace["test"].class_names == ("cat", "dog")
    assert namespace["test"].sample_shape == (3, 32, 32)
