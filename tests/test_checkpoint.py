"""Every checkpoint we read goes through one safe loader: foreign or tampered files are refused, nothing runs.
Every run writes files of its own."""

import os
import re

import pytest
import torch

from recbole_dccl.errors import InputError
from recbole_dccl.files import load_safe
from recbole_dccl.trainer import checkpoint
from recbole_dccl.trainer.checkpoint import reading_files
from recbole_dccl.trainer.resume import ResumedRun
from tests.helpers import build


class WritesMarker:
    """Unpickling this runs ``open(marker, 'w')``: what a malicious checkpoint could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def tampered_checkpoint(tmp_path, name):
    path, marker = tmp_path / f"{name}.pth", tmp_path / f"{name}.marker"
    torch.save({"identity": {}, "state_dict": WritesMarker(str(marker))}, path)
    return str(path), marker


def test_the_tampered_file_would_run_code_if_loaded_unsafely(tmp_path):
    path, marker = tampered_checkpoint(tmp_path, "live")
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_tampered_cloud_checkpoint_is_refused_and_nothing_runs(tiny_config, tmp_path):
    path, marker = tampered_checkpoint(tmp_path, "cloud")
    _, _, _, trainer = build(tiny_config)
    with pytest.raises(InputError, match=rf"cloud_checkpoint: \[{re.escape(path)}\] is refused: .*Unsupported global: GLOBAL io.open.* Nothing in it was run"):
        trainer.load_cloud(path)
    assert not marker.exists()


def test_tampered_run_state_is_refused_and_nothing_runs(tmp_path):
    path, marker = tampered_checkpoint(tmp_path, "run")
    with pytest.raises(InputError, match=rf"resume: \[{re.escape(path)}\] is refused: .*io.open"):
        ResumedRun(path, {})
    assert not marker.exists()


@pytest.mark.parametrize(
    "content,message",
    [
        (b"not a checkpoint", r"is refused: it is not a file of tensors and plain values only \(Unsupported operand"),
        (b"PK\x03\x04 truncated zip", r"cannot be read as a checkpoint: RuntimeError"),
    ],
)
def test_a_file_that_is_no_checkpoint_is_refused(tmp_path, content, message):
    path = tmp_path / "notes-run.pth"
    path.write_bytes(content)
    with pytest.raises(InputError, match=rf"resume: \[{re.escape(str(path))}\] {message}"):
        load_safe(str(path), "resume")


def test_runs_started_within_one_second_keep_files_of_their_own(tiny_config, monkeypatch):
    monkeypatch.setattr(checkpoint, "get_local_time", lambda: "Mar-05-2026_14-03-07")  # RecBole's name, one second
    rates = (0.05, 0.5)
    runs = [build({**tiny_config, "rounds": 1, "device_learning_rate": rate}) for rate in rates]
    for _, (train_data, valid_data, _), _, trainer in runs:
        trainer.fit(train_data, valid_data, saved=True)
    trainers = [trainer for *_, trainer in runs]
    files = [path for trainer in trainers
             for path in (*reading_files(trainer.saved_model_file).values(), trainer.run_state_file)]
    assert sorted(os.listdir(tiny_config["checkpoint_dir"])) == sorted(map(os.path.basename, files))
    assert len(set(files)) == 6
    assert all(os.path.basename(path).startswith("DCCL-Mar-05-2026_14-03-07-") for path in files)
    for trainer, rate in zip(trainers, rates):
        assert load_safe(trainer.saved_model_file, "resume")["config"]["device_learning_rate"] == rate
        assert load_safe(trainer.run_state_file, "resume")["identity"]["device_learning_rate"] == rate
