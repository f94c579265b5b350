"""Every metric also per user group, on RecBole's own ``Collector`` and ``Evaluator`` (no metric re-implemented).

Users are grouped by their number of training interactions: ``user_groups: 5`` (an int) makes that many
equal-size groups from the least to the most active users; a list of thresholds ``[10, 50]`` makes the groups
``[1, 10)``, ``[10, 50)``, ``[50, inf)``. Extra named groups (the ``cold`` start users) can be added on top
and overlap them. The collector also keeps the user of every evaluated row, and each
group's metrics are RecBole's evaluator run on that group's rows alone, so they equal evaluating each group's
users by themselves (tested). Works for full-sort ranking and labeled (CTR) evaluation, where rows are users or
interactions; RecBole's sampled ranking modes (uniN, popN) score users per batch row and are not supported.

In a distributed run each rank evaluates its share of the rows; the collector gathers all ranks' rows before
RecBole's evaluator runs, so every metric (overall and per group) is the one-process metric, on every rank.
RecBole's own merge (``_map_reduce``, a mean of the ranks' metrics weighted by their number of batches) is skipped.

Labeled evaluation also reports ``gauc``, overall and per group: RecBole's GAUC is a ranking metric that cannot
run next to AUC and LogLoss, so :func:`labeled_gauc` ranks each user's own labeled rows as RecBole's collector
ranks a full-sort row and hands them to RecBole's ``GAUC`` formula.
"""

import inspect

import numpy as np
import torch
from recbole.evaluator import Collector
from recbole.evaluator.base_metric import TopkMetric
from recbole.evaluator.collector import DataStruct
from recbole.evaluator.metrics import GAUC

from recbole_dccl.distributed import gather_eval_rows, is_distributed, padded_samples
from recbole_dccl.errors import InputError

USER_ROWS = "data.uid"
# What the collector gathers per evaluated row (RecBole's per-evaluation keys, and the rows' users).
ROW_KEYS = ("rec.topk", "rec.meanrank", "rec.score", "rec.items", "data.label", USER_ROWS)


class UserGroups:
    """Which group each user belongs to, from the training data."""

    def __init__(self, spec, train_dataset):
        uid_field = train_dataset.uid_field
        n_users = train_dataset.num(uid_field)
        counts = np.bincount(train_dataset.inter_feat[uid_field].numpy(), minlength=n_users)
        active = np.flatnonzero(counts > 0)
        group = np.full(n_users, -1, dtype=np.int64)
        if isinstance(spec, int) and not isinstance(spec, bool) and spec > 0:
            by_activity = active[np.argsort(counts[active], kind="stable")]
            for index, members in enumerate(np.array_split(by_activity, spec)):
                group[members] = index
        elif isinstance(spec, (list, tuple)) and spec and all(isinstance(t, (int, float)) for t in spec):
            group[active] = np.searchsorted(np.asarray(sorted(spec)), counts[active], side="right")
        else:
            raise InputError(
                f"user_groups: [{spec}] must be a positive number of equal-size groups (e.g. 5) "
                "or a list of interaction-count thresholds (e.g. [10, 50])."
            )
        self.group_of_user = torch.from_numpy(group)
        self.extra = {}
        self.names, self.sizes = [], []
        for index in range(int(group.max()) + 1):
            members = counts[group == index]
            if len(members):
                self.names.append(f"G{index + 1} [{members.min()}, {members.max()}]")
                self.sizes.append(int(len(members)))
            else:
                self.names.append(f"G{index + 1} (empty)")
                self.sizes.append(0)

    def add(self, name, users):
        """An extra group ``name`` of the given user ids, reported after (and overlapping) the activity groups."""
        member = torch.zeros(len(self.group_of_user), dtype=torch.bool)
        member[torch.as_tensor(users, dtype=torch.long)] = True
        self.extra[name] = member

    def members(self):
        """``{group name: [user ids]}``, the extra groups included."""
        groups = {name: torch.nonzero(self.group_of_user == index).squeeze(1).tolist() for index, name in enumerate(self.names)}
        groups.update({name: torch.nonzero(member).squeeze(1).tolist() for name, member in self.extra.items()})
        return groups

    def evaluate(self, evaluator, struct):
        """``{group name: {'users': n, metric: value, ...}}`` for the rows of ``struct``."""
        users = struct[USER_ROWS]
        row_group = self.group_of_user[users]
        masks = {name: row_group == index for index, name in enumerate(self.names)}
        masks.update({name: member[users] for name, member in self.extra.items()})
        results = {}
        for name, mask in masks.items():
            if not bool(mask.any()):
                continue
            part = DataStruct()
            for key, value in struct._data_dict.items():
                rows_aligned = isinstance(value, torch.Tensor) and value.dim() > 0 and len(value) == len(users)
                part[key] = value[mask] if rows_aligned else value
            metrics = {**evaluator.evaluate(part), **labeled_gauc(part, evaluator.config)}
            results[name] = {"users": int(torch.unique(users[mask]).numel()), **{k: float(v) for k, v in metrics.items()}}
        return results


