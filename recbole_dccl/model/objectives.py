"""What a device minimises and what MoMoDistill matches, per backbone family.

Each objective turns a batch into logits with the backbone's own scoring method, gives the per-row data loss
on them, and the per-row distillation term ``tau^2 * KL(teacher || student)`` of MoMoDistill (paper eq. 5).
Per-row values let the device phase average each user's loss over that user's rows only.
"""

import torch.nn.functional as F


class NextItemObjective:
    """Sequential backbones: next-item prediction, softmax over the whole catalogue.

    The logits are the backbone's ``full_sort_predict`` scores, which for CE-trained sequential models
    (SASRec, GRU4Rec, NARM, ...) are exactly the logits of their training loss.
    """

    def __init__(self, backbone):
        self.backbone = backbone
        self.target_field = backbone.POS_ITEM_ID

    def logits(self, interaction):
        # interaction.length rather than len(): len() would fix the batch size of an exported program.
        return self.backbone.full_sort_predict(interaction).view(interaction.length, -1)

    def loss(self, logits, interaction):
        return F.cross_entropy(logits, interaction[self.target_field], reduction="none")

    @staticmethod
    def distill(student_logits, teacher_logits, temperature):
        teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
        student = F.log_softmax(student_logits / temperature, dim=-1)
        kl = (teacher.exp() * (teacher - student)).sum(dim=-1)
        return kl * temperature**2
