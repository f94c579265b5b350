"""Checkpoints that hold tensors and plain values only.

RecBole 1.2.1 pickles its whole ``Config`` into every checkpoint, which torch>=2.6 refuses to load by default
(``weights_only=True``). We store the config as plain values instead, so RecBole's own
``evaluate(load_best_model=True)`` and ``resume_checkpoint`` load our files safely, unchanged. Files are written
to a temporary name and renamed, so a crash never leaves a half-written checkpoint. Every file we read back
(``cloud_checkpoint``, ``resume``) goes through :func:`load_safe`: a file holding anything but tensors and plain
values is refused before any of it runs. RecBole names a run's checkpoint by the second it started; ours add a
random suffix, so that runs started within one second in one ``checkpoint_dir`` keep files of their own.

A DCCL run ends with two models, its two *readings* (:data:`READINGS`): ``selected``, the phase that scored best in
the device view on valid (RecBole's best-epoch convention), at RecBole's ``saved_model_file``; and ``deployed``, the
model after the last phase, what the cloud and every device run once the rounds are over, beside it
(:func:`reading_files`). Each file records its reading and names both files, so that either one leads to the other.
"""

import enum
import os
import uuid

from recbole.utils import get_local_time, set_color

from recbole_dccl.defaults import identity_defaults
from recbole_dccl.distributed import is_main_process
from recbole_dccl.errors import InputError
from recbole_dccl.files import save_atomic


def plain(value):
    """``value`` as bools, numbers, strings, lists and dicts only."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [plain(item) for item in value]
    return str(value)


def check_identity(key, path, written, current):
    """Refuse checkpoint ``path`` (read from config ``key``) when the settings it was ``written`` with differ from
    the ``current`` run's. A setting the file predates had its value of then (:func:`identity_defaults`)."""
    written = {**identity_defaults(), **written}
    differs = {name: (written.get(name), value) for name, value in current.items() if written.get(name) != value}
    if differs:
        raise InputError(f"{key}: [{path}] was written with other settings (file value, this run): {differs}")


READINGS = ("selected", "deployed")


def reading_files(saved_model_file):
    """``{reading: path}`` of a DCCL run's two models: ``selected`` at RecBole's ``saved_model_file``, ``deployed``
    beside it as ``<same stem>-deployed.pth``."""
    return {"selected": saved_model_file, "deployed": os.path.splitext(saved_model_file)[0] + "-deployed.pth"}


def checkpoint_file(checkpoint_dir, model):
    """``<checkpoint_dir>/<model>-<time>-<suffix>.pth``: RecBole's name (the local time to the second) and 6 random
    hex digits (from the operating system, not from the seeded generators), different for every run."""
    return os.path.join(checkpoint_dir, f"{model}-{get_local_time()}-{uuid.uuid4().hex[:6]}.pth")


class SafeCheckpointMixin:
    """Put before a RecBole trainer class: same checkpoint keys, config stored as plain values, a file name of its
    own for every run."""

    def __init__(self, config, model):
        super().__init__(config, model)
        self.saved_model_file = checkpoint_file(self.checkpoint_dir, config["model"])

    def _checkpoint(self, epoch):
        """RecBole's checkpoint keys, of the model as it is now."""
        return {
            "config": plain(self.config.final_config_dict),
            "epoch": epoch,
            "cur_step": self.cur_step,
            "best_valid_score": float(self.best_valid_score),
            "state_dict": self.model.state_dict(),
            "other_parameter": self.model.other_parameter(),
            "optimizer": self.optimizer.state_dict(),
        }

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        if not is_main_process(self.config):  # RecBole's rule (local rank 0) would write once per machine
            return
        saved_model_file = kwargs.pop("saved_model_file", self.saved_model_file)
        save_atomic(self._checkpoint(epoch), saved_model_file)
        if verbose:
            self.logger.info(set_color("Saving current", "blue") + f": {saved_model_file}")

