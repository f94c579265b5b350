"""The auxiliary encoder g of MoMoDistill step 2: what the cloud knows of a user -> a metapatch.

Inputs: the user's profile (every token and float field of the ``.user`` file, when there is one), a summary of
the user's data (mean embedding of the user's most recent items and the log of how many there are) and the
metapatch the device uploaded last. Its output layer starts at zero, so before step 2 has run every device
starts from the cloud model.
"""

import torch
from recbole.utils import FeatureType
from torch import nn


class AuxiliaryEncoder(nn.Module):
    def __init__(self, dataset, metapatch_dim, embedding_size, hidden_size):
        super().__init__()
        profile = dataset.get_user_feature()
        uid_field = dataset.uid_field
        self.token_fields = [f for f in profile.columns if f != uid_field and dataset.field2type[f] == FeatureType.TOKEN]
        self.float_fields = [f for f in profile.columns if dataset.field2type[f] == FeatureType.FLOAT]
        for field in self.token_fields + self.float_fields:
            self.register_buffer(f"profile_{field}", profile[field].clone(), persistent=False)
        self.token_embeddings = nn.ModuleList(
            nn.Embedding(dataset.num(field), embedding_size) for field in self.token_fields
        )
        self.item_embedding = nn.Embedding(dataset.item_num, embedding_size, padding_idx=0)
        inputs = embedding_size * (len(self.token_fields) + 1) + len(self.float_fields) + 1 + metapatch_dim
        self.mlp = nn.Sequential(nn.Linear(inputs, hidden_size), nn.Tanh(), nn.Linear(hidden_size, metapatch_dim))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    @property
    def has_profile(self):
        return bool(self.token_fields or self.float_fields)

    def forward(self, users, history, metapatch):
        """``users`` ``[B]``, ``history`` ``[B, H]`` item ids (0 pads), ``metapatch`` ``[B, k]`` -> ``[B, k]``."""
        features = [emb(getattr(self, f"profile_{f}")[users]) for f, emb in zip(self.token_fields, self.token_embeddings)]
        features += [getattr(self, f"profile_{f}")[users].float().unsqueeze(-1) for f in self.float_fields]
        mask = (history > 0).float().unsqueeze(-1)
        count = mask.sum(dim=1)
        features.append((self.item_embedding(history) * mask).sum(dim=1) / count.clamp(min=1))
        features.append(torch.log1p(count))
        features.append(metapatch)
        return self.mlp(torch.cat(features, dim=-1))
