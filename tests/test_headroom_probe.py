"""experiments/personal_headroom.py's repeat probe: its few-numbers-per-row loss and ranking equal the dense ones."""

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from experiments import personal_headroom as headroom

N_ITEMS, LENGTH, ROWS, USERS = 30, 6, 40, 5


class MeanOfItems(nn.Module):
    """A stand-in sequential backbone: the sequence representation is the mean of its item embeddings."""

    ITEM_SEQ, ITEM_SEQ_LEN = "item_id_list", "item_length"

    def __init__(self):
        super().__init__()
        self.item_embedding = nn.Embedding(N_ITEMS, 8, padding_idx=0)

    def forward(self, seq, seq_len):
        return self.item_embedding(seq).sum(dim=1) / seq_len[:, None]


def rows(generator):
    seq_len = torch.randint(1, LENGTH + 1, (ROWS,), generator=generator)
    seq = torch.randint(1, 8, (ROWS, LENGTH), generator=generator)  # few items: many repeats
    seq[torch.arange(LENGTH)[None, :] >= seq_len[:, None]] = 0
    return {
        MeanOfItems.ITEM_SEQ: seq, MeanOfItems.ITEM_SEQ_LEN: seq_len,
        "item_id": torch.randint(1, N_ITEMS, (ROWS,), generator=generator),
        "user_id": torch.randint(1, USERS, (ROWS,), generator=generator),
        "timestamp": torch.randint(0, 100, (ROWS,), generator=generator),
    }


def dense_scores(backbone, interaction, own_counts, weight):
    """Every item's score with ``weight * log(1 + count)`` added, computed over the whole catalogue."""
    with torch.no_grad():
        scores = backbone(interaction[backbone.ITEM_SEQ], interaction[backbone.ITEM_SEQ_LEN]) @ backbone.item_embedding.weight.T
    scores[:, 0] = -math.inf
    return scores + weight[:, None] * torch.log1p(own_counts)


def test_window_rows_equal_the_dense_loss_and_ranking():
    generator = torch.Generator().manual_seed(0)
    backbone, interaction = MeanOfItems(), rows(generator)
    counts = torch.zeros(ROWS, N_ITEMS)
    for row, seq in enumerate(interaction[backbone.ITEM_SEQ]):
        for item in seq[seq > 0]:
            counts[row, item] += 1
    probe = headroom.RepeatRows(backbone, interaction, headroom.window_counts(interaction, backbone.ITEM_SEQ),
                                "user_id", "item_id", keep_rest=True)
    weight = torch.randn(ROWS, generator=generator)
    scores = dense_scores(backbone, interaction, counts, weight)
    target = interaction["item_id"]
    assert torch.allclose(probe.loss(weight), F.cross_entropy(scores, target), atol=1e-5)

    rank = (scores > scores[torch.arange(ROWS), target][:, None]).sum(dim=1)
    gains = torch.where(rank < 10, 1 / torch.log2(rank.float() + 2), torch.zeros(()))
    assert math.isclose(probe.ndcg(weight), gains.mean().item(), abs_tol=1e-6)
    users = torch.zeros(USERS, dtype=torch.bool)
    users[[1, 3]] = True
    kept = users[interaction["user_id"]]
    assert math.isclose(probe.ndcg(weight, users), gains[kept].mean().item(), abs_tol=1e-6)


def test_history_counts_are_the_users_earlier_training_items():
    generator = torch.Generator().manual_seed(1)
    train, queries = rows(generator), rows(generator)
    items, counts = headroom.history_counts(queries, train, "user_id", "item_id", "timestamp")
    for row in range(ROWS):
        user, time = queries["user_id"][row], queries["timestamp"][row]
        earlier = train["item_id"][(train["user_id"] == user) & (train["timestamp"] < time)].tolist()
        expected = {item: earlier.count(item) for item in set(earlier)}
        got = {int(i): float(n) for i, n in zip(items[row], counts[row]) if n > 0}
        assert got == expected
    assert np.all(items.numpy()[counts.numpy() == 0] == 0)  # pads point at the padding item
