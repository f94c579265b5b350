"""Checkpoints that hold tensors and plain values only.

RecBole 1.2.1 pickles its whole ``Config`` into every checkpoint, which torch>=2.6 refuses to load by default
(``weights_only=True``). We store the config as plain values instead, so RecBole's own
``evaluate(load_best_model=True)`` and ``resume_checkpoint`` load our files safely, unchanged. Files are written
to a temporary name and renamed, so a crash never leaves a half-written checkpoint.
"""

import enum
import os

import torch
from recbole.utils import set_color

from recbole_dccl.distributed import is_main_process


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


def write_atomic(path, write):
    """``write(temporary_path)``, then an atomic rename to ``path``: readers never see a half-written file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.tmp-{os.getpid()}"
    write(temporary)
    os.replace(temporary, path)


def save_atomic(state, path):
    """``torch.save`` ``state`` to ``path`` atomically."""
    write_atomic(path, lambda temporary: torch.save(state, temporary))


class SafeCheckpointMixin:
    """Put before a RecBole trainer class: same checkpoint keys, config stored as plain values."""

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        if not is_main_process(self.config):  # RecBole's rule (local rank 0) would write once per machine
            return
        saved_model_file = kwargs.pop("saved_model_file", self.saved_model_file)
        state = {
            "config": plain(self.config.final_config_dict),
            "epoch": epoch,
            "cur_step": self.cur_step,
            "best_valid_score": float(self.best_valid_score),
            "state_dict": self.model.state_dict(),
            "other_parameter": self.model.other_parameter(),
            "optimizer": self.optimizer.state_dict(),
        }
        save_atomic(state, saved_model_file)
        if verbose:
            self.logger.info(set_color("Saving current", "blue") + f": {saved_model_file}")

