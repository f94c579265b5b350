"""What round 1's device phase does to the device view's top 10, on a round-0 cloud model (a ``cloud_checkpoint``
written by ``benchmarks/quality.py``):

    python -m experiments.device_topk --backbone=GRU4Rec --protocol=incremental --seed=2020 \\
      --cloud_checkpoint=results/q/cloud/GRU4Rec-incremental-seed2020.pth --MAX_ITEM_LIST_LENGTH=20 ... --json=out.json

Runs the device phase with the run's settings, then scores both views on valid and reports, overall and for the
devices that adopted their patch: NDCG@10 and Hit@10 as RecBole computes them for sequential models (items the
user has consumed may be recommended), the same with the user's consumed training items masked out, and how many
consumed items (all of them, and the device's fresh local ones) sit in the top 10. The extra ``--key=value``
arguments must match the checkpoint's round-0 settings, as for any run that loads it.
"""

import json
import math

import numpy as np
import torch

from experiments import round0
from recbole_dccl.files import write_result_file
from recbole_dccl.rounds import RoundSchedule

TOP = 10


def items_by_user(dataset, rows):
    users = dataset.inter_feat[dataset.uid_field].numpy()[rows]
    items = dataset.inter_feat[dataset.iid_field].numpy()[rows]
    grouped = {}
    for user, item in zip(users, items):
        grouped.setdefault(int(user), []).append(int(item))
    return grouped


def ndcg_hit(scores, target):
    top = scores.topk(TOP).indices.tolist()
    if target not in top:
        return 0.0, 0.0, top
    return 1 / math.log2(top.index(target) + 2), 1.0, top


def score_view(model, valid_data, item_field, consumed, fresh):
    """Per valid user: NDCG@10, Hit@10 (plain and with consumed items masked) and consumed/fresh items in the top 10."""
    per_user = {}
    for batch in valid_data:
        interaction = batch[0]
        with torch.no_grad():
            scores = model.full_sort_predict(interaction).view(len(interaction), -1)
        scores[:, 0] = -math.inf  # the padding item
        for user, target, row in zip(interaction[model.USER_ID].tolist(), interaction[item_field].tolist(), scores):
            seen = consumed.get(user, [])
            ndcg, hit, top = ndcg_hit(row, target)
            ndcg_masked, hit_masked, _ = ndcg_hit(row.index_fill(0, torch.as_tensor(seen, dtype=torch.long), -math.inf), target)
            per_user[user] = [ndcg, hit, ndcg_masked, hit_masked, len(set(top) & set(seen)), len(set(top) & set(fresh.get(user, [])))]
    return per_user


COLUMNS = ("ndcg@10", "hit@10", "ndcg@10_consumed_masked", "hit@10_consumed_masked", "consumed_in_top10", "fresh_in_top10")


def main():
    args, config, (train_data, valid_data, _), model, trainer = round0.load(round0.parser_for(__doc__, "incremental"))

    schedule = RoundSchedule(config, train_data)
    trainer.device_phase(1, trainer.start_round(schedule, 1))
    rows = schedule.device_rows(1)
    model.eval()
    consumed = items_by_user(train_data.dataset, np.arange(len(train_data.dataset)))
    fresh = items_by_user(train_data.dataset, rows) if args.protocol == "incremental" else {}
    adopted = set(torch.nonzero((model.metapatch != 0).any(dim=1)).squeeze(1).tolist())

    report = {"backbone": args.backbone, "protocol": args.protocol, "seed": args.seed, "adopters": len(adopted)}
    for view in ("cloud", "device"):
        model.view = view
        per_user = score_view(model, valid_data, config["ITEM_ID_FIELD"], consumed, fresh)
        values = np.array(list(per_user.values()))
        is_adopter = np.array([user in adopted for user in per_user])
        report[view] = {
            who: dict(zip(COLUMNS, values[mask].mean(axis=0).tolist()))
            for who, mask in (("all", np.ones(len(values), dtype=bool)), ("adopters", is_adopter))
        }
    print(json.dumps(report))
    if args.json:
        write_result_file(args.json, report)


if __name__ == "__main__":
    main()
