"""The ``.npz`` files a device reads and writes: its metapatch (array ``metapatch``) and its local data (one array
per input field of the device model, and the target)."""

import os

import numpy as np


def load_arrays(path, required=()):
    """``{name: array}`` of an ``.npz`` file; a ``ValueError`` naming the file when it lacks a ``required`` array."""
    with np.load(path) as data:
        arrays = {name: data[name] for name in data.files}
    missing = [name for name in required if name not in arrays]
    if missing:
        raise ValueError(f"[{path}] has no array {', '.join(missing)}; it holds: {', '.join(arrays) or 'nothing'}.")
    return arrays


def save_arrays(path, arrays):
    """``arrays`` as one ``.npz`` file, written to a temporary name and renamed (as recbole_dccl's ``write_atomic``,
    which a device cannot import: the package needs torch)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "wb") as file:  # a file object: np.savez would append '.npz' to a name
        np.savez(file, **arrays)
    os.replace(temporary, path)
