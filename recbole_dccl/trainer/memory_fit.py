"""Choose the personal memory's shared weights (``device_memory``) at the start of a round's device phase.

On which rows: the round's rows (``RoundSchedule.device_rows``), the ones the cloud takes in after the devices
have personalised. In the incremental protocol the cloud model has not trained on them, so on them it predicts as
it will on what users do next; a row it has trained on it already predicts, the user's own items included, and
there the memory looks worthless. Measured on foursquare_nyc, GRU4Rec, seed 2020, device view valid NDCG@10 after
the device phase (cloud model 0.3956): weights trained per device on all of its rows 0.3959 (they stayed near
zero); started from 1 each and trained per device, 0.3993 (trained back down); 1 each, fixed, 0.4293. In the static
protocol the cloud has trained on every row, and the choice has only those.

By what: for a sequential model, the run's ``valid_metric`` where it is a top-K ranking metric (NDCG, Hit, Recall,
MRR, Precision @K) over the whole catalogue; else (CTR models, whose rows are scored one by one) the objective's
loss. Not the loss for ranking: the loss also counts how far the memory lowers the
probability of a target the user never had, which top-K ranking does not, and the two disagree: on the same seed the
weights of lowest validation cross-entropy (own 1.07, log-count -0.32, log-recent -0.22: 5.03 against the cloud's
5.07) scored NDCG@10 0.3849, below the cloud model, and weights 1, 1, 1 (cross-entropy 6.23) scored 0.4293.

How: every combination of :data:`GRID` for the three weights and :data:`GATES` for the gate (``memory_gate``;
else gate 0), under each user's current metapatch, on all of the round's rows at once; the best one (the first of
equals, so zero weights and gate 0 where nothing helps). Each row is first reduced to what the weights can change:
the logits of the user's own items, the target's logit, and the K highest logits of the other items (all a top-K
rank needs), or a CTR row's own logit. In a deployment each device would score the candidates on its new rows and
send their sums.
"""

import re

import torch

from recbole_dccl.model.frozen import frozen
from recbole_dccl.model.memory import FEATURES, ITEMS, VALUES, memory_offsets
from recbole_dccl.model.objectives import NextItemObjective

GRID = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)  # each weight's candidates (logits per unit of its feature)
GATES = (0.0, 0.5, 1.0, 2.0)  # the gate's: the memory scales with repeat_share ** gate
RANKING_METRICS = ("ndcg", "hit", "recall", "mrr", "precision")


def fit_memory(model, rows, valid_metric, chunk_size, device, gated=True):
    """Set ``model.memory.weights`` and ``gate`` to the best of the grid on ``rows`` (a RecBole dataset) by
    ``valid_metric`` (not ``gated``: gate 0); returns them as one vector (the weights, then the gate)."""
    memory = model.memory
    memory.weights.zero_()
    memory.gate.zero_()
    ranking = re.fullmatch(rf"({'|'.join(RANKING_METRICS)})@(\d+)", valid_metric.lower())
    ranking = ranking if isinstance(model.objective, NextItemObjective) else None  # CTR rows are scored one by one
    with frozen(model):
        chunks = [rows[start : start + chunk_size].to(device) for start in range(0, len(rows), chunk_size)]
        score = (RankedRows(model, chunks, ranking[1], int(ranking[2])) if ranking else LabelledRows(model, chunks))
        grids = [torch.tensor(GRID)] * len(FEATURES) + [torch.tensor(GATES if gated else GATES[:1])]
        candidates = torch.cartesian_prod(*grids).to(memory.weights)
        values = torch.stack([score(point[:-1], point[-1]) for point in candidates])
    best = candidates[int(torch.argmax(values))]  # the first of equals: all zeros first
    memory.weights.copy_(best[:-1])
    memory.gate.copy_(best[-1])
    return best


def base_logits(model, interaction):
    """The devices' logits under their current metapatches, with the memory's fields added and a zero memory."""
    model.memory.complete(interaction)
    return model(interaction, model.metapatch[interaction[model.USER_ID]])


class RankedRows:
    """Sequential rows reduced to what a top-``k`` ranking metric needs; ``rows(weights, gate)`` is the metric's
    mean."""

    def __init__(self, model, chunks, metric, k):
        self.metric, self.k = metric, k
        parts = [self.reduce(model, chunk) for chunk in chunks]
        width = max(part[0].shape[1] for part in parts)
        self.own, self.values, self.target_column, self.target_logit, self.others = (
            torch.cat([pad(part[index], width, fill) if fill is not None else part[index] for part in parts])
            for index, fill in enumerate((-torch.inf, 0.0, None, None, None))
        )

    @torch.no_grad()
    def reduce(self, model, interaction):
        logits = base_logits(model, interaction)
        logits[:, 0] = -torch.inf  # the padding item, which full-sort evaluation never ranks
        items, values, target = interaction[ITEMS], interaction[VALUES], interaction[model.objective.target_field]
        rows = torch.arange(len(target), device=logits.device)
        has = values[..., 0] > 0
        is_own = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, items, has)
        target_column = torch.where(is_own[rows, target], ((items == target[:, None]) & has).int().argmax(1), -1)
        target_logit = logits[rows, target]
        others = logits.masked_fill(is_own, -torch.inf)
        others[rows, target] = -torch.inf
        top = others.topk(min(self.k, others.shape[1]), dim=1).values
        return logits.gather(1, items).masked_fill(~has, -torch.inf), values, target_column, target_logit, top

    def __call__(self, weights, gate):
        own = self.own + memory_offsets(self.values, weights, gate)
        is_own = self.target_column >= 0
        target = torch.where(is_own, own.gather(1, self.target_column.clamp(min=0)[:, None]).squeeze(1), self.target_logit)
        rank = (own > target[:, None]).sum(1) + (self.others > target[:, None]).sum(1)
        hit = (rank < self.k).float()
        per_row = {
            "ndcg": hit / torch.log2(rank.float() + 2), "hit": hit, "recall": hit, "precision": hit / self.k,
            "mrr": hit / (rank.float() + 1),
        }[self.metric]
        return per_row.mean()


class LabelledRows:
    """CTR rows: each row's logit and memory fields; ``rows(weights, gate)`` is minus the mean loss."""

    def __init__(self, model, chunks):
        self.model = model
        with torch.no_grad():
            self.parts = [(base_logits(model, chunk), chunk) for chunk in chunks]

    def __call__(self, weights, gate):
        memory, objective = self.model.memory, self.model.objective
        losses = [objective.loss(memory.add(logits, chunk, weights, gate), chunk) for logits, chunk in self.parts]
        return -torch.cat(losses).mean()


def pad(tensor, width, value):
    """``tensor`` (``[B, L, ...]``) with columns of ``value`` up to ``width``."""
    padding = torch.full((tensor.shape[0], width - tensor.shape[1], *tensor.shape[2:]), value, dtype=tensor.dtype,
                         device=tensor.device)
    return torch.cat([tensor, padding], 1)
