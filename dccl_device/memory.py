"""The personal memory's inputs on the device (``device_memory``): what its user did before each row, from the
history the device holds, with numpy alone. The same features as recbole_dccl's ``Histories`` (which defines them
from these constants); the shared weights that score them are inside ``device_model.onnx``.

Each of the row's own items has its :data:`FEATURES`, then, in the last column of :data:`VALUES`, the row's
``repeat_share``: the share of the user's interactions before the row that returned to an item the user already
had (0 for a user with none). The memory's offsets are scaled by ``repeat_share ** gate``, so that a user who
explores lets the backbone's scores speak."""

import numpy as np

FEATURES = ("own", "log_count", "log_recent_count")
RECENCY_DECAY = 0.9  # each earlier interaction weighs this much less in the recency-weighted count
ITEMS, VALUES = "dccl_memory_items", "dccl_memory_values"  # the device model's input names


def memory_fields(items, times, row_times):
    """``{ITEMS: [R, L] int64, VALUES: [R, L, len(FEATURES) + 1] float32}`` for rows at ``row_times`` (``[R]``) of a
    user whose interactions are ``items`` at ``times`` (``[N]`` each, any order): per row, each distinct item the
    user had strictly before the row's time, by item id, 0-padded (item 0, values 0)."""
    order = np.argsort(times, kind="stable")
    items, times = np.asarray(items)[order], np.asarray(times, dtype=np.float64)[order]
    rows = []
    for row_time in np.asarray(row_times, dtype=np.float64):
        before = int(np.searchsorted(times, row_time, side="left"))
        history = items[:before]
        since = before - 1 - np.arange(before)
        own, inverse = np.unique(history, return_inverse=True)
        count = np.bincount(inverse, minlength=len(own))
        recent = np.bincount(inverse, weights=RECENCY_DECAY**since, minlength=len(own))
        repeat_share = 1 - len(own) / before if before else 0.0
        features = [np.ones(len(own)), np.log1p(count), np.log1p(recent), np.full(len(own), repeat_share)]
        rows.append((own, np.stack(features, 1)))
    width = max([len(own) for own, _ in rows] + [1])
    fields = {ITEMS: np.zeros((len(rows), width), np.int64),
              VALUES: np.zeros((len(rows), width, len(FEATURES) + 1), np.float32)}
    for index, (own, values) in enumerate(rows):
        fields[ITEMS][index, : len(own)] = own
        fields[VALUES][index, : len(own)] = values
    return fields
