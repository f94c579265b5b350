import numpy as np
import pytest
import torch
from recbole.data.dataloader import FullSortEvalDataLoader
from sklearn.metrics import roc_auc_score

from recbole_dccl.evaluation import UserGroups
from tests.helpers import build, evaluate_test_data


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


SAMPLED_RANKING = {
    "eval_args": {"split": {"LS": "valid_and_test"}, "group_by": "user", "order": "TO", "mode": "uni20"},
    "metrics": ["Hit", "NDCG", "GAUC"],
    "topk": [5, 10],
    "valid_metric": "NDCG@10",
    "metric_decimal_place": 10,
}
# A CTR model on implicit data: no labels but the sampled negatives' (RecBole's own training negative sampling).
IMPLICIT_CTR = {"threshold": None, "train_neg_sample_args": {"distribution": "uniform", "sample_num": 1}, "epochs": 1}


def evaluate_alone(trainer, test_data, users):
    """``trainer.evaluate`` on ``test_data``'s rows of ``users`` alone, with the same negative sampler."""
    inter = test_data.dataset.inter_feat
    alone_data = test_data.dataset.copy(inter[torch.isin(inter["user_id"], users)])
    loader = type(test_data)(test_data.config, alone_data, test_data._sampler, shuffle=False)
    return trainer.evaluate(loader, load_best_model=False)


def test_sampled_ranking_groups_equal_evaluating_each_group_alone(tiny_config):
    _, (train_data, _, test_data), _, trainer = build({**tiny_config, **SAMPLED_RANKING, "user_groups": 3},
                                                      model="GRU4Rec")
    trainer.eval_collector.data_collect(train_data)
    overall = trainer.evaluate(test_data, load_best_model=False)
    assert set(overall) == {"hit@5", "hit@10", "ndcg@5", "ndcg@10", "gauc", "sampled_auc", "repeat_share@10"}  # logits: no logloss
    assert trainer.evaluate(test_data, load_best_model=False) == overall  # the same negatives every evaluation
    groups, users = trainer.group_result, trainer.user_result
    collector_groups = trainer.eval_collector.groups
    assert sum(group["users"] for group in groups.values()) == len(users["users"]) == len(test_data.dataset)
    for index, name in enumerate(collector_groups.names):
        alone = evaluate_alone(trainer, test_data, torch.nonzero(collector_groups.group_of_user == index).squeeze(1))
        assert {key: float(value) for key, value in alone.items()} == {
            key: value for key, value in groups[name].items() if key != "users"
        }
    # One evaluated item per user: GAUC is the plain mean of the users' AUCs (RecBole's in float32).
    for metric, tolerance in (("hit@5", 1e-9), ("ndcg@10", 1e-9), ("gauc", 1e-6)):
        assert np.mean(users[metric]) == pytest.approx(overall[metric], abs=tolerance)


def test_sampled_auc_and_logloss_of_a_ctr_model_on_implicit_data(ctr_config):
    settings = {**ctr_config, **SAMPLED_RANKING, **IMPLICIT_CTR, "user_groups": 3}
    _, (train_data, valid_data, test_data), _, trainer = build(settings, model="DeepFM")
    trainer.fit(train_data, valid_data, saved=False)  # RecBole's trainer, negatives sampled per positive
    result = trainer.evaluate(test_data, load_best_model=False)
    struct = trainer.eval_collector.last_struct
    scores, labels = struct["data.sampled_score"].double().numpy(), struct["data.sampled_label"].numpy()
    users = np.repeat(struct["data.uid"].numpy(), struct["data.sampled_count"].numpy())
    # Each test user's held-out item, then 20 sampled negatives for it.
    assert len(scores) == 21 * len(test_data.dataset) and labels.sum() == len(test_data.dataset)
    assert 0 <= scores.min() and scores.max() <= 1  # DeepFM predicts probabilities
    expected_logloss = -np.mean(labels * np.log(scores) + (1 - labels) * np.log(1 - scores))
    assert result["sampled_auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)
    assert result["sampled_logloss"] == pytest.approx(expected_logloss, abs=1e-9)
    assert 0 < result["gauc"] < 1 and "hit@10" in result
    group_of_user = trainer.eval_collector.groups.group_of_user.numpy()
    for index, name in enumerate(trainer.eval_collector.groups.names):
        mine = group_of_user[users] == index
        assert trainer.group_result[name]["sampled_auc"] == pytest.approx(roc_auc_score(labels[mine], scores[mine]),
                                                                          abs=1e-9)


def test_sampled_auc_and_logloss_are_recboles_own_on_the_sampled_rows(ctr_config):
    """RecBole evaluates AUC and LogLoss on the sampled rows itself, but not next to ranking metrics."""
    settings = {**ctr_config, **SAMPLED_RANKING, **IMPLICIT_CTR}
    ranking = evaluate_test_data(settings, "DeepFM")[0]
    value = evaluate_test_data({**settings, "metrics": ["AUC", "LogLoss"], "valid_metric": "AUC"}, "DeepFM")[0]
    assert (value["auc"], value["logloss"]) == (ranking["sampled_auc"], ranking["sampled_logloss"])
