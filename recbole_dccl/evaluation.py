"""Every metric also per user group, on RecBole's own ``Collector`` and ``Evaluator`` (no metric re-implemented).

Users are grouped by their number of training interactions: ``user_groups: 5`` (an int) makes that many
equal-size groups from the least to the most active users; a list of thresholds ``[10, 50]`` makes the groups
``[1, 10)``, ``[10, 50)``, ``[50, inf)``. Extra named groups (the ``cold`` start users) can be added on top
and overlap them. The collector also keeps the user of every evaluated row, and each
group's metrics are RecBole's evaluator run on that group's rows alone, so they equal evaluating each group's
users by themselves (tested). Works for full-sort ranking and labeled (CTR) evaluation, where rows are users or
interactions, and for sampled ranking (uniN, popN), where RecBole scores one row per user of a batch (that user's
evaluated items and sampled negatives): the collector takes those rows' users from RecBole's ``row_idx``.

In a distributed run each rank evaluates its share of the rows; the collector gathers all ranks' rows before
RecBole's evaluator runs, so every metric (overall and per group) is the one-process metric, on every rank.
RecBole's own merge (``_map_reduce``, a mean of the ranks' metrics weighted by their number of batches) is skipped.

With ``target_types`` every metric is also reported by the type of each evaluated item, beside the groups:
``repeat`` (the item is one the user has in the training data: what the cloud has trained on by the end of a round
and what a device holds with ``device_data: all``) and ``explore`` (an item new to the user); a row holding several
evaluated items of both types is ``mixed``. Ranking evaluation also reports ``repeat_share@K``: the share of the
users' own items among their top-K (K the largest ``topk``). On data where users come back to their items, repeat
targets are what per-user counting solves and explore targets are where models differ (docs/method.md).

Labeled evaluation also reports ``gauc``, overall and per group: RecBole's GAUC is a ranking metric that cannot
run next to AUC and LogLoss, so :func:`labeled_gauc` ranks each user's own labeled rows as RecBole's collector
ranks a full-sort row and hands them to RecBole's ``GAUC`` formula.

Sampled ranking also reports the labeled reading of the same sampled rows, overall and per group
(:func:`sampled_labeled_metrics`): ``sampled_auc`` and ``sampled_logloss``, RecBole's ``AUC`` and ``LogLoss``
formulas over every scored row, label 1 for the evaluated items and 0 for their sampled negatives (what RecBole's
own ``AUC``/``LogLoss`` give in that mode). LogLoss reads scores as probabilities, so ``sampled_logloss`` is reported
only where every score lies in [0, 1] (CTR models predict sigmoid outputs; sequential and general models score with
unbounded logits). A user's sampled negatives are drawn from the run's seed and the user's id
(:func:`negatives_per_user`): every evaluation ranks a user's items against the same negatives, whichever model,
view, group or number of processes evaluates them.
"""

import inspect
from contextlib import contextmanager

import numpy as np
import torch
from recbole.evaluator import Collector
from recbole.evaluator.base_metric import TopkMetric
from recbole.evaluator.collector import DataStruct
from recbole.evaluator.metrics import AUC, GAUC, LogLoss
from recbole.utils import EvaluatorType

from recbole_dccl.distributed import gather_eval_rows, is_distributed, padded_samples
from recbole_dccl.errors import InputError

USER_ROWS = "data.uid"
# Sampled ranking: each scored (user, item) row's score and label, in the order of the evaluated rows, and per
# evaluated row how many of them are its own.
SAMPLED_SCORE, SAMPLED_LABEL, SAMPLED_COUNT = "data.sampled_score", "data.sampled_label", "data.sampled_count"
SAMPLED_KEYS = (SAMPLED_SCORE, SAMPLED_LABEL)
# Per evaluated row: its target type (TYPES' index; -1 mixed) and, for ranking, how many of its top-K are the user's own.
TARGET_TYPE, TOPK_OWN = "data.target_type", "data.topk_own"
TYPES = ("repeat", "explore")
# What the collector gathers per evaluated row (RecBole's per-evaluation keys, the rows' users and target types).
ROW_KEYS = ("rec.topk", "rec.meanrank", "rec.score", "rec.items", "data.label", USER_ROWS, SAMPLED_COUNT, TARGET_TYPE,
            TOPK_OWN)
OWN_KEYS = (USER_ROWS, SAMPLED_COUNT, *SAMPLED_KEYS, TARGET_TYPE, TOPK_OWN)  # ours, not RecBole's


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
        return evaluate_parts(evaluator, struct, masks)


