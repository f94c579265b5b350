"""Resumable runs: after every phase, and after every evaluated epoch of round 0, ``DCCLTrainer`` writes its whole
run state to one file, and ``resume`` continues from it; a plain RecBole model's run does the same after every
evaluated epoch (:class:`ResumableFitMixin`).

The run state is everything the rest of the run depends on: the model (backbone W_f, Theta, the encoder, every
user's metapatch buffers), the trainer's optimizer, the round and phase done, the trainer's two state objects whole
(:mod:`run_state`: the ``RoundState``'s loader generator and teachers, the ``RunRecord``'s history, best-so-far of
each view with the device view's state, and phase_seconds), and the random number generators (torch, CUDA, numpy,
python). Each phase builds its own optimizer, so no optimizer state
crosses a phase boundary. Inside round 0 (RecBole's own ``fit``, hours on a large dataset) it is also RecBole's
early-stopping state after the last evaluated epoch (:class:`FitProgress`): the epoch, the best score so far, the
evaluations without improvement, the best epoch's weights, and the round-0 loader's shuffling generator. A resumed
run rebuilds what every round derives from the data, skips the phases the file's run finished, and restores the
rest just before the first phase it runs: it goes on exactly as the file's run would have.

The file, ``<checkpoint_dir>/<model>-<time>-<suffix>-run.pth`` beside RecBole's best-model file, is replaced
atomically after every phase (and round-0 epoch) and holds tensors and plain values only (read with
``weights_only=True``). It records the settings it was written with; a run with other settings is refused. It also
records the number of threads torch ran on: some CPU kernels split their work by it and round differently, so a run
resumed on another number is warned that its results will differ from the uninterrupted run's in the last bits.
"""

import glob
import logging
import os
import random
from time import time

import numpy as np
import torch

from recbole_dccl.distributed import is_main_process
from recbole_dccl.errors import InputError
from recbole_dccl.files import load_safe, save_atomic
from recbole_dccl.trainer.checkpoint import check_identity, plain
from recbole_dccl.trainer.run_state import RunRecord

PHASES = ("cloud", "device", "momodistill", "shared")  # round 0 is "cloud"; every later round the other three
# Settings a resumed run may change: where files go. (How the device phase chunks its rows is not one of them: a
# row's loss summed in other chunks, or its site output computed in another chunk, rounds differently.)
FREE_KEYS = ("resume", "result_file", "cloud_checkpoint")


RUN_STATE_SUFFIX = "-run.pth"  # a run state is its run's best-model file name with this ending


def run_state_file(saved_model_file):
    """The run-state file of the run whose best model RecBole saves as ``saved_model_file``."""
    return os.path.splitext(saved_model_file)[0] + RUN_STATE_SUFFIX


def run_state_files(folder):
    """The run-state files in ``folder`` (a run's ``checkpoint_dir``)."""
    return glob.glob(os.path.join(folder, "*" + RUN_STATE_SUFFIX))


def run_identity(settings):
    """The settings a run state must agree on to be resumed."""
    return {key: value for key, value in settings.items() if key not in FREE_KEYS}


def rng_states():
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"] = {**numpy_state["state"], "key": numpy_state["state"]["key"].tolist()}
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": numpy_state,
        "python": random.getstate(),
    }


def set_rng_states(states):
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])
    numpy_state = states["numpy"]
    key = np.asarray(numpy_state["state"]["key"], dtype=np.uint32)
    np.random.set_state({**numpy_state, "state": {**numpy_state["state"], "key": key}})
    random.setstate(states["python"])


def save_run_state(path, trainer, round_idx, phase, settings, round_0=None):
    """Write ``trainer``'s run state after ``phase`` of round ``round_idx`` (rank 0 only in distributed runs), or,
    with ``round_0`` (a :class:`FitProgress`), after an epoch of round 0 that has not ended."""
    round_state = trainer.round.state(phase) if round_idx else {"loader_generator": None, "teachers": None}
    save_state(path, trainer, round_idx, phase, settings, round_0, {**round_state, **trainer.record.state()})


def save_state(path, trainer, round_idx, phase, settings, round_0, extra):
    """Write the run state every run has (model, optimizer, random generators, RecBole's fit progress) and
    ``extra``, on global rank 0 only (RecBole's local rank 0 would write once per machine)."""
    if not is_main_process(trainer.config):
        return
    state = {
        "identity": run_identity(settings),
        "round": round_idx,
        "phase": phase,
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "round_0": round_0.state() if round_0 is not None else None,
        "rng": rng_states(),
        "threads": torch.get_num_threads(),
        **extra,
    }
    save_atomic(state, path)


