"""Safe loading: checkpoints are read with ``weights_only=True`` everywhere, a file carrying a pickle
payload is refused with a clear message and the payload never runs, and a checkpoint cannot make
us import and call code by naming it as its model."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from fakes import random_dataset, train_config

from distillery.networks import load_trained_model
from distillery.train import CheckpointError, Stage, Trainer, load_checkpoint, save_checkpoint
from distillery.train.checkpoint import load_weights

SRC = Path(__file__).parent.parent / "src" / "distillery"


class Payload:
    """Unpickling this runs ``os.mkdir(marker)``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


class ShellPayload(Payload):
    def __reduce__(self):
        return (subprocess.call, (["touch", str(self.marker)],))


def test_every_torch_load_in_the_package_is_weights_only():
    calls = 0
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        for match in re.finditer(r"torch\.load\(", text):
            calls += 1
            call = text[match.start(): text.find(")", match.end()) + 1]
            assert "weights_only=True" in call, f"{path}: {call}"
        assert not re.search(r"\bpickle\.loads?\(|allow_pickle=True|yaml\.load\(|yaml\.unsafe_load", text), path
    assert calls >= 1  # the scan found the loader it guards


@pytest.mark.parametrize("payload_type", [Payload, ShellPayload])
@pytest.mark.parametrize("where", ["top", "nested in the student weights", "in the optimizer state"])
def test_a_pickle_payload_is_refused_and_never_runs(tmp_path, payload_type, where):
    marker = tmp_path / "PWNED"
    payload = payload_type(marker)
    state = {"format_version": 1, "kind": "distillery-run", "meta": {}, "student": {"w": torch.zeros(2)}}
    if where == "top":
        state["extra"] = payload
    elif where == "nested in the student weights":
        state["student"]["w"] = payload
    else:
        state["optimizer"] = {"state": {0: {"momentum_buffer": payload}}}
    path = tmp_path / "checkpoint.pt"
    torch.save(state, path)
    for load in (load_checkpoint, load_weights):
        with pytest.raises(CheckpointError, match="refused: the file holds objects other than tensors") as info:
            load(path)
        assert str(path) in str(info.value) and "nothing in it was run" in str(info.value)
    assert not marker.exists()


def test_resume_from_a_tampered_checkpoint_is_refused(tmp_path):
    from distillery.methods import create_method
    from distillery.models import create_model

    marker = tmp_path / "PWNED"
    torch.save({"format_version": 1, "student": Payload(marker)}, tmp_path / "checkpoint.pt")
    trainer = Trainer(create_model("mlp", in_channels=1, num_classes=4, input_size=8, hidden=[8]),
                      random_dataset(32), random_dataset(16, seed=1),
                      [Stage(create_method("ce"), train_config(epochs=1, batch_size=16))],
                      run_dir=tmp_path, progress=False, echo=lambda line: None)
    with pytest.raises(CheckpointError, match="would call posix.mkdir"):
        trainer.fit(resume=True)
    assert not marker.exists()


def test_a_checkpoint_cannot_name_code_to_import_and_call(tmp_path):
    marker = tmp_path / "PWNED"
    meta = {"model": {"name": "subprocess:call", "kwargs": {"args": ["touch", str(marker)]}}}
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"kind": "distillery-run", "meta": meta, "student": {"w": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match="names the user model 'subprocess:call'; code named by a file is not"):
        load_trained_model(path, None, random_dataset(8))
    assert not marker.exists()


def test_a_user_model_named_in_the_config_is_allowed(tmp_path):
    from fakes import five_class_mlp

    path = tmp_path / "checkpoint.pt"
    model = five_class_mlp()
    save_checkpoint({"meta": {"model": {"name": "fakes:five_class_mlp"}}, "student": model.state_dict()}, path)
    loaded, spec = load_trained_model(path, None, random_dataset(8), trusted_models={"fakes:five_class_mlp"},
                                      allow_code=["fakes"])
    assert spec.name == "fakes:five_class_mlp"
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
