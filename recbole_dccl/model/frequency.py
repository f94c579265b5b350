"""Frequency: the counting baselines a reviewer asks for on repeat-consumption data, with no learning.

``frequency_scope: user`` ranks each user's own training items by how often the user consumed them, ties broken
by recency (the most recent first); items the user never consumed come after all of those, by global count.
``frequency_scope: global`` is global popularity (RecBole's ``Pop``), scored here as a sequential model so that,
like every sequential model, it is evaluated without masking the items a user consumed in training: on data where
users return to their items, RecBole's ``Pop`` (a general model, which masks them) could not recommend the very
items most test targets are.

Counts are taken once from the training split the model is built on (every training interaction of every user),
so a row's own target is never what scores it: validation and test targets are not in the counts.
"""

import numpy as np
import scipy.sparse
import torch
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType, ModelType

from recbole_dccl.errors import InputError

SCOPES = ("user", "global")


class Frequency(SequentialRecommender):
    """Counting baselines: each user's own items by count then recency, or global popularity (``frequency_scope``)."""

    type = ModelType.SEQUENTIAL
    input_type = InputType.POINTWISE

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.scope = config["frequency_scope"]
        if self.scope not in SCOPES:
            raise InputError(f"frequency_scope: [{self.scope}] is not valid; it must be one of {list(SCOPES)}.")
        users, items = training_interactions(dataset, self.ITEM_SEQ, self.ITEM_SEQ_LEN)
        global_count = np.bincount(items, minlength=self.n_items).astype(np.float64)
        # Unconsumed items rank by global count, below every consumed one: a score in [0, 1).
        self.register_buffer("popularity", torch.from_numpy(global_count / (global_count.max() + 1)).float())
        self.user_scores = user_scores(users, items, dataset.user_num, self.n_items)
        self.fake_loss = torch.nn.Parameter(torch.zeros(1))  # RecBole's trainer needs a parameter to optimise

    def calculate_loss(self, interaction):
        return self.fake_loss.sum()

    def full_sort_predict(self, interaction):
        users = interaction[self.USER_ID].cpu().numpy()
        popularity = self.popularity.expand(len(users), -1)
        if self.scope == "global":
            return popularity.clone()
        own = torch.from_numpy(self.user_scores[users].toarray()).to(self.popularity)
        return torch.where(own > 0, own, popularity)

    def predict(self, interaction):
        scores = self.full_sort_predict(interaction)
        return scores.gather(1, interaction[self.ITEM_ID].unsqueeze(1)).squeeze(1)


def training_interactions(dataset, item_seq_field, item_seq_len_field):
    """``(users, items)`` of every training interaction: each row's target, plus each user's first item, which a
    sequential split only ever holds as the history of the user's first row."""
    inter = dataset.inter_feat
    users, items = inter[dataset.uid_field].numpy(), inter[dataset.iid_field].numpy()
    first = inter[item_seq_len_field].numpy() == 1
    first_items = inter[item_seq_field].numpy()[first, 0]
    return np.r_[users[first], users], np.r_[first_items, items]


def user_scores(users, items, n_users, n_items):
    """Sparse ``[n_users, n_items]``: count + recency for every item a user consumed, recency in ``[0, 1)`` being
    the item's last position among the user's interactions (in time order) divided by their number."""
    order = np.argsort(users, kind="stable")
    users, items = users[order], items[order]
    starts = np.r_[0, np.flatnonzero(np.diff(users)) + 1]
    lengths = np.diff(np.r_[starts, len(users)])
    recency = (np.arange(len(users)) - np.repeat(starts, lengths)) / np.repeat(lengths, lengths)
    pairs, first_from_end, counts = np.unique(
        (users * n_items + items)[::-1], return_index=True, return_counts=True
    )
    last_recency = recency[::-1][first_from_end]
    return scipy.sparse.csr_matrix((counts + last_recency, (pairs // n_items, pairs % n_items)), shape=(n_users, n_items))
