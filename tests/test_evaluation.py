import numpy as np
import pytest
import torch
from recbole.data.dataloader import FullSortEvalDataLoader
from sklearn.metrics import roc_auc_score

from recbole_dccl.evaluation import UserGroups
from tests.helpers import build


def test_group_metrics_equal_evaluating_each_group_alone(tiny_config):
    config, (train_data, _, test_data), _, trainer = build({**tiny_config, "user_groups": 3}, model="GRU4Rec")
    trainer.eval_collector.data_collect(train_data)
    trainer.evaluate(test_data, load_best_model=False)
    groups = trainer.group_result
    collector_groups = trainer.eval_collector.groups
    assert sum(group["users"] for group in groups.values()) == len(test_data.dataset)
    inter = test_data.dataset.inter_feat
    for index, name in enumerate(collector_groups.names):
        members = torch.nonzero(collector_groups.group_of_user == index).squeeze(1)
        alone_data = test_data.dataset.copy(inter[torch.isin(inter["user_id"], members)])
        loader = FullSortEvalDataLoader(config, alone_data, test_data._sampler, shuffle=False)
        alone = trainer.evaluate(loader, load_best_model=False)
        assert {key: float(value) for key, value in alone.items()} == {
            key: value for key, value in groups[name].items() if key != "users"
        }


def test_quantile_groups_have_equal_sizes_from_least_to_most_active(tiny_config):
    _, (train_data, _, _), _, _ = build(tiny_config, model="GRU4Rec")
    groups = UserGroups(5, train_data.dataset)
    assert groups.sizes == [6] * 5
    counts = np.bincount(train_data.dataset.inter_feat["user_id"].numpy())
    group_of_user = groups.group_of_user.numpy()
    top_of_group = [counts[group_of_user == g].max() for g in range(5)]
    bottom_of_next = [counts[group_of_user == g].min() for g in range(1, 5)]
    assert all(top <= bottom for top, bottom in zip(top_of_group, bottom_of_next))


def test_threshold_groups(tiny_config):
    _, (train_data, _, _), _, _ = build(tiny_config, model="GRU4Rec")
    groups = UserGroups([10, 15], train_data.dataset)
    counts = np.bincount(train_data.dataset.inter_feat["user_id"].numpy())
    expected = np.digitize(counts[1:], [10, 15])
    assert groups.group_of_user[1:].tolist() == expected.tolist()


@pytest.mark.parametrize("spec", [0, "five", [], True])
def test_bad_group_spec_is_refused(tiny_config, spec):
    _, (train_data, _, _), _, _ = build(tiny_config, model="GRU4Rec")
    with pytest.raises(ValueError, match=r"user_groups: .* must be a positive number of equal-size groups"):
        UserGroups(spec, train_data.dataset)


def test_labeled_group_metrics_equal_evaluating_each_group_alone(ctr_config):
    config, (train_data, _, test_data), _, trainer = build({**ctr_config, "user_groups": 3}, model="DeepFM")
    trainer.eval_collector.data_collect(train_data)
    overall = trainer.evaluate(test_data, load_best_model=False)
    assert set(overall) == {"auc", "logloss", "gauc"}
    groups = trainer.group_result
    collector_groups = trainer.eval_collector.groups
    inter = test_data.dataset.inter_feat
    for index, name in enumerate(collector_groups.names):
        members = torch.nonzero(collector_groups.group_of_user == index).squeeze(1)
        alone_data = test_data.dataset.copy(inter[torch.isin(inter["user_id"], members)])
        loader = type(test_data)(config, alone_data, test_data._sampler, shuffle=False)
        alone = trainer.evaluate(loader, load_best_model=False)
        np.testing.assert_equal(  # equal, nan (no user of the group with both labels) included
            {key: float(value) for key, value in alone.items()},
            {key: value for key, value in groups[name].items() if key != "users"},
        )


def test_labeled_gauc_is_the_positive_weighted_mean_of_per_user_auc(ctr_config):
    config, (train_data, _, test_data), _, trainer = build({**ctr_config, "metric_decimal_place": 10}, model="DeepFM")
    trainer.eval_collector.data_collect(train_data)
    result = trainer.evaluate(test_data, load_best_model=False)
    struct = trainer.eval_collector.last_struct
    scores, labels, users = struct["rec.score"].numpy(), struct["data.label"].numpy(), struct["data.uid"].numpy()
    weighted, positives = 0.0, 0
    for user in np.unique(users):
        mine = users == user
        if 0 < labels[mine].sum() < mine.sum():
            weighted += roc_auc_score(labels[mine], scores[mine]) * labels[mine].sum()
            positives += labels[mine].sum()
    assert positives > 0
    assert result["gauc"] == pytest.approx(weighted / positives, abs=1e-9)
