"""The target-type breakdown (``target_types``): every evaluated item is a repeat (the user has it in the training
data) or an explore target, every metric is also reported per type, and ``repeat_share@K`` is the share of the
users' own items in their top-K."""

import os

import numpy as np
import pytest
import torch

from recbole_dccl.errors import InputError
from recbole_dccl.quick_start import run_recbole_dccl
from tests.conftest import TINY_SETTINGS
from tests.helpers import build

USERS, ITEMS, HISTORY = 12, 30, 10


def own_items(user):
    """The items of ``user``'s training history: ten consecutive item ids."""
    return [(user + step) % ITEMS + 1 for step in range(HISTORY)]


def write_typed_dataset(folder, name="typed"):
    """Each user's training history, then a valid item new to the user, then the test item: for even users the
    first item of their history (a repeat target, which a sequential dataset holds only as history), for odd
    users an item they never had (an explore target)."""
    path = os.path.join(folder, name)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, f"{name}.inter"), "w") as file:
        file.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for user in range(1, USERS + 1):
            history = own_items(user)
            test = history[0] if user % 2 == 0 else (user + 20) % ITEMS + 1
            for step, item in enumerate([*history, (user + 15) % ITEMS + 1, test]):
                file.write(f"{user}\t{item}\t{1000 * user + step}\n")
    return folder


@pytest.fixture
def typed_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return {**TINY_SETTINGS, "data_path": write_typed_dataset(str(tmp_path / "data")), "user_groups": 2,
            "checkpoint_dir": str(tmp_path / "saved"), "metric_decimal_place": 10}


def evaluated(config_dict, model="GRU4Rec"):
    config, (train_data, _, test_data), net, trainer = build(config_dict, model=model, dataset="typed")
    trainer.eval_collector.data_collect(train_data)
    result = trainer.evaluate(test_data, load_best_model=False)
    return config, train_data, test_data, net, trainer, result


def test_types_per_metric_and_the_share_of_own_items_are_known_by_construction(typed_config):
    config, train_data, test_data, model, trainer, result = evaluated(typed_config)
    dataset = train_data.dataset
    users = trainer.user_result
    tokens = dataset.id2token(dataset.uid_field, np.array(users["users"]))
    assert users["type"] == ["repeat" if int(token) % 2 == 0 else "explore" for token in tokens]
    types = trainer.type_result
    assert set(types) == {"repeat", "explore"} and types["repeat"]["users"] == types["explore"]["users"] == USERS // 2
    for name, values in types.items():
        mine = [index for index, kind in enumerate(users["type"]) if kind == name]
        for metric in ("ndcg@10", "hit@10"):
            assert values[metric] == pytest.approx(np.mean([users[metric][index] for index in mine]), abs=1e-9)

    # repeat_share@10: the users' own training items among their top 10, counted from the model's own scores.
    model.eval()
    own = 0
    for batch in test_data:
        interaction = batch[0]
        with torch.no_grad():
            scores = model.full_sort_predict(interaction)
        scores[:, 0] = -torch.inf  # the padding item, as RecBole's full-sort evaluation leaves it out
        top = torch.topk(scores, 10, dim=-1).indices
        for user, items in zip(dataset.id2token(dataset.uid_field, interaction[dataset.uid_field]), top.tolist()):
            had = {int(token) for token in dataset.id2token(dataset.iid_field, np.array(items))} & set(own_items(int(user)))
            own += len(had)
    assert result["repeat_share@10"] == pytest.approx(own / (10 * USERS), abs=1e-9)


def test_labeled_rows_are_typed_by_their_own_item(typed_config):
    labeled = {**typed_config, "backbone": "DeepFM", "mlp_hidden_size": [8, 8], "threshold": None,
               "train_neg_sample_args": {"distribution": "uniform", "sample_num": 1},
               "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "uni20"},
               "metrics": ["Hit", "NDCG", "GAUC"]}
    _, _, _, _, trainer, result = evaluated(labeled, model="DCCL")
    kinds = trainer.user_result["type"]  # sampled ranking: one row per user, typed by its evaluated item
    assert kinds.count("repeat") == kinds.count("explore") == USERS // 2
    assert 0 <= result["repeat_share@10"] <= 1


def test_a_dccl_run_reports_both_views_by_type(typed_config):
    result = run_recbole_dccl(model="DCCL", dataset="typed", config_dict={**typed_config, "rounds": 1},
                              saved=False, verbose=False)
    for name in ("cloud_only", "dccl_device", "deployed_device", "deployed_cloud"):
        assert set(result[name]["test_types"]) == {"repeat", "explore"}
        assert set(result[name]["valid_types"]) == {"explore"}  # every valid item is new to its user
        assert "repeat_share@10" in result[name]["test"]


def test_target_types_off_and_bad_values(typed_config):
    _, _, _, _, trainer, result = evaluated({**typed_config, "target_types": False})
    assert trainer.type_result == {} and "repeat_share@10" not in result and "type" not in trainer.user_result
    with pytest.raises(InputError, match=r"target_types: \['yes'\] must be True or False"):
        build({**typed_config, "target_types": "yes"}, model="GRU4Rec", dataset="typed")
