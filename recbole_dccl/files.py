"""Files that are written whole or not at all, and read back safely.

Everything the package writes goes to a temporary name and is renamed into place, so a crash never leaves a
half-written checkpoint, result file or export. Checkpoints are read back through :func:`load_safe`, which refuses
any file that holds more than tensors and plain values before anything in it runs. A result file whose name ends in
``.xz`` is written as compact JSON compressed with LZMA (how the committed benchmark results keep per-user values at
a few percent of their indented size); :func:`read_result_file` reads either form.
"""

import json
import lzma
import os
import pickle
import re

import torch

from recbole_dccl.errors import InputError


def write_atomic(path, write):
    """``write(temporary_path)``, then an atomic rename to ``path``: readers never see a half-written file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.tmp-{os.getpid()}"
    write(temporary)
    os.replace(temporary, path)


def save_atomic(state, path):
    """``torch.save`` ``state`` to ``path`` atomically."""
    write_atomic(path, lambda temporary: torch.save(state, temporary))


def load_safe(path, key):
    """``torch.load(path, weights_only=True)`` onto the CPU; a file that is not one of our checkpoints is refused
    with an :class:`InputError` naming config ``key`` and the file. Unpickling stops at the first object that is
    not a tensor or a plain value, so nothing in a tampered or foreign file is executed."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = re.search(r"WeightsUnpickler error:\s*(.*?\.?)(?:\s\s|\. |\n|$)", str(error))
        raise InputError(
            f"{key}: [{path}] is refused: it is not a file of tensors and plain values only "
            f"({reason.group(1) if reason else 'weights-only load failed'}), so it is no checkpoint of ours, or an "
            "altered one. Nothing in it was run."
        ) from None
    except (RuntimeError, EOFError, KeyError, OSError) as error:
        raise InputError(f"{key}: [{path}] cannot be read as a checkpoint: {type(error).__name__}: {error}") from None


def write_result_file(path, result):
    """``result`` as JSON at ``path``: indented, or compact and LZMA-compressed where ``path`` ends in ``.xz``."""
    def write(temporary):
        if path.endswith(".xz"):
            with lzma.open(temporary, "wt") as file:
                json.dump(result, file, separators=(",", ":"))
        else:
            with open(temporary, "w") as file:
                json.dump(result, file, indent=2)

    write_atomic(path, write)


def read_result_file(path):
    """A result file written by :func:`write_result_file`, in either form."""
    with (lzma.open(path, "rt") if path.endswith(".xz") else open(path)) as file:
        return json.load(file)
