"""How much can any per-user change of the sequence representation gain on a dataset? A probe to run before asking
DCCL's device phase to find it, on a round-0 cloud model (a ``cloud_checkpoint`` written by ``benchmarks/quality.py``):

    python -m experiments.personal_headroom --backbone=GRU4Rec --protocol=static --seed=2020 \\
      --cloud_checkpoint=results/q/cloud/GRU4Rec-static-seed2020.pth --MAX_ITEM_LIST_LENGTH=20 ... --json=out.json

Every user gets a free vector as wide as the sequence representation, added to it before the item scores (a
matrix-factorisation user vector on the frozen item table: more numbers per user than a metapatch and no patch
structure in the way). All users' vectors are trained at once by full-softmax cross-entropy on the rows their
devices train on in round 1 (static: all of the user's training rows; incremental: the fresh ones, or with
``--device_data=all`` every row the user has produced so far),
full batch, Adam, and scored on valid and test after each step budget: NDCG@10 as RecBole computes it for
sequential models, and with the user's consumed training items masked out. Also reported: the share of valid and
test targets the user had already consumed in training, which is what a per-user model can most easily learn.
The extra ``--key=value`` arguments must match the checkpoint's round-0 settings, as for any run that loads it.

``--probe=repeat`` asks the same of a different per-user change: one number per user, the weight of
``log(1 + n)`` added to an item's score, where ``n`` is how often the item occurs in the row's own input sequence
(``--repeat_counts=window``) or among the user's training interactions before the row (``history``): a per-user
propensity to return to one's own items, which no metapatch on the sequence representation can express item by
item. It is fitted twice on the same rows: one weight shared by all users (what a cloud model
could learn), then a per-user weight on top of it; each scored on valid and test, overall and on the least-active
fifth of users (by training interactions). The softmax over the catalogue changes only at the row's own items, so
every step is exact and costs a few numbers per row.
"""

import json
import math

import numpy as np
import torch
from torch.nn import functional as F

from recbole.data.interaction import cat_interactions

from experiments import round0
from recbole_dccl.files import write_result_file
from recbole_dccl.rounds import RoundSchedule

TOP = 10
CHUNK = 4096


def representations(backbone, interaction):
    """The cloud model's sequence representation of every row, in chunks."""
    with torch.no_grad():
        return torch.cat([
            backbone.forward(interaction[backbone.ITEM_SEQ][start:start + CHUNK],
                             interaction[backbone.ITEM_SEQ_LEN][start:start + CHUNK])
            for start in range(0, len(interaction), CHUNK)
        ])


class Split:
    """One evaluation split as tensors: representation, user and target item of every row."""

    def __init__(self, backbone, data, user_field, item_field):
        rows = self.rows(data)
        self.z = representations(backbone, rows)
        self.user = rows[user_field]
        self.target = rows[item_field]

    @staticmethod
    def rows(data):
        """Every row of an evaluation loader as one Interaction."""
        return cat_interactions([batch[0] for batch in data])

    def ndcg(self, items, shift, consumed):
        """NDCG@10 with every user's vector added: as RecBole scores it, and with consumed training items masked."""
        rows = torch.arange(len(self.target))
        scores = (self.z + shift[self.user]) @ items.T
        scores[:, 0] = -math.inf  # the padding item

        def mean_gain():
            rank = (scores > scores[rows, self.target][:, None]).sum(dim=1)
            return torch.where(rank < TOP, 1 / torch.log2(rank.float() + 2), torch.zeros(())).mean().item()

        plain = mean_gain()
        hide = consumed[self.user]
        hide[rows, self.target] = False
        scores[hide] = -math.inf
        return plain, mean_gain()

    def consumed_share(self, consumed):
        return consumed[self.user, self.target].float().mean().item()


def window_counts(interaction, seq_field):
    """Each row's own items, counted in its input sequence: ``(items, counts)``, ``[rows, length]`` each (0 pads)."""
    seq = interaction[seq_field]
    counts = torch.zeros(len(seq), int(seq.max()) + 1).scatter_add_(1, seq, torch.ones(seq.shape))
    counts[:, 0] = 0
    n, items = counts.topk(seq.shape[1], dim=1)
    return items.masked_fill(n == 0, 0), n


