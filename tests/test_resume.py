"""Run state after every phase: a run killed mid-round resumes to the same results; a nan stops a phase and keeps
the last good state; a run state from other settings is refused."""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from recbole_dccl.errors import InputError, NonFiniteLoss
from recbole_dccl.files import load_safe
from recbole_dccl.model.dccl import DCCL
from recbole_dccl.model.objectives import NextItemObjective
from recbole_dccl.trainer import device_phase
from recbole_dccl.trainer.checkpoint import READINGS, reading_files
from recbole_dccl.trainer.resume import ResumedRun, run_state_file, run_state_files, save_run_state
from tests.helpers import build
from tests.test_fleet import REALISTIC_FLEET

RUN_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "run_recbole_dccl.py")
MID_ROUND = ("device", "momodistill")


def command(config_file, *extra):
    return [sys.executable, RUN_SCRIPT, "--model=DCCL", "--dataset=tiny", f"--config_files={config_file}", *extra]


def run_state(folder):
    files = run_state_files(folder)
    return load_safe(files[0], "resume") if files else None


def results(path):
    with open(path) as file:
        written = json.load(file)
    return {key: written[key] for key in ("cloud_only", "dccl_cloud", "dccl_device", "history", "test_result")}


def test_killed_run_resumes_to_the_uninterrupted_results(tiny_config, tmp_path):
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump({**tiny_config, "rounds": 2, "checkpoint_dir": None}))
    reference, resumed = tmp_path / "reference.json", tmp_path / "resumed.json"
    subprocess.run(
        command(config_file, f"--result_file={reference}", f"--checkpoint_dir={tmp_path / 'saved_reference'}"),
        cwd=tmp_path, check=True, capture_output=True,
    )

    saved = str(tmp_path / "saved")
    args = command(config_file, f"--result_file={resumed}", f"--checkpoint_dir={saved}")
    run = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while run.poll() is None:
            if run_state_files(saved):
                # Hold the run still while its state is read: reading it can take longer than the tiny run's
                # remaining phases, which then finished before the kill (seen when other tests ran first).
                run.send_signal(signal.SIGSTOP)
                state = run_state(saved)
                if state["round"] >= 1 and state["phase"] in MID_ROUND:
                    run.send_signal(signal.SIGKILL)
                    break
                run.send_signal(signal.SIGCONT)
            time.sleep(0.02)
    finally:
        run.wait()
    assert run.returncode == -signal.SIGKILL, "the run ended before a mid-round run state was written"
    assert not resumed.exists()
    killed_at = run_state(saved)
    assert (killed_at["round"], killed_at["phase"]) != (2, "shared"), "nothing was left to resume"

    subprocess.run(args + [f"--resume={saved}"], cwd=tmp_path, check=True, capture_output=True)
    assert results(resumed) == results(reference), f"resumed after round {killed_at['round']} {killed_at['phase']}"
    final, expected = run_state(saved)["model"], run_state(str(tmp_path / "saved_reference"))["model"]
    assert all(torch.equal(final[name], expected[name]) for name in expected)
    assert len(run_state_files(saved)) == 1


class Crash(Exception):
    pass