def per_user_metrics(evaluator, struct):
    """``{'users': [...], 'ndcg@10': [...], ...}``: RecBole's own per-user values of every top-k metric, one per
    evaluated user (full-sort ranking; their mean is the metric), for paired comparisons between models."""
    result = {}
    for name, metric in evaluator.metric_class.items():
        if isinstance(metric, TopkMetric):
            pos_index, pos_len = metric.used_info(struct)
            # RecBole's metrics differ in whether metric_info takes the number of positives too.
            takes_pos_len = len(inspect.signature(metric.metric_info).parameters) > 1
            values = metric.metric_info(pos_index, pos_len) if takes_pos_len else metric.metric_info(pos_index)
            result.update({f"{name}@{k}": values[:, k - 1].tolist() for k in metric.topk})
    return {"users": struct[USER_ROWS].tolist(), **result} if result else {}


def labeled_gauc(struct, config):
    """``{'gauc': value}`` for labeled evaluation (``{}`` otherwise): each user's AUC over that user's rows,
    weighted by the user's positives, over users with both labels (RecBole's GAUC)."""
    if "data.label" not in struct or "rec.score" not in struct or USER_ROWS not in struct:
        return {}
    scores, labels, users = struct["rec.score"].float(), struct["data.label"], struct[USER_ROWS]
    _, user_index, counts = torch.unique(users, return_inverse=True, return_counts=True)
    positives = torch.zeros(len(counts)).index_add_(0, user_index, labels.float())
    both_labels = (positives > 0) & (positives < counts)
    if not bool(both_labels.any()):
        return {"gauc": float("nan")}
    # Each user's rows, best score first, padded with -inf: a full-sort score row as RecBole's collector sorts it.
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[torch.argsort(user_index[order], stable=True)]
    starts = torch.cumsum(counts, 0) - counts
    column = torch.arange(len(order)) - starts[user_index[order]]
    desc_scores = torch.full((len(counts), int(counts.max())), -torch.inf)
    desc_labels = torch.zeros_like(desc_scores)
    desc_scores[user_index[order], column] = scores[order]
    desc_labels[user_index[order], column] = labels[order].float()
    average_rank = Collector(config)._average_rank(desc_scores)
    pos_rank_sum = (average_rank * desc_labels).sum(dim=1)
    keep = both_labels.numpy()
    value = GAUC(config).metric_info(pos_rank_sum.numpy()[keep], counts.numpy()[keep], positives.numpy()[keep])
    return {"gauc": round(float(value), config["metric_decimal_place"])}


def group_table(group_result):
    """Per-group metrics as log lines: group, users, then every metric."""
    return "\n".join(
        f"{name:<16} users: {values['users']:<6}"
        + "    ".join(f"{key} : {value:.4f}" for key, value in values.items() if key != "users")
        for name, values in group_result.items()
    )


class UserGroupCollector(Collector):
    """RecBole's ``Collector`` that also records the user of each evaluated row and knows the user groups."""

    def __init__(self, config):
        super().__init__(config)
        self.uid_field = config["USER_ID_FIELD"]
        self.group_spec = config["user_groups"]
        self.groups = None
        self.last_struct = None
        self.padded_rows = 0  # DistributedSampler padding at the end of this rank's rows

    def data_collect(self, train_data):
        super().data_collect(train_data)
        self.groups = UserGroups(self.group_spec, train_data.dataset)

    def eval_batch_collect(self, scores_tensor, interaction, positive_u, positive_i):
        super().eval_batch_collect(scores_tensor, interaction, positive_u, positive_i)
        users = interaction[self.uid_field]
        rows = scores_tensor.shape[0]
        if len(users) != rows:
            raise NotImplementedError(
                "user_groups: per-group metrics need one evaluated row per user or per interaction "
                "(eval_args mode 'full' or 'labeled'), not sampled ranking (uniN/popN)."
            )
        self.data_struct.update_tensor(USER_ROWS, users)

    def get_data_struct(self):
        struct = super().get_data_struct()
        if USER_ROWS in self.data_struct:
            del self.data_struct[USER_ROWS]
        if is_distributed(self.config):
            struct = gather_eval_rows(struct, ROW_KEYS, self.padded_rows)
        self.last_struct = struct
        return struct


class UserGroupEvaluationMixin:
    """Put before a RecBole trainer: after every ``evaluate``, :attr:`group_result` holds the per-group metrics and
    :attr:`user_result` the per-user values of the top-k metrics (empty for labeled evaluation)."""

    def __init__(self, config, model):
        super().__init__(config, model)
        self.eval_collector = UserGroupCollector(config)
        self.group_result = None
        self.user_result = None

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        self.eval_collector.padded_rows = padded_samples(eval_data)
        result = super().evaluate(eval_data, load_best_model, model_file, show_progress)
        collector = self.eval_collector
        if collector.last_struct is not None:
            result.update(labeled_gauc(collector.last_struct, self.config))
        if collector.groups is not None and collector.last_struct is not None:
            self.group_result = collector.groups.evaluate(self.evaluator, collector.last_struct)
            self.user_result = per_user_metrics(self.evaluator, collector.last_struct)
        return result

    def _map_reduce(self, result, num_sample):
        return result  # the collector gathered every rank's rows: ``result`` is already over all of them