def history_counts(interaction, train, user_field, item_field, time_field):
    """Each row's own items, counted over its user's training interactions before the row's time."""
    order = np.lexsort((train[time_field].numpy(), train[user_field].numpy()))
    users, items, times = (train[field].numpy()[order] for field in (user_field, item_field, time_field))
    first = np.searchsorted(users, np.arange(users.max() + 2))
    rows = []
    for user, time in zip(interaction[user_field].tolist(), interaction[time_field].tolist()):
        own = slice(first[user], first[user + 1])
        earlier = items[own][times[own] < time]
        rows.append(np.unique(earlier, return_counts=True))
    width = max(1, max(len(kept) for kept, _ in rows))
    padded = np.zeros((2, len(rows), width), dtype=np.int64)
    for index, (kept, n) in enumerate(rows):
        padded[0, index, :len(kept)], padded[1, index, :len(kept)] = kept, n
    return torch.from_numpy(padded[0]), torch.from_numpy(padded[1]).float()


class RepeatRows:
    """Rows as the repeat probe needs them: the cloud's score of the target and the log-sum-exp of its scores over
    the items outside the row's own items (both fixed), and per own item (``own``: ``(items, counts)``, 0 pads)
    its score (-inf for a pad) and ``log(1 + count)``; ``rest`` keeps, for ranking, every other item's score (only
    for the small evaluation splits)."""

    def __init__(self, backbone, interaction, own, user_field, target_field, keep_rest=False):
        items = backbone.item_embedding.weight.detach()
        z = representations(backbone, interaction)
        own_items, own_counts = own
        target = interaction[target_field]
        parts = []
        for start in range(0, len(target), CHUNK):
            part = slice(start, start + CHUNK)
            scores = z[part] @ items.T
            scores[:, 0] = -math.inf  # the padding item
            counts = torch.zeros_like(scores).scatter_(1, own_items[part], own_counts[part])
            counts[:, 0] = 0
            rest = scores.masked_fill(counts > 0, -math.inf)
            own_target = target[part][:, None]
            parts.append({
                "own_score": scores.gather(1, own_items[part]),
                "own_logn": torch.log1p(counts.gather(1, own_items[part])),
                "rest_lse": rest.logsumexp(dim=1),
                "target_score": scores.gather(1, own_target).squeeze(1),
                "target_logn": torch.log1p(counts.gather(1, own_target).squeeze(1)),
                **({"rest": rest} if keep_rest else {}),
            })
        for key in parts[0]:
            setattr(self, key, torch.cat([part[key] for part in parts]))
        self.user = interaction[user_field]

    def loss(self, weight):
        """Mean cross-entropy over the catalogue with ``weight[row] * log(1 + n)`` added to each own item."""
        own = self.own_score + weight[:, None] * self.own_logn
        lse = torch.cat([self.rest_lse[:, None], own], dim=1).logsumexp(dim=1)
        return (lse - self.target_score - weight * self.target_logn).mean()

    def ndcg(self, weight, users=None):
        """NDCG@10 as RecBole computes it (ties not counted against), over ``users`` (a bool mask) or all rows."""
        target = self.target_score + weight * self.target_logn
        own = self.own_score + weight[:, None] * self.own_logn
        rank = (self.rest > target[:, None]).sum(dim=1) + (own > target[:, None]).sum(dim=1)
        gain = torch.where(rank < TOP, 1 / torch.log2(rank.float() + 2), torch.zeros(()))
        return (gain if users is None else gain[users[self.user]]).mean().item()


def vector_probe(args, config, data, backbone, rows, budgets):
    """The free per-user vector added to the sequence representation (the default probe)."""
    train_data, valid_data, test_data = data
    items = backbone.item_embedding.weight.detach()
    user_field, item_field = config["USER_ID_FIELD"], config["ITEM_ID_FIELD"]

    dataset = train_data.dataset
    consumed = torch.zeros(dataset.user_num, dataset.item_num, dtype=torch.bool)
    consumed[dataset.inter_feat[user_field], dataset.inter_feat[item_field]] = True
    local = dataset.inter_feat[rows]
    local_z, local_user, local_target = representations(backbone, local), local[user_field], local[item_field]
    splits = {"valid": Split(backbone, valid_data, user_field, item_field),
              "test": Split(backbone, test_data, user_field, item_field)}

    shift = torch.zeros(dataset.user_num, items.shape[1], requires_grad=True)
    optimizer = torch.optim.Adam([shift], lr=args.shift_learning_rate)
    local_users = local_user.unique()

    def score(step):
        with torch.no_grad():
            record = {"step": step, "shift_norm": shift[local_users].norm(dim=1).mean().item()}
            for name, split in splits.items():
                plain, masked = split.ndcg(items, shift, consumed)
                record.update({f"{name}_ndcg@10": plain, f"{name}_ndcg@10_consumed_masked": masked})
        print(json.dumps(record), flush=True)
        return record

    history = [score(0)]
    for step in range(1, budgets[-1] + 1):
        optimizer.zero_grad()
        for start in range(0, len(local_target), CHUNK):
            part = slice(start, start + CHUNK)
            logits = (local_z[part] + shift[local_user[part]]) @ items.T
            (F.cross_entropy(logits, local_target[part], reduction="sum") / len(local_users)).backward()
        optimizer.step()
        if step in budgets:
            history.append(score(step))
    return {
        "users": len(local_users),
        "representation_norm": local_z.norm(dim=1).mean().item(),
        "consumed_share": {name: split.consumed_share(consumed) for name, split in splits.items()},
        "history": history,
    }