def evaluate_types(evaluator, struct):
    """``{'repeat': {...}, 'explore': {...}}`` (and ``mixed`` where a row holds targets of both types), as
    :meth:`UserGroups.evaluate` gives per group; ``{}`` where the collector did not label the rows."""
    if TARGET_TYPE not in struct:
        return {}
    masks = {name: struct[TARGET_TYPE] == index for index, name in enumerate(TYPES)}
    masks["mixed"] = struct[TARGET_TYPE] < 0
    return evaluate_parts(evaluator, struct, masks)


def evaluate_parts(evaluator, struct, masks):
    """:func:`evaluate_rows` for each non-empty mask of ``{name: row mask}``."""
    return {name: evaluate_rows(evaluator, struct, mask) for name, mask in masks.items() if bool(mask.any())}


def evaluate_rows(evaluator, struct, mask):
    """``{'users': n, metric: value, ...}``: RecBole's evaluator (and :func:`extra_metrics`) on the rows of
    ``struct`` that ``mask`` keeps."""
    users = struct[USER_ROWS]
    part = DataStruct()
    for key, value in struct._data_dict.items():
        if key in SAMPLED_KEYS:
            part[key] = value[torch.repeat_interleave(mask, struct[SAMPLED_COUNT])]
            continue
        rows_aligned = isinstance(value, torch.Tensor) and value.dim() > 0 and len(value) == len(users)
        part[key] = value[mask] if rows_aligned else value
    metrics = {**evaluator.evaluate(part), **extra_metrics(part, evaluator.config)}
    return {"users": int(torch.unique(users[mask]).numel()), **rounded(metrics, evaluator.config)}


class UserItems:
    """Which items each user has in the training data (its rows' items, and for sequential data the items of their
    histories, where a user's first item appears only): what tells a repeat target from an explore one."""

    def __init__(self, train_dataset):
        features = train_dataset.inter_feat
        users, items = features[train_dataset.uid_field], features[train_dataset.iid_field]
        list_field = train_dataset.iid_field + train_dataset.config["LIST_SUFFIX"]
        if list_field in features:
            history = features[list_field]
            users = torch.cat([users, users[:, None].expand_as(history)[history > 0]])
            items = torch.cat([items, history[history > 0]])
        self.n_items = train_dataset.item_num
        self.keys = torch.unique(users.long() * self.n_items + items.long())  # sorted

    def holds(self, users, items):
        """Whether each user (broadcast against ``items``) has the item."""
        keys = users.long() * self.n_items + items.long()
        index = torch.searchsorted(self.keys, keys).clamp(max=len(self.keys) - 1)
        return self.keys[index] == keys


def per_user_metrics(evaluator, struct):
    """``{'users': [...], 'ndcg@10': [...], 'gauc': [...], ...}``: RecBole's own per-user values of every top-k
    metric, one per evaluated user (full-sort or sampled ranking; their mean is the metric), and with ``GAUC`` each
    user's AUC (:func:`per_user_auc`), for paired comparisons between models."""
    result = {}
    for name, metric in evaluator.metric_class.items():
        if isinstance(metric, TopkMetric):
            pos_index, pos_len = metric.used_info(struct)
            # RecBole's metrics differ in whether metric_info takes the number of positives too.
            takes_pos_len = len(inspect.signature(metric.metric_info).parameters) > 1
            values = metric.metric_info(pos_index, pos_len) if takes_pos_len else metric.metric_info(pos_index)
            result.update({f"{name}@{k}": values[:, k - 1].tolist() for k in metric.topk})
        elif isinstance(metric, GAUC):
            result[name] = per_user_auc(struct["rec.meanrank"]).tolist()
    if not result:
        return {}
    types = {"type": [TYPES[t] if t >= 0 else "mixed" for t in struct[TARGET_TYPE].tolist()]} if TARGET_TYPE in struct else {}
    return {"users": struct[USER_ROWS].tolist(), **result, **types}


def per_user_auc(meanrank):
    """Each ranked row's AUC, from RecBole's ``rec.meanrank`` (the positives' rank sum, the number of scored items,
    the number of positives) by the formula of RecBole's ``GAUC``, which is their mean weighted by the positives
    (the plain mean where every user has one evaluated item). ``nan`` for a row without positives or negatives,
    which GAUC leaves out."""
    pos_rank_sum, user_len, pos_len = meanrank.double().unbind(dim=1)
    neg_len = user_len - pos_len
    pair_num = (user_len + 1) * pos_len - pos_len * (pos_len + 1) / 2 - pos_rank_sum
    return torch.where((pos_len > 0) & (neg_len > 0), pair_num / (neg_len * pos_len), torch.nan)


