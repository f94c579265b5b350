"""Resumable runs: after every phase ``DCCLTrainer`` writes its whole run state to one file, and ``resume``
continues from it.

The run state is everything the rest of the run depends on: the model (backbone W_f, Theta, the encoder, every
user's metapatch buffers), the trainer's optimizer, the round and phase done, the round's teachers (MoMoDistill
step 2 still needs the device models step 1 learned from), the random number generators (torch, CUDA, numpy,
python, and the shuffling generator of the round's data loader), and the bookkeeping (history, best-so-far of each
view with the device view's state, phase_seconds). Each phase builds its own optimizer, so no optimizer state
crosses a phase boundary. A resumed run rebuilds what every round derives from the data, skips the phases the
file's run finished, and restores the rest just before the first phase it runs: it goes on exactly as the file's
run would have.

The file, ``<checkpoint_dir>/<model>-<time>-<suffix>-run.pth`` beside RecBole's best-model file, is replaced
atomically after every phase and holds tensors and plain values only (read with ``weights_only=True``). It records
the settings it was written with; a run with other settings is refused. It also records the number of threads
torch ran on: some CPU kernels split their work by it and round differently, so a run resumed on another number is
warned that its results will differ from the uninterrupted run's in the last bits.
"""

import glob
import logging
import os
import random

import numpy as np
import torch

from recbole_dccl.distributed import is_main_process
from recbole_dccl.errors import InputError
from recbole_dccl.trainer.checkpoint import check_identity, load_safe, save_atomic
from recbole_dccl.trainer.momodistill import DeviceTeachers

PHASES = ("cloud", "device", "momodistill", "shared")  # round 0 is "cloud"; every later round the other three
# Settings a resumed run may change: where files go. (How the device phase chunks its rows is not one of them: a
# row's loss summed in other chunks, or its site output computed in another chunk, rounds differently.)
FREE_KEYS = ("resume", "result_file", "cloud_checkpoint")


def run_state_file(saved_model_file):
    """The run-state file of the run whose best model RecBole saves as ``saved_model_file``."""
    return os.path.splitext(saved_model_file)[0] + "-run.pth"


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


def save_run_state(path, trainer, round_idx, phase, settings):
    """Write ``trainer``'s run state after ``phase`` of round ``round_idx`` (rank 0 only in distributed runs)."""
    if not is_main_process(trainer.config):  # global rank 0: RecBole's local rank 0 would write once per machine
        return
    state = {
        "identity": run_identity(settings),
        "round": round_idx,
        "phase": phase,
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "teachers": trainer.teachers.state if phase == "momodistill" else None,
        "loader_generator": trainer.round_loader.generator.get_state() if round_idx else None,
        "rng": rng_states(),
        "history": trainer.history,
        "best": trainer.best,
        "phase_seconds": trainer.phase_seconds,
        "threads": torch.get_num_threads(),
    }
    save_atomic(state, path)


class ResumedRun:
    """A run state read back from ``path`` (a run-state file, or a folder: its newest one)."""

    def __init__(self, path, settings):
        self.path = self._find(path)
        self.state = load_safe(self.path, "resume")
        check_identity("resume", self.path, self.state["identity"], run_identity(settings))
        self.done_until = (self.state["round"], PHASES.index(self.state["phase"]))
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
        files = glob.glob(os.path.join(path, "*-run.pth"))
        if not files:
            raise InputError(f"resume: [{path}] holds no run-state file (*-run.pth); give a file or another folder.")
        return max(files, key=os.path.getmtime)

    def done(self, round_idx, phase):
        """Whether the file's run finished ``phase`` of round ``round_idx``."""
        return (round_idx, PHASES.index(phase)) <= self.done_until

    def restore_bookkeeping(self, trainer):
        """History, best-so-far and timings: what the report needs even when no phase is left to run."""
        trainer.history, trainer.best, trainer.phase_seconds = (
            self.state["history"], self.state["best"], self.state["phase_seconds"]
        )

    def restore_training(self, trainer, round_idx):
        """Model, optimizer and generators as they were when the file was written, before a phase of round
        ``round_idx``; if that is the file's round, also the round's loader position and teachers."""
        state = self.state
        trainer.model.load_state_dict(state["model"])
        trainer.model.eval()  # as the file's run left it: every phase ends with an evaluation
        trainer.optimizer.load_state_dict(state["optimizer"])
        if state["round"] == round_idx:
            trainer.round_loader.generator.set_state(state["loader_generator"])
            if state["teachers"] is not None:
                teachers = {name: value.to(trainer.device) for name, value in state["teachers"].items()}
                trainer.teachers = DeviceTeachers(trainer.model, teachers, cache=trainer.round_cache)
        set_rng_states(state["rng"])
