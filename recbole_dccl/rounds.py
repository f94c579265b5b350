"""Which training rows the cloud and the devices hold in each round (the two data protocols of docs/method.md).

``static``: RecBole's split as it is; round 0 trains on all training rows and every round's devices hold all
their users' training rows. ``incremental``: each user's ``rounds * fresh_interactions`` newest training rows are
fresh: round 0 trains without them, and round r's devices hold the r-th block of them (oldest block first), which
the cloud then takes in. Validation and test are RecBole's in both, so every variant meets the same test set.
RecBole keeps each user's training rows in time order (``order: TO``), which is what "newest" relies on.

Cold start: ``cold_start_ratio`` of the users, drawn from ``seed``, are held out of every round: no round-0,
device-phase, MoMoDistill or step-2 row of theirs. They arrive after the rounds with the rows their device
holds (:meth:`RoundSchedule.cold_rows`), which only their own device ever trains on.

Round 0 trains on RecBole's own training loader and sampler; rounds >= 1 train on :class:`TrainingRows`, the
round's rows with the fixed negatives of :mod:`recbole_dccl.negatives` when the config samples training negatives.
"""

from dataclasses import dataclass

import numpy as np
import torch
from recbole.data.dataloader import TrainDataLoader

from recbole_dccl.fleet import read_availability
from recbole_dccl.negatives import NO_NEGATIVES, RoundNegatives, samples_negatives

PROTOCOLS = ("incremental", "static")
ROW_FIELD = "dccl_row"  # a round's training rows carry their number in the round: where cached site outputs are kept


def positions_from_newest(users):
    """For rows grouped by user in time order: 0 for each user's newest row, 1 for the one before, ..."""
    order = np.argsort(users, kind="stable")
    sorted_users = users[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_users)) + 1]
    counts = np.diff(np.r_[starts, len(users)])
    position = np.arange(len(users)) - np.repeat(starts, counts)
    from_newest = np.empty(len(users), dtype=np.int64)
    from_newest[order] = np.repeat(counts, counts) - 1 - position
    return from_newest


def cold_start_users(users, ratio, seed):
    """``round(ratio * len(users))`` of ``users`` (at least one when ``ratio > 0``, never all), drawn from ``seed``."""
    if ratio == 0:
        return np.empty(0, dtype=users.dtype)
    count = min(len(users) - 1, max(1, round(ratio * len(users))))
    return np.sort(np.random.default_rng(seed).choice(users, count, replace=False))


class TrainingRowsLoader(TrainDataLoader):
    """RecBole's training loader over rows that already hold their negatives: it samples none of its own."""

    def _set_neg_sample_args(self, config, dataset, dl_format, neg_sample_args):
        super()._set_neg_sample_args(config, dataset, dl_format, NO_NEGATIVES)


@dataclass
class TrainingRows:
    """Rows of the training set as a round trains on them: ``dataset`` holds them, with their negatives if any,
    each numbered by ``ROW_FIELD``; ``positive``: for each of its rows, the index of its positive among the rows
    asked for (a positive's own)."""

    dataset: object
    positive: np.ndarray

    def __len__(self):
        return len(self.dataset)

    def newest(self, count):
        """Whether each row is, or is a negative of, one of its user's ``count`` newest positives."""
        users = self.dataset.inter_feat[self.dataset.uid_field].numpy()
        positive_users = np.zeros(self.positive.max() + 1 if len(self.positive) else 0, dtype=users.dtype)
        positive_users[self.positive] = users
        return (positions_from_newest(positive_users) < count)[self.positive]

    def loader(self, config, shuffle=True):
        return TrainingRowsLoader(config, self.dataset, None, shuffle=shuffle)