def rounded(metrics, config):
    """Every metric a Python float rounded to ``metric_decimal_place``: RecBole's GAUC comes back as a float32 that
    reads 0.7361000180244446 once it is a Python float."""
    return {key: round(float(value), config["metric_decimal_place"]) for key, value in metrics.items()}


def extra_metrics(struct, config):
    """What the plugin adds to RecBole's metrics: labeled evaluation's ``gauc``, sampled ranking's
    ``sampled_auc`` and ``sampled_logloss``, ranking's ``repeat_share@K``."""
    return {**labeled_gauc(struct, config), **sampled_labeled_metrics(struct, config), **own_item_share(struct, config)}


def own_item_share(struct, config):
    """``{'repeat_share@K': share}`` where the collector counted each ranked row's own items among its top K (K the
    largest ``topk``): the share of the users' top-K lists that are items they already have."""
    if TOPK_OWN not in struct:
        return {}
    k = max(config["topk"])
    return rounded({f"repeat_share@{k}": struct[TOPK_OWN].double().mean() / k}, config)


def sampled_labeled_metrics(struct, config):
    """For sampled ranking (``{}`` otherwise): RecBole's ``AUC`` over every scored row, 1 for an evaluated item and 0
    for a sampled negative, and RecBole's ``LogLoss`` where every score lies in [0, 1] (a probability)."""
    if SAMPLED_SCORE not in struct:
        return {}
    scores, labels = struct[SAMPLED_SCORE].double().numpy(), struct[SAMPLED_LABEL].double().numpy()
    metrics = {"sampled_auc": AUC(config).metric_info(scores, labels)}
    if scores.min() >= 0 and scores.max() <= 1:
        metrics["sampled_logloss"] = LogLoss(config).metric_info(scores, labels)
    return rounded(metrics, config)


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


@contextmanager
def negatives_per_user(eval_data, seed):
    """While evaluating ``eval_data`` with sampled negatives, draw each user's negatives from numpy seeded by
    ``(seed, user)`` and leave numpy's global state as it was (RecBole draws them from that state, anew on every
    evaluation). RecBole's ``NegSampleEvalDataLoader`` asks its sampler once per user."""
    sampler = getattr(eval_data, "_sampler", None)
    sampling = getattr(eval_data, "neg_sample_args", {}).get("distribution", "none") != "none"
    if sampler is None or not sampling:
        yield
        return
    draw = sampler.sample_by_user_ids

    def drawn_for_the_user(user_ids, item_ids, num):
        state = np.random.get_state()
        np.random.seed([seed, int(user_ids[0])])
        try:
            return draw(user_ids, item_ids, num)
        finally:
            np.random.set_state(state)

    sampler.sample_by_user_ids = drawn_for_the_user
    try:
        yield
    finally:
        del sampler.sample_by_user_ids


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
        if not isinstance(config["target_types"], bool):
            raise InputError(f"target_types: [{config['target_types']!r}] must be True or False.")
        self.groups = None
        self.user_items = None  # with target_types
        self.batch_users = None  # sampled ranking: the user of each score row of the batch being collected
        self.last_struct = None
        self.padded_rows = 0  # DistributedSampler padding at the end of this rank's rows

    def data_collect(self, train_data):
        super().data_collect(train_data)
        self.groups = UserGroups(self.group_spec, train_data.dataset)
        if self.config["target_types"]:
            self.user_items = UserItems(train_data.dataset)

    def sampled_batch_collect(self, interaction, row_idx, scores):
        """Sampled ranking, before :meth:`eval_batch_collect` of the same batch: the user of each score row
        (``row_idx``: the score row of each sampled row), and each sampled row's score and label."""
        rows = int(row_idx[-1]) + 1
        users = torch.zeros(rows, dtype=torch.long)
        users[row_idx] = interaction[self.uid_field]
        self.data_struct.update_tensor(USER_ROWS, users)
        self.batch_users = users
        self.data_struct.update_tensor(SAMPLED_COUNT, torch.bincount(row_idx, minlength=rows))
        self.data_struct.update_tensor(SAMPLED_SCORE, scores.detach().float())
        self.data_struct.update_tensor(SAMPLED_LABEL, interaction[self.config["LABEL_FIELD"]].float())

    def eval_batch_collect(self, scores_tensor, interaction, positive_u, positive_i):
        super().eval_batch_collect(scores_tensor, interaction, positive_u, positive_i)
        users = self.batch_users
        if scores_tensor.shape[0] == len(interaction):  # a row per user (full sort) or per interaction (labeled)
            users = interaction[self.uid_field].cpu()
            self.data_struct.update_tensor(USER_ROWS, users)
        if self.user_items is not None:
            self.types_collect(scores_tensor.detach(), interaction, users, positive_u, positive_i)

    def types_collect(self, scores, interaction, users, positive_u, positive_i):
        """Each row's target type (:data:`TYPES`; -1: evaluated items of both types), and for ranking how many of
        the row's top-K items its user has."""
        repeat_type, explore_type = TYPES.index("repeat"), TYPES.index("explore")
        if scores.dim() == 1:  # labeled: a row per interaction, its item the target
            had = self.user_items.holds(users, interaction[self.config["ITEM_ID_FIELD"]].cpu())
            types = torch.where(had, repeat_type, explore_type)
        else:
            rows, positive_u, positive_i = scores.shape[0], positive_u.cpu(), positive_i.cpu()
            repeats = self.user_items.holds(users[positive_u], positive_i).float()
            targets = torch.bincount(positive_u, minlength=rows)
            repeat = torch.bincount(positive_u, weights=repeats, minlength=rows).long()
            types = torch.where(repeat == targets, repeat_type, torch.where(repeat == 0, explore_type, -1))
            top = torch.topk(scores, max(self.topk), dim=-1).indices.cpu()  # the scores stay where they are
            self.data_struct.update_tensor(TOPK_OWN, self.user_items.holds(users[:, None], top).sum(dim=1))
        self.data_struct.update_tensor(TARGET_TYPE, types)

    def get_data_struct(self):
        struct = super().get_data_struct()
        for key in OWN_KEYS:
            if key in self.data_struct:
                del self.data_struct[key]
        if is_distributed(self.config):
            struct = gather_eval_rows(struct, ROW_KEYS, self.padded_rows, segments=(SAMPLED_COUNT, SAMPLED_KEYS))
        self.last_struct = struct
        return struct


