"""Personal memory: the device's record of its user's own items, scored beside the backbone (``device_memory``).

A device holds its user's whole history, the cloud model reads at most its input window. For a row of user u at
time t the memory takes every interaction of u strictly before t (never the row's own, nor anything later) and
describes each distinct item of them by :data:`FEATURES`: 1 (the user has it), ``log(1 + count)`` and
``log(1 + recency-weighted count)`` (each interaction weighing ``RECENCY_DECAY ** interactions since``). The device
model adds ``(weights . features) * repeat_share ** gate`` to that item's logit, where ``repeat_share`` is the share
of the user's interactions before the row that returned to an item the user already had: a user who explores gets
a smaller memory (``gate`` 0: every user the same). The three weights and the gate are shared by every device,
like Theta, and fitted once per round on the rows newer than the cloud model
(:mod:`~recbole_dccl.trainer.memory_fit`); what is personal is the history they weigh. Zero weights add nothing:
the plain device view. The cloud never runs it.

The features travel as two fields of the batch, :data:`ITEMS` ``[B, L]`` (0-padded) and :data:`VALUES`
``[B, L, len(FEATURES) + 1]`` (the row's ``repeat_share`` last): computed here from :class:`Histories` when a batch
lacks them, supplied by the device itself where an exported model runs (:func:`dccl_device.memory.memory_fields`,
numpy only).
"""

import numpy as np
import torch
from torch import nn

from dccl_device.memory import FEATURES, ITEMS, RECENCY_DECAY, VALUES  # the device computes the same fields


class Histories:
    """Every user's interactions in time order, from the splits of a dataset (training rows, then validation and
    test rows as a run holds them), to read the history before any row from. A sequential split holds each user's
    first item only in the history of the user's first row (``item_length`` 1), with its time."""

    def __init__(self, datasets):
        users, items, times = [], [], []
        for dataset in datasets:
            features = dataset.inter_feat
            users.append(features[dataset.uid_field].numpy())
            items.append(features[dataset.iid_field].numpy())
            times.append(features[dataset.time_field].numpy().astype(np.float64))
            length_field, suffix = dataset.config["ITEM_LIST_LENGTH_FIELD"], dataset.config["LIST_SUFFIX"]
            if length_field in features:
                first = features[length_field].numpy() == 1
                users.append(features[dataset.uid_field].numpy()[first])
                items.append(features[dataset.iid_field + suffix].numpy()[first, 0])
                times.append(features[dataset.time_field + suffix].numpy()[first, 0].astype(np.float64))
        users, items, times = np.concatenate(users), np.concatenate(items), np.concatenate(times)
        self.times = np.unique(times)
        time_rank = np.searchsorted(self.times, times)
        self.slots = len(self.times) + 1
        keys = users.astype(np.int64) * self.slots + time_rank
        order = np.argsort(keys, kind="stable")
        self.keys, self.items = torch.from_numpy(keys[order]), torch.from_numpy(items[order].astype(np.int64))
        n_users = int(users.max()) + 1 if len(users) else 1
        self.starts = torch.searchsorted(self.keys, torch.arange(n_users, dtype=torch.int64) * self.slots)

    def features(self, users, times, n_items):
        """``(items [B, L], values [B, L, len(FEATURES) + 1])`` of the history before each row (``users``,
        ``times``: ``[B]``), one column per distinct item, 0-padded (item 0, all values 0)."""
        users = users.long().cpu()
        ranks = torch.from_numpy(np.searchsorted(self.times, times.cpu().double().numpy()))
        starts = self.starts[users]
        ends = torch.searchsorted(self.keys, users * self.slots + ranks)
        lengths = ends - starts
        rows = torch.repeat_interleave(torch.arange(len(users)), lengths)
        first = torch.cumsum(lengths, 0) - lengths
        entries = starts[rows] + torch.arange(len(rows)) - first[rows]
        since = (ends[rows] - 1 - entries).double()  # interactions after this one, before the row
        pairs, pair_of = torch.unique(rows * n_items + self.items[entries], return_inverse=True)
        count = torch.bincount(pair_of, minlength=len(pairs)).double()
        recent = torch.zeros(len(pairs), dtype=torch.float64).index_add_(0, pair_of, RECENCY_DECAY**since)
        pair_rows, pair_items = pairs // n_items, pairs % n_items
        per_row = torch.bincount(pair_rows, minlength=len(users))
        width = max(int(per_row.max()) if len(users) else 0, 1)
        column = torch.arange(len(pairs)) - (torch.cumsum(per_row, 0) - per_row)[pair_rows]
        items = torch.zeros(len(users), width, dtype=torch.long)
        repeat_share = torch.where(lengths > 0, 1 - per_row.double() / lengths.clamp(min=1).double(), 0.0)
        values = torch.zeros(len(users), width, len(FEATURES) + 1)
        items[pair_rows, column] = pair_items
        features = [torch.ones_like(count), count.log1p(), recent.log1p(), repeat_share[pair_rows]]
        values[pair_rows, column] = torch.stack(features, 1).float()
        return items, values


class PersonalMemory(nn.Module):
    """The memory of a DCCL model: its shared ``weights`` and ``gate`` (buffers, set by the fit), where its fields
    come from (:class:`Histories`) and how they change the logits."""

    def __init__(self, dataset):
        super().__init__()
        self.uid_field, self.iid_field, self.time_field = dataset.uid_field, dataset.iid_field, dataset.time_field
        self.n_items = dataset.item_num
        self.histories = Histories([dataset])
        self.register_buffer("weights", torch.zeros(len(FEATURES)))
        self.register_buffer("gate", torch.zeros(()))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A model saved before the gate existed scored every user's memory alike: gate 0.
        state_dict.setdefault(prefix + "gate", torch.zeros(()))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def hold(self, datasets):
        """Read the histories from ``datasets`` (the run's training split first, then its evaluation splits)."""
        self.histories = Histories(datasets)

    def complete(self, interaction):
        """Add the memory's fields to ``interaction`` where it lacks them (its own tensors are read directly, so a
        recorder of the fields a model reads sees only the memory's)."""
        if ITEMS in interaction:
            return
        fields = interaction.interaction
        items, values = self.histories.features(fields[self.uid_field], fields[self.time_field], self.n_items)
        device = fields[self.uid_field].device
        fields[ITEMS], fields[VALUES] = items.to(device), values.to(device)

    def add(self, logits, interaction, weights=None, gate=None):
        """``logits`` with each row's own items raised by :func:`memory_offsets` (default: the shared weights and gate):
        over all items (``[B, n_items]``), or for the row's own item (``[B]``, one logit per row).
        ``interaction[ITEMS]`` names the columns of ``logits`` to raise."""
        weights = self.weights if weights is None else weights
        gate = self.gate if gate is None else gate
        items = interaction[ITEMS]
        offsets = memory_offsets(interaction[VALUES], weights, gate)  # [B, L]
        if logits.dim() == 2:
            # Onto zeros, then added: ONNX Runtime's gradient of a scatter's input zeroes the scattered places
            # (right for an overwriting scatter, wrong for an adding one), which would stop the patch's gradient there.
            return logits + torch.zeros_like(logits).scatter_add(1, items, offsets)
        return logits + (offsets * (items == interaction[self.iid_field][:, None])).sum(1)


def memory_offsets(values, weights, gate):
    """What the memory adds to each own item's logit: ``(weights . features) * repeat_share ** gate`` (``values``:
    ``[..., len(FEATURES) + 1]``, the row's repeat share last; ``0 ** 0`` is 1, so gate 0 scales nothing)."""
    return (values[..., :-1] @ weights) * values[..., -1] ** gate