class RoundSchedule:
    def __init__(self, config, train_data):
        self.config = config
        self.dataset = train_data.dataset
        self.sampler = train_data._sampler  # RecBole's training sampler (None when it samples no negatives)
        self.negatives = RoundNegatives(config, self.dataset) if samples_negatives(config) else None
        self.rounds = config["rounds"]
        users = self.dataset.inter_feat[self.dataset.uid_field].numpy()
        from_newest = positions_from_newest(users)
        if config["protocol"] == "static":
            self.block = np.zeros(len(users), dtype=np.int64)
        else:
            fresh = config["fresh_interactions"]
            # Block r (1..rounds) of fresh rows; every user keeps at least its oldest row for round 0.
            oldest = positions_from_newest(users[::-1])[::-1] == 0
            block = self.rounds - from_newest // fresh
            self.block = np.where((block >= 1) & ~oldest, block, 0)
        self.from_newest = from_newest
        self.cold_users = cold_start_users(np.unique(users), config["cold_start_ratio"], config["seed"])
        self.is_cold = np.isin(users, self.cold_users)
        availability = config["device_availability"]
        # [rounds + 1, n_users] bool: who is online in which round (None: every device, every round)
        self.online = read_availability(availability, self.dataset, self.rounds) if availability else None

    def cloud_rows(self):
        """Rows round 0 trains the cloud on."""
        return np.flatnonzero((self.block == 0) & ~self.is_cold)

    def device_rows(self, round_idx):
        """Rows the devices hold (and the cloud then takes in) in round ``round_idx`` >= 1."""
        if self.config["protocol"] == "static":
            return np.flatnonzero(~self.is_cold)
        return np.flatnonzero((self.block == round_idx) & ~self.is_cold)

    def local_rows(self, round_idx):
        """Rows the devices train their metapatches on in round ``round_idx`` (``device_data``): ``fresh``, the
        round's :meth:`device_rows`; ``all``, every row their users have produced up to that round (a device keeps
        its user's history; the cloud still takes in only the round's rows)."""
        if self.config["device_data"] == "fresh":
            return self.device_rows(round_idx)
        return np.flatnonzero(self.visible_mask(round_idx) & ~self.is_cold)

    def cold_rows(self):
        """The cold users' rows, all of them on their own devices: what they hold when they arrive after the
        rounds (their training rows of every round)."""
        return np.flatnonzero(self.is_cold)

    def visible_mask(self, round_idx):
        """Whether each row was produced by round ``round_idx``: what a device has seen of its user."""
        if self.config["protocol"] == "static":
            return np.ones(len(self.block), dtype=bool)
        return self.block <= round_idx

    def visible_rows(self, round_idx):
        return np.flatnonzero(self.visible_mask(round_idx))

    def loader(self, rows, shuffle=True):
        """RecBole's training dataloader over ``rows`` of the training set, negatives sampled by RecBole's training
        sampler as for the whole training set (round 0)."""
        inter_feat = self.dataset.inter_feat[torch.as_tensor(rows)]
        return TrainDataLoader(self.config, self.dataset.copy(inter_feat), self.sampler, shuffle=shuffle)

    def training_rows(self, rows, round_idx):
        """``rows`` of the training set as round ``round_idx`` trains on them (:class:`TrainingRows`): with their
        fixed negatives when the config samples training negatives."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.negatives is None:
            inter_feat, positive = self.dataset.inter_feat[torch.as_tensor(rows)], np.arange(len(rows))
        else:
            inter_feat, positive = self.negatives.add(rows, self.visible_rows(round_idx), round_idx)
        inter_feat[ROW_FIELD] = torch.arange(len(inter_feat))
        return TrainingRows(self.dataset.copy(inter_feat), positive)

    def user_history(self, round_idx, n_users, length):
        """``[n_users, length]`` item ids of each user's most recent visible interactions, 0-padded on the left."""
        rows = self.visible_rows(round_idx)
        inter = self.dataset.inter_feat
        users = inter[self.dataset.uid_field].numpy()[rows]
        items = inter[self.dataset.iid_field].numpy()[rows]
        recent = positions_from_newest(users)
        keep = recent < length
        history = np.zeros((n_users, length), dtype=np.int64)
        history[users[keep], length - 1 - recent[keep]] = items[keep]
        return torch.from_numpy(history)