class ResumedRun:
    """A run state read back from ``path`` (a run-state file, or a folder: its newest one)."""

    def __init__(self, path, settings):
        self.path = self._find(path)
        self.state = load_safe(self.path, "resume")
        check_identity("resume", self.path, self.state["identity"], run_identity(settings))
        self.round_0 = self.state.get("round_0")  # round 0 cut between two of its epochs
        self.done_until = (0, -1) if self.round_0 else (self.state["round"], PHASES.index(self.state["phase"]))
        threads = self.state["threads"]
        if threads != torch.get_num_threads():
            logging.getLogger().warning(
                f"resume: [{self.path}] was written by a run on {threads} threads and this one runs on "
                f"{torch.get_num_threads()} (torch.set_num_threads, OMP_NUM_THREADS): some CPU kernels round "
                "differently, so the results will differ from the uninterrupted run's in the last bits."
            )

    @staticmethod
    def _find(path):
        if not os.path.isdir(path):
            return path
        files = run_state_files(path)
        if not files:
            raise InputError(f"resume: [{path}] holds no run-state file (*-run.pth); give a file or another folder.")
        return max(files, key=os.path.getmtime)

    def done(self, round_idx, phase):
        """Whether the file's run finished ``phase`` of round ``round_idx``."""
        return (round_idx, PHASES.index(phase)) <= self.done_until

    def record(self):
        """The :class:`RunRecord` the file's run had: what the report needs even when no phase is left to run."""
        return RunRecord.from_state(self.state)

    def restore_training(self, trainer, round_idx):
        """Model and optimizer as they were when the file was written, before a phase of round ``round_idx``; if that
        is the file's round, also the :class:`RoundState` (loader position, teachers) and the random streams (a later
        round seeds its own streams at its start). A round 0 cut between epochs is restored by round 0 itself, once
        its loader is built (:meth:`restore_fit`)."""
        state = self.state
        trainer.model.load_state_dict(state["model"])
        trainer.model.eval()  # as the file's run left it: every phase ends with an evaluation
        trainer.optimizer.load_state_dict(state["optimizer"])
        if state["round"] == round_idx:  # else the round's start has seeded the streams, as in the file's run
            trainer.round.restore(state, trainer.model, trainer.device)
            set_rng_states(state["rng"])

    def restore_fit(self, trainer, loader):
        """Model, optimizer, generators and RecBole's early-stopping state as RecBole's ``fit`` (round 0, or a plain
        model's training) left them after its last evaluated epoch, so that it goes on with the next epoch (or none,
        if early stopping had ended it); returns the :class:`FitProgress` to go on with."""
        state, progress = self.state, FitProgress.from_state(self.round_0)
        trainer.model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        loader.generator.set_state(progress.loader_generator)
        set_rng_states(state["rng"])
        progress.continue_fit(trainer)
        return progress


class FitProgress:
    """Where RecBole's ``fit`` (DCCL's round 0, or a plain model's training) stands after an evaluated epoch: what it
    needs to go on with the next one, the weights of the best epoch so far (round 0 ends with them) and the seconds
    spent."""

    def __init__(self):
        self.epoch = -1
        self.cur_step, self.best_valid_score, self.best_valid_result = 0, None, None
        self.best_weights = None
        self.loader_generator = None
        self.seconds = 0.0

    def record(self, trainer, loader, epoch, seconds):
        """Take the state of ``trainer`` (a RecBole trainer) after evaluating ``epoch``; a new best keeps a copy of
        the weights."""
        self.epoch, self.cur_step = epoch, trainer.cur_step
        self.best_valid_score = float(trainer.best_valid_score)
        result = trainer.best_valid_result  # None until an epoch has scored (a nan never does)
        self.best_valid_result = None if result is None else {name: float(value) for name, value in result.items()}
        if trainer.cur_step == 0:  # early_stopping just took this epoch as the new best
            self.best_weights = {name: value.clone() for name, value in trainer.model.state_dict().items()}
        self.loader_generator = loader.generator.get_state()
        self.seconds = seconds

    def continue_fit(self, trainer):
        """Put RecBole's early-stopping state back into ``trainer``, so that its ``fit`` goes on after :attr:`epoch`
        (or stops at once, if early stopping had ended it there)."""
        stopped = self.cur_step > trainer.stopping_step
        trainer.start_epoch = trainer.epochs if stopped else self.epoch + 1
        trainer.cur_step, trainer.best_valid_score = self.cur_step, self.best_valid_score
        trainer.best_valid_result = self.best_valid_result

    def state(self):
        return dict(vars(self))

    @classmethod
    def from_state(cls, state):
        progress = cls()
        vars(progress).update(state)
        return progress


# Settings of a plain model's run that a resumed run may change besides FREE_KEYS: where files go, what is shown.
PLAIN_FREE_KEYS = ("checkpoint_dir", "data_path", "show_progress", "state", "log_wandb")


class ResumableFitMixin:
    """Put before a RecBole trainer whose ``fit`` is ``Trainer``'s: a plain model's run writes its run state after
    every evaluated epoch (``<saved_model_file stem>-run.pth``), and with ``resume`` goes on with the next epoch,
    writing the same best-model file, as the uninterrupted run would have. Identity: every setting but where files go
    (:data:`FREE_KEYS`, :data:`PLAIN_FREE_KEYS`)."""

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        progress, state_file, settings = FitProgress(), None, self._settings()
        if self.config["resume"]:
            resumed = ResumedRun(self.config["resume"], settings)
            self.saved_model_file = best_model_file(resumed.path)
            progress = resumed.restore_fit(self, train_data)
            if self.start_epoch >= self.epochs and progress.best_weights is not None:
                self.model.load_state_dict(progress.best_weights)  # fit then saves the model it holds as the best
            self.logger.info(f"resuming from {resumed.path}: done up to epoch {progress.epoch}")
        if saved:
            state_file = run_state_file(self.saved_model_file)
        start = time() - progress.seconds

        def end_of_epoch(epoch_idx, valid_score):
            progress.record(self, train_data, epoch_idx, time() - start)
            if state_file:
                save_state(state_file, self, 0, "cloud", settings, progress, {})  # read back as a cut round 0
            if callback_fn:
                callback_fn(epoch_idx, valid_score)

        return super().fit(train_data, valid_data, verbose, saved, show_progress, end_of_epoch)

    def _settings(self):
        skipped = (*FREE_KEYS, *PLAIN_FREE_KEYS)
        return {key: plain(value) for key, value in self.config.final_config_dict.items() if key not in skipped}


def best_model_file(path):
    """The best-model file of the run whose run state is ``path`` (the inverse of :func:`run_state_file`)."""
    return path[: -len(RUN_STATE_SUFFIX)] + ".pth"
