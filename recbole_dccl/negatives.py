"""Sampled negatives for CTR backbones on implicit data (no labels), fixed for a round and drawn per device.

Round 0 trains the cloud as RecBole does: its training loader draws new uniform negatives for every batch
(``train_neg_sample_args``). In rounds >= 1 the devices and the cloud train on the same rows, so their negatives are
drawn once per round and materialised as rows: each positive row is followed by ``sample_num`` copies labelled 0
(the positive 1, in ``LABEL_FIELD``) that keep its other fields (e.g. DIN's history) and take another item, whose
features RecBole joins when a row is read, as its own pointwise sampling does. A copy's item is drawn uniformly
among the items its user has not interacted with in the rows visible to the device up to that round, from a
generator of the user's own (seeded by ``seed``, the round and the user id): every device samples its own
negatives, whatever other devices exist and whichever rank holds it, and a positive row gets the same negatives in
whichever of the round's row sets it is materialised (the devices' local rows, the rows the cloud takes in).
"""

import numpy as np
import torch
from recbole.data.interaction import Interaction
from recbole.utils import InputType

from recbole_dccl.errors import InputError

# RecBole's train_neg_sample_args when it samples no negatives (its Config writes ``None`` as this).
NO_NEGATIVES = {"distribution": "none", "sample_num": "none", "alpha": "none", "dynamic": False, "candidate_num": 0}


def samples_negatives(config):
    """Whether the training rows get sampled negatives: RecBole samples them for a pointwise (CTR) model when
    ``train_neg_sample_args`` names a distribution."""
    args = config["train_neg_sample_args"]
    return (
        config["MODEL_INPUT_TYPE"] == InputType.POINTWISE
        and args["distribution"] != "none"
        and args["sample_num"] != "none"
    )


def rows_per_positive(config):
    """How many training rows each positive interaction becomes: itself, followed by its ``sample_num`` negatives
    where they are sampled."""
    return 1 + config["train_neg_sample_args"]["sample_num"] if samples_negatives(config) else 1


class RoundNegatives:
    """Draws and materialises the fixed negatives of a round's rows of ``dataset`` (the training set)."""

    def __init__(self, config, dataset):
        self.copies = rows_per_positive(config)
        self.sample_num = self.copies - 1
        self.seed = config["seed"]
        self.label_field = config["LABEL_FIELD"]
        self.dataset = dataset
        self.users = dataset.inter_feat[dataset.uid_field].numpy()
        self.items = dataset.inter_feat[dataset.iid_field].numpy()
        self.n_items = dataset.item_num  # ids 1 .. n_items - 1; 0 is RecBole's padding

    def add(self, rows, visible, round_idx):
        """``(inter_feat, positive)``: the rows ``rows`` (indices into the dataset, all in ``visible``, the rows
        visible to the devices in round ``round_idx``), each followed by its ``sample_num`` negatives, and for every
        resulting row the index into ``rows`` of its positive."""
        rows = np.asarray(rows, dtype=np.int64)
        visible = np.asarray(visible, dtype=np.int64)
        visible = visible[np.argsort(self.users[visible], kind="stable")]  # by user, each user's rows in order
        visible_users = self.users[visible]
        users = self.users[rows]
        negatives = np.empty((len(rows), self.sample_num), dtype=np.int64)
        order = np.argsort(users, kind="stable")
        asking, starts = np.unique(users[order], return_index=True)
        for user, own in zip(asking, np.split(order, starts[1:])):
            seen = visible[np.searchsorted(visible_users, user) : np.searchsorted(visible_users, user, side="right")]
            # Drawn for all the user's visible rows, so a row's negatives do not depend on which others are asked for.
            draws = self._draw(user, round_idx, self.items[seen], len(seen) * self.sample_num)
            position = np.searchsorted(seen, rows[own])
            if not np.array_equal(seen[np.minimum(position, len(seen) - 1)], rows[own]):
                raise ValueError(f"rows of user {user} are not visible in round {round_idx}")
            negatives[own] = draws.reshape(len(seen), self.sample_num)[position]

        inter_feat = self.dataset.inter_feat[torch.as_tensor(rows)].repeat_interleave(self.copies)
        items = np.column_stack([self.items[rows], negatives]).reshape(-1)
        labels = torch.zeros(len(rows), self.copies)
        labels[:, 0] = 1.0
        inter_feat.update(Interaction({self.dataset.iid_field: torch.from_numpy(items), self.label_field: labels.view(-1)}))
        return inter_feat, np.repeat(np.arange(len(rows)), self.copies)

    def _draw(self, user, round_idx, seen_items, count):
        """``count`` items drawn uniformly, with replacement, among those ``user`` has not interacted with."""
        seen_items = np.unique(seen_items)
        if len(seen_items) >= self.n_items - 1:
            token = self.dataset.id2token(self.dataset.uid_field, [user])[0]
            raise InputError(
                f"train_neg_sample_args: user [{token}] has interacted with every item, so no negative can be sampled "
                "for it; drop such users (e.g. user_inter_num_interval) or set train_neg_sample_args: ~ with labels."
            )
        generator = np.random.default_rng([self.seed, round_idx, int(user)])
        draws = generator.integers(1, self.n_items, size=count)
        rejected = np.flatnonzero(np.isin(draws, seen_items))
        while len(rejected):
            draws[rejected] = generator.integers(1, self.n_items, size=len(rejected))
            rejected = rejected[np.isin(draws[rejected], seen_items)]
        return draws