@pytest.mark.parametrize(
    "device_method,crashing_phase,fleet",
    [("metapatch", "learn_shared_parameters", {}), ("metapatch", "momodistill", {}), ("none", "momodistill", {}),
     ("metapatch", "learn_shared_parameters", REALISTIC_FLEET)],
)
def test_run_resumed_after_a_crash_equals_the_uninterrupted_run(tiny_config, device_method, crashing_phase, fleet):
    """In one process, quicker than the kill test: a crash in round 2 resumes from the phase before it, in the same
    round (the loader position and the teachers are restored, the device phase's site outputs computed as it
    computed them) or, without device phases, in round 1."""
    # A round's 90 rows (30 users, 3 fresh interactions each) in two batches, so the order the round's loader
    # shuffles them in matters, the second of one row: a one-row matmul rounds differently from the device phase's
    # 90-row chunk, so teachers that recomputed their inputs batch by batch after a resume would drift (they did).
    settings = {**tiny_config, "rounds": 2, "device_method": device_method, "train_batch_size": 89, **fleet}
    _, (train_data, valid_data, test_data), _, reference = build(settings)
    reference.fit(train_data, valid_data, saved=True, test_data=test_data)
    assert len(reference.round.loader.dataset) == 90

    _, (train_data, valid_data, test_data), _, crashing = build(settings)
    run_phase = getattr(crashing, crashing_phase)

    def crash_in_round_2(round_idx):
        if round_idx == 2:
            raise Crash
        return run_phase(round_idx)

    setattr(crashing, crashing_phase, crash_in_round_2)
    with pytest.raises(Crash):
        crashing.fit(train_data, valid_data, saved=True, test_data=test_data)

    _, (train_data, valid_data, test_data), _, resumed = build({**settings, "resume": crashing.run_state_file})
    resumed.fit(train_data, valid_data, saved=True, test_data=test_data)
    assert resumed.record.history == reference.record.history
    assert resumed.report["dccl_device"] == reference.report["dccl_device"]
    # The weights at the end, not only the (coarse) ranking metrics of 30 users, each run's from its own file.
    assert resumed.run_state_file != reference.run_state_file
    final, expected = (load_safe(trainer.run_state_file, "resume")["model"] for trainer in (resumed, reference))
    assert [name for name in expected if not torch.equal(final[name], expected[name])] == []
    assert_same_saved_models(resumed, reference)


def assert_same_saved_models(trainer, reference):
    """``trainer`` saved both readings (:data:`READINGS`) as ``reference`` did, each in files of its own."""
    for reading in READINGS:
        path, expected_path = (reading_files(run.saved_model_file)[reading] for run in (trainer, reference))
        assert path != expected_path
        final, expected = (load_safe(file, "model_file")["state_dict"] for file in (path, expected_path))
        assert [name for name in expected if not torch.equal(final[name], expected[name])] == [], reading


def test_a_run_resumed_after_its_last_phase_saves_the_models_it_ended_with(tiny_config):
    """Nothing is left to run, yet the deployed model is the one the file's run ended with."""
    settings = {**tiny_config, "rounds": 1}
    _, (train_data, valid_data, _), _, finished = build(settings)
    finished.fit(train_data, valid_data, saved=True)
    _, (train_data, valid_data, _), _, resumed = build({**settings, "resume": finished.run_state_file})
    resumed.fit(train_data, valid_data, saved=True)
    assert resumed.record.history == finished.record.history
    assert_same_saved_models(resumed, finished)


def crash_after_epoch(should_crash):
    """A ``fit`` callback that crashes the run just after the run state of an epoch of round 0 was written."""

    def callback(epoch_idx, valid_score):
        if should_crash(epoch_idx):
            raise Crash

    return callback