def repeat_probe(args, config, data, backbone, rows, budgets):
    """``--probe=repeat``: a shared weight of the rows' own-item counts, then a per-user one on top of it."""
    train_data, valid_data, test_data = data
    user_field, item_field = config["USER_ID_FIELD"], config["ITEM_ID_FIELD"]
    dataset = train_data.dataset
    if args.repeat_counts == "window":
        own = lambda interaction: window_counts(interaction, backbone.ITEM_SEQ)
    else:
        own = lambda interaction: history_counts(interaction, dataset.inter_feat, user_field, item_field,
                                                 config["TIME_FIELD"])
    local_rows = dataset.inter_feat[rows]
    local = RepeatRows(backbone, local_rows, own(local_rows), user_field, item_field)
    splits = {}
    for name, split in (("valid", valid_data), ("test", test_data)):
        split_rows = Split.rows(split)
        splits[name] = RepeatRows(backbone, split_rows, own(split_rows), user_field, item_field, keep_rest=True)
    interactions = torch.bincount(dataset.inter_feat[user_field], minlength=dataset.user_num)
    tested = splits["test"].user
    fifth = interactions[tested].float().quantile(0.2)
    least_active = torch.zeros(dataset.user_num, dtype=torch.bool)
    least_active[tested[interactions[tested] <= fifth]] = True

    shared = torch.zeros((), requires_grad=True)
    per_user = torch.zeros(dataset.user_num, requires_grad=True)
    fits = {"shared": (shared, lambda users: shared.expand(len(users))),
            "per_user": (per_user, lambda users: shared.detach() + per_user[users])}
    history = []
    for fit, (param, weight_of) in fits.items():
        optimizer = torch.optim.Adam([param], lr=args.repeat_learning_rate)

        def score(step):
            with torch.no_grad():
                record = {"fit": fit, "step": step, "shared_weight": shared.item()}
                for name, split in splits.items():
                    record[f"{name}_ndcg@10"] = split.ndcg(weight_of(split.user))
                record["test_ndcg@10_least_active"] = splits["test"].ndcg(weight_of(tested), least_active)
                if fit == "per_user":
                    record["per_user_weight_std"] = per_user[local.user.unique()].std().item()
            print(json.dumps(record), flush=True)
            return record

        history.append(score(0))
        for step in range(1, budgets[-1] + 1):
            optimizer.zero_grad()
            local.loss(weight_of(local.user)).backward()
            optimizer.step()
            if step in budgets:
                history.append(score(step))
    return {"least_active_fifth": {"max_interactions": fifth.item(), "users": int(least_active.sum())},
            "history": history}


PROBES = {"vector": vector_probe, "repeat": repeat_probe}


def main():
    parser = round0.parser_for(__doc__, "static")
    parser.add_argument("--probe", default="vector", choices=tuple(PROBES))
    parser.add_argument("--steps", default="5,10,20,50,100,200", help="comma-separated step budgets to score at")
    parser.add_argument("--shift_learning_rate", type=float, default=0.01)
    parser.add_argument("--repeat_learning_rate", type=float, default=0.05)
    parser.add_argument("--repeat_counts", default="window", choices=("window", "history"),
                        help="repeat probe: count own items in the row's input sequence, or over all the user's "
                        "training interactions before the row")
    args, config, (train_data, valid_data, test_data), model, _ = round0.load(parser)
    budgets = sorted(int(step) for step in args.steps.split(","))
    model.eval()
    backbone = model.backbone
    if not hasattr(backbone, "item_embedding"):
        parser.error(f"--backbone: [{args.backbone}] does not score items against an item_embedding table")
    rows = torch.as_tensor(RoundSchedule(config, train_data).local_rows(1), dtype=torch.long)
    report = {"dataset": args.dataset, "backbone": args.backbone, "protocol": args.protocol, "seed": args.seed,
              "probe": args.probe, "local_rows": len(rows),
              **PROBES[args.probe](args, config, (train_data, valid_data, test_data), backbone, rows, budgets)}
    print(json.dumps({key: value for key, value in report.items() if key != "history"}))
    if args.json:
        write_result_file(args.json, report)


if __name__ == "__main__":
    main()
