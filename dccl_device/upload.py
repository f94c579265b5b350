"""What a device sends the cloud after training (``upload_dtype``): its metapatch as float32, float16, or int8 with
one float32 scale per vector. numpy only: the simulated fleet (recbole_dccl's device phase) and a real device
(``python -m dccl_device train --upload=...``) encode with these same functions, so the cloud decodes the same
numbers from either.

int8: ``scale = max|x| / 127`` per vector and ``q = round(x / scale)``, so every decoded value is within
``scale / 2 = max|x| / 254`` of the original (:func:`int8_error_bound`); a zero vector is sent as zeros with scale 1.
"""

import numpy as np

UPLOAD_DTYPES = ("float32", "float16", "int8")
SCALE_BYTES = 4  # int8's per-vector float32 scale


def encode(vectors, dtype):
    """The payload of ``vectors`` (``[devices, k]`` float32) as ``dtype``: ``{"values": ...}``, plus ``"scale"``
    (``[devices]`` float32) for int8."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if dtype == "float32":
        return {"values": vectors.copy()}
    if dtype == "float16":
        return {"values": vectors.astype(np.float16)}
    if dtype == "int8":
        largest = np.abs(vectors).max(axis=-1) if vectors.shape[-1] else np.zeros(vectors.shape[:-1], np.float32)
        scale = np.where(largest > 0, largest / 127, 1).astype(np.float32)
        values = np.clip(np.rint(vectors / scale[..., None]), -127, 127).astype(np.int8)
        return {"values": values, "scale": scale}
    raise ValueError(f"upload_dtype: [{dtype!r}] is not valid; it must be one of {list(UPLOAD_DTYPES)}.")


def decode(payload):
    """The float32 vectors the cloud reads from a payload of :func:`encode`."""
    values = payload["values"].astype(np.float32)
    return values * payload["scale"][..., None] if "scale" in payload else values


def upload_bytes(dim, dtype):
    """Bytes one device sends for a metapatch of ``dim`` numbers."""
    return dim * np.dtype(dtype).itemsize + (SCALE_BYTES if dtype == "int8" else 0)


def int8_error_bound(vectors):
    """Per vector, the largest error int8 may make on it: half its scale."""
    return np.abs(np.asarray(vectors, dtype=np.float32)).max(axis=-1) / 254