@pytest.mark.parametrize("stopping_step,crash_at", [(10, "epoch 1"), (0, "early stop")])
def test_run_cut_inside_round_0_resumes_from_its_last_epoch(tiny_config, stopping_step, crash_at):
    """Round 0 is RecBole's ``fit`` (hours on a large dataset): a run cut between two of its epochs goes on with the
    next epoch, with RecBole's early-stopping state, the best epoch's weights and the loader's shuffling as they were,
    and ends as the uninterrupted run; cut after early stopping ended round 0, it trains no further epoch."""
    settings = {**tiny_config, "rounds": 1, "epochs": 4, "stopping_step": stopping_step}
    _, (train_data, valid_data, test_data), _, reference = build(settings)
    epochs_run = []
    reference.fit(train_data, valid_data, saved=True, test_data=test_data,
                  callback_fn=lambda epoch_idx, valid_score: epochs_run.append(epoch_idx))
    stop_epoch = epochs_run[-1]
    if crash_at == "early stop":
        assert stop_epoch < 3, "early stopping did not end the tiny round 0: the test would not test it"
    should_crash = (lambda epoch: epoch == 1) if crash_at == "epoch 1" else (lambda epoch: epoch == stop_epoch)

    _, (train_data, valid_data, test_data), _, crashing = build(settings)
    with pytest.raises(Crash):
        crashing.fit(train_data, valid_data, saved=True, test_data=test_data,
                     callback_fn=crash_after_epoch(should_crash))
    state = load_safe(crashing.run_state_file, "resume")
    assert state["round_0"]["epoch"] == (1 if crash_at == "epoch 1" else stop_epoch)

    _, (train_data, valid_data, test_data), _, resumed = build({**settings, "resume": crashing.run_state_file})
    resumed_epochs = []
    resumed.fit(train_data, valid_data, saved=True, test_data=test_data,
                callback_fn=lambda epoch_idx, valid_score: resumed_epochs.append(epoch_idx))
    assert resumed_epochs == [epoch for epoch in epochs_run if epoch > state["round_0"]["epoch"]]
    assert resumed.record.history == reference.record.history
    assert resumed.report["dccl_device"] == reference.report["dccl_device"]
    final, expected = (load_safe(trainer.run_state_file, "resume")["model"] for trainer in (resumed, reference))
    assert [name for name in expected if not torch.equal(final[name], expected[name])] == []
    assert load_safe(resumed.run_state_file, "resume")["round_0"] is None


@pytest.mark.parametrize("stopping_step,crash_at", [(10, "epoch 1"), (0, "early stop")])
def test_plain_model_cut_between_epochs_resumes_to_the_uninterrupted_run(tiny_config, stopping_step, crash_at):
    """A plain RecBole model (RepeatNet on tafeng_nbr: hours on a CPU) writes its run state after every evaluated
    epoch as round 0 does: resumed, it trains the epochs left, writes the same best-model file and tests as the
    uninterrupted run; cut after early stopping, it trains none."""
    settings = {**tiny_config, "epochs": 4, "stopping_step": stopping_step}
    _, (train_data, valid_data, test_data), _, reference = build(settings, model="GRU4Rec")
    epochs_run = []
    reference.fit(train_data, valid_data, saved=True,
                  callback_fn=lambda epoch_idx, valid_score: epochs_run.append(epoch_idx))
    expected = reference.evaluate(test_data)
    stop_epoch = epochs_run[-1]
    if crash_at == "early stop":
        assert stop_epoch < 3, "early stopping did not end the tiny run: the test would not test it"
    cut = 1 if crash_at == "epoch 1" else stop_epoch

    _, (train_data, valid_data, test_data), _, crashing = build(settings, model="GRU4Rec")
    with pytest.raises(Crash):
        crashing.fit(train_data, valid_data, saved=True, callback_fn=crash_after_epoch(lambda epoch: epoch == cut))
    path = run_state_file(crashing.saved_model_file)
    assert load_safe(path, "resume")["round_0"]["epoch"] == cut

    _, (train_data, valid_data, test_data), _, resumed = build({**settings, "resume": path}, model="GRU4Rec")
    resumed_epochs = []
    resumed.fit(train_data, valid_data, saved=True,
                callback_fn=lambda epoch_idx, valid_score: resumed_epochs.append(epoch_idx))
    assert resumed_epochs == [epoch for epoch in epochs_run if epoch > cut]
    assert resumed.saved_model_file == crashing.saved_model_file
    assert resumed.evaluate(test_data) == expected
    final, best = (load_safe(trainer.saved_model_file, "resume")["state_dict"] for trainer in (resumed, reference))
    assert [name for name in best if not torch.equal(final[name], best[name])] == []


def test_plain_run_state_of_other_settings_is_refused(tiny_config):
    _, (train_data, valid_data, _), _, trainer = build({**tiny_config, "epochs": 1}, model="GRU4Rec")
    trainer.fit(train_data, valid_data, saved=True)
    path = run_state_file(trainer.saved_model_file)
    _, _, _, other = build({**tiny_config, "epochs": 1, "learning_rate": 0.5, "resume": path}, model="GRU4Rec")
    with pytest.raises(InputError, match=rf"resume: \[{re.escape(path)}\] was written with other settings .*'learning_rate'"):
        other.fit(train_data, valid_data, saved=True)


