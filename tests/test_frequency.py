"""The Frequency baselines: each user's own training items by count then recency, or global popularity; nothing
masked, nothing learned."""

import numpy as np
import pytest
import torch

from recbole_dccl.errors import InputError
from recbole_dccl.model.frequency import user_scores
from recbole_dccl.quick_start import run_recbole_dccl
from tests.helpers import build


def test_user_scores_rank_by_count_then_recency():
    # user 1: items 3, 5, 3, 7, 5 in time order -> 3 and 5 twice (5 more recently), 7 once
    users = np.array([1, 1, 1, 1, 1, 2])
    items = np.array([3, 5, 3, 7, 5, 3])
    scores = user_scores(users, items, n_users=3, n_items=9).toarray()
    own = scores[1]
    assert own[5] > own[3] > own[7] > 0
    assert np.all(own[[0, 1, 2, 4, 6, 8]] == 0)
    assert own[7] >= 1 and own[7] < 2 and own[3] >= 2 and own[3] < 3 and own[5] >= 2 and own[5] < 3  # count + recency
    assert scores[2, 3] >= 1 and np.count_nonzero(scores[2]) == 1


def test_frequency_model_scores_own_items_first(tiny_config):
    config, (train_data, _, test_data), model, _ = build({**tiny_config, "frequency_scope": "user"}, model="Frequency")
    batch = next(iter(test_data))[0]
    scores = model.full_sort_predict(batch)
    assert scores.shape == (len(batch), train_data.dataset.item_num)
    dataset = train_data.dataset
    for row in range(len(batch)):
        user = int(batch["user_id"][row])
        mine = dataset.inter_feat["user_id"] == user
        consumed = set(dataset.inter_feat["item_id"][mine].tolist()) | set(dataset.inter_feat["item_id_list"][mine, 0].tolist())
        top = torch.topk(scores[row], len(consumed)).indices.tolist()
        assert set(top) == consumed  # every consumed item above every other
    _, _, popularity, _ = build({**tiny_config, "frequency_scope": "global"}, model="Frequency")
    pop_scores = popularity.full_sort_predict(batch)
    assert torch.equal(pop_scores[0], pop_scores[-1])  # the same ranking for every user
    counts = torch.bincount(dataset.inter_feat["item_id"], minlength=dataset.item_num).double()
    first = dataset.inter_feat["item_id_list"][dataset.inter_feat["item_length"] == 1, 0]
    counts += torch.bincount(first, minlength=dataset.item_num).double()
    assert torch.equal(torch.argsort(pop_scores[0], stable=True), torch.argsort(counts, stable=True))


def test_frequency_runs_through_the_entry_point_with_per_user_results(tiny_config):
    result = run_recbole_dccl(model="Frequency", dataset="tiny", config_dict=tiny_config, verbose=False)
    users = result["test_users"]
    assert abs(np.mean(users["ndcg@10"]) - result["test_result"]["ndcg@10"]) < 1e-4  # RecBole rounds to 4 places
    assert sum(len(members) for members in result["user_groups"].values()) == 30


def test_frequency_under_sampled_ranking_scores_the_sampled_items(tiny_config):
    sampled = {"eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "uni20"},
               "metrics": ["Hit", "NDCG", "GAUC"]}
    result = run_recbole_dccl(model="Frequency", dataset="tiny", config_dict={**tiny_config, **sampled}, verbose=False)
    assert set(result["test_users"]) == {"users", "hit@10", "ndcg@10", "gauc", "type"}
    assert abs(np.mean(result["test_users"]["gauc"]) - result["test_result"]["gauc"]) < 1e-4


def test_an_unknown_scope_is_refused_by_name(tiny_config):
    with pytest.raises(InputError, match=r"frequency_scope: \[users\] is not valid; it must be one of \['user', 'global'\]"):
        build({**tiny_config, "frequency_scope": "users"}, model="Frequency")