class UserGroupEvaluationMixin:
    """Put before a RecBole trainer: after every ``evaluate``, :attr:`group_result` holds the per-group metrics,
    :attr:`type_result` the per-target-type ones (empty without ``target_types``) and :attr:`user_result` the
    per-user values of the top-k metrics (empty for labeled evaluation), with each row's target type."""

    def __init__(self, config, model):
        super().__init__(config, model)
        self.eval_collector = UserGroupCollector(config)
        self.group_result = None
        self.type_result = None
        self.user_result = None

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        self.eval_collector.padded_rows = padded_samples(eval_data)
        with negatives_per_user(eval_data, self.config["seed"]):
            result = super().evaluate(eval_data, load_best_model, model_file, show_progress)
        collector = self.eval_collector
        if collector.last_struct is not None:
            result.update(extra_metrics(collector.last_struct, self.config))
        result = rounded(result, self.config)
        if collector.groups is not None and collector.last_struct is not None:
            self.group_result = collector.groups.evaluate(self.evaluator, collector.last_struct)
            self.type_result = evaluate_types(self.evaluator, collector.last_struct)
            self.user_result = per_user_metrics(self.evaluator, collector.last_struct)
        return result

    def _neg_sample_batch_eval(self, batched_data):
        """RecBole's, for sampled ranking also handing the collector every sampled row's own score: RecBole's score
        matrix (one row per user) keeps one score per item, the last, where rows of a user share an item."""
        if self.config["eval_type"] != EvaluatorType.RANKING:
            return super()._neg_sample_batch_eval(batched_data)
        interaction, row_idx, positive_u, positive_i = batched_data
        batch_size = interaction.length
        if batch_size <= self.test_batch_size:
            origin_scores = self.model.predict(interaction.to(self.device))
        else:
            origin_scores = self._spilt_predict(interaction, batch_size)
        scores = torch.full((int(positive_u[-1]) + 1, self.tot_item_num), -np.inf, device=self.device)
        scores[row_idx, interaction[self.config["ITEM_ID_FIELD"]]] = origin_scores
        self.eval_collector.sampled_batch_collect(interaction, row_idx, origin_scores.cpu())
        return interaction, scores, positive_u, positive_i

    def _map_reduce(self, result, num_sample):
        return result  # the collector gathered every rank's rows: ``result`` is already over all of them
