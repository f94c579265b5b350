"""How much can any per-user change of the sequence representation gain on a dataset? A probe to run before asking
DCCL's device phase to find it, on a round-0 cloud model (a ``cloud_checkpoint`` written by ``benchmarks/quality.py``):

    python benchmarks/personal_headroom.py --backbone=GRU4Rec --protocol=static --seed=2020 \\
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
"""

import json
import math

import torch
from torch.nn import functional as F

import round0
from recbole_dccl.data import RoundSchedule
from recbole_dccl.quick_start import write_result_file

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
        batches = [batch[0] for batch in data]
        self.z = torch.cat([representations(backbone, batch) for batch in batches])
        self.user = torch.cat([batch[user_field] for batch in batches])
        self.target = torch.cat([batch[item_field] for batch in batches])

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


def main():
    parser = round0.parser_for(__doc__, "static")
    parser.add_argument("--steps", default="5,10,20,50,100,200", help="comma-separated step budgets to score at")
    parser.add_argument("--shift_learning_rate", type=float, default=0.01)
    args, config, (train_data, valid_data, test_data), model, _ = round0.load(parser)
    budgets = sorted(int(step) for step in args.steps.split(","))
    model.eval()
    backbone = model.backbone
    if not hasattr(backbone, "item_embedding"):
        parser.error(f"--backbone: [{args.backbone}] does not score items against an item_embedding table")
    items = backbone.item_embedding.weight.detach()
    user_field, item_field = config["USER_ID_FIELD"], config["ITEM_ID_FIELD"]

    dataset = train_data.dataset
    consumed = torch.zeros(dataset.user_num, dataset.item_num, dtype=torch.bool)
    consumed[dataset.inter_feat[user_field], dataset.inter_feat[item_field]] = True
    rows = torch.as_tensor(RoundSchedule(config, train_data).local_rows(1), dtype=torch.long)
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

    report = {
        "dataset": args.dataset, "backbone": args.backbone, "protocol": args.protocol, "seed": args.seed,
        "local_rows": len(rows), "users": len(local_users),
        "representation_norm": local_z.norm(dim=1).mean().item(),
        "consumed_share": {name: split.consumed_share(consumed) for name, split in splits.items()},
        "history": history,
    }
    print(json.dumps({key: value for key, value in report.items() if key != "history"}))
    if args.json:
        write_result_file(args.json, report)


if __name__ == "__main__":
    main()