NAN = float("nan")
NAN_IN_PHASE = {
    "cloud": (DCCL, "calculate_loss", lambda self, interaction: self.metapatch.sum() * NAN),
    "device": (device_phase, "row_losses", lambda model, local, rows, metapatch: metapatch[local.owner[rows]].sum(1) * NAN),
    "momodistill": (NextItemObjective, "distill", staticmethod(lambda student, teacher, temperature: student.sum(1) * NAN)),
    "shared": (DCCL, "encode_metapatch", lambda self, users: self.metapatch[users] * NAN),
}
BEFORE = {"device": (0, "cloud"), "momodistill": (1, "device"), "shared": (1, "momodistill")}


@pytest.mark.parametrize("phase", list(NAN_IN_PHASE))
def test_nan_loss_stops_the_phase_and_keeps_the_last_good_state(tiny_config, monkeypatch, phase):
    config, (train_data, valid_data, _), model, trainer = build({**tiny_config, "rounds": 1})
    monkeypatch.setattr(*NAN_IN_PHASE[phase])
    round_idx = 0 if phase == "cloud" else 1
    with pytest.raises(NonFiniteLoss, match=rf"round {round_idx} {phase}: .* loss is nan.*; training stopped") as error:
        trainer.fit(train_data, valid_data, saved=True)
    if phase == "cloud":
        assert "no run state was written before it" in str(error.value)
        return
    assert f"kept in [{trainer.run_state_file}]" in str(error.value)
    state = load_safe(trainer.run_state_file, "resume")
    assert (state["round"], state["phase"]) == BEFORE[phase]


def test_run_after_a_nan_resumes_from_the_last_good_state(tiny_config, monkeypatch):
    config, (train_data, valid_data, _), _, trainer = build({**tiny_config, "rounds": 1})
    with monkeypatch.context() as patch:
        patch.setattr(*NAN_IN_PHASE["shared"])
        with pytest.raises(NonFiniteLoss):
            trainer.fit(train_data, valid_data, saved=True)
    _, _, _, resumed = build({**tiny_config, "rounds": 1, "resume": trainer.run_state_file})
    resumed.fit(train_data, valid_data, saved=True)
    assert [(entry["round"], entry["phase"]) for entry in resumed.record.history] == [
        (0, "cloud"), (1, "device"), (1, "momodistill"), (1, "shared"),
    ]
    assert torch.isfinite(resumed.model.metapatch).all()


def test_run_state_of_other_settings_is_refused(tiny_config):
    config, (train_data, valid_data, _), _, trainer = build({**tiny_config, "rounds": 1})
    trainer.fit(train_data, valid_data, saved=True)
    path = trainer.run_state_file
    _, _, _, other = build({**tiny_config, "rounds": 1, "device_learning_rate": 0.5, "resume": path})
    message = rf"resume: \[{re.escape(path)}\] was written with other settings .*'device_learning_rate': \(0.05, 0.5\)"
    with pytest.raises(InputError, match=message):
        other.fit(train_data, valid_data, saved=True)


def test_resume_folder_without_run_state_is_refused(tiny_config, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    _, (train_data, valid_data, _), _, trainer = build({**tiny_config, "resume": str(empty)})
    with pytest.raises(InputError, match=r"resume: \[.*empty\] holds no run-state file"):
        trainer.fit(train_data, valid_data)


def test_resuming_on_another_number_of_threads_is_warned(tiny_config, caplog):
    _, _, _, trainer = build(tiny_config)
    path = run_state_file(trainer.saved_model_file)
    save_run_state(path, trainer, 0, "cloud", trainer._settings())
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        with caplog.at_level(logging.WARNING):
            ResumedRun(path, trainer._settings())
    finally:
        torch.set_num_threads(threads)
    assert f"was written by a run on {threads} threads and this one runs on {threads + 1}" in caplog.text
