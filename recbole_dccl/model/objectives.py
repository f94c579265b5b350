"""What a device minimises and what MoMoDistill matches, per backbone family.

Each objective turns a batch into logits with the backbone's own scoring method, gives the per-row data loss
on them, and the per-row distillation term ``tau^2 * KL(teacher || student)`` of MoMoDistill (paper eq. 5).
Per-row values let the device phase average each user's loss over that user's rows only.
"""

import torch
import torch.nn.functional as F
from torch import nn


PROBABILITY_FLOOR = 1e-8  # added before the log, as RecBole's RepeatNet does in its own loss


def scores_are_probabilities(backbone):
    """Whether the backbone's scores are probabilities: RecBole trains such a model by NLL on their log
    (``loss_fct = F.nll_loss``; RepeatNet), every other sequential model by CE on its scores."""
    return getattr(backbone, "loss_fct", None) is F.nll_loss


class NextItemObjective:
    """Sequential backbones: next-item prediction, softmax over the whole catalogue.

    The logits are the backbone's ``full_sort_predict`` scores, which for CE-trained sequential models
    (SASRec, GRU4Rec, NARM, ...) are exactly the logits of their training loss; a backbone whose scores are
    probabilities (RepeatNet) gives their log, whose softmax is those probabilities again, so the loss is its own
    NLL and MoMoDistill's KL compares its distributions.
    """

    OUTPUT = "scores over all items, [batch, n_items]"  # the logits, as an exported device model describes them

    def __init__(self, backbone, config):
        self.backbone = backbone
        self.target_field = backbone.POS_ITEM_ID  # the field the loss compares the logits with
        self.log_of_scores = scores_are_probabilities(backbone)

    def logits(self, interaction):
        # interaction.length rather than len(): len() would fix the batch size of an exported program.
        scores = self.backbone.full_sort_predict(interaction).view(interaction.length, -1)
        return (scores + PROBABILITY_FLOOR).log() if self.log_of_scores else scores

    def prediction(self, logits, interaction):
        """The score of each row's own item (``predict``), ranked as the backbone's scores are."""
        return logits.gather(1, interaction[self.backbone.ITEM_ID].unsqueeze(1)).squeeze(1)

    def loss(self, logits, interaction):
        return F.cross_entropy(logits, interaction[self.target_field], reduction="none")

    @staticmethod
    def distill(student_logits, teacher_logits, temperature):
        teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
        student = F.log_softmax(student_logits / temperature, dim=-1)
        kl = (teacher.exp() * (teacher - student)).sum(dim=-1)
        return kl * temperature**2


class BinaryObjective:
    """CTR backbones: the probability that a row's label (``LABEL_FIELD``, e.g. from RecBole's ``threshold``) is 1.

    The logit is the input of the backbone's ``sigmoid`` module while it runs ``predict``: RecBole's CTR models
    all score with ``self.sigmoid(logit)``, some in ``predict`` (DeepFM, DIN, ...), some in ``forward`` (DCNV2),
    so this one rule reads the logit of every one of them, before any sigmoid. The distillation term is the KL
    between the teacher's and the student's Bernoulli outputs at temperature ``tau``.
    """

    OUTPUT = "the logit of each row, [batch] (its sigmoid is the predicted probability)"

    def __init__(self, backbone, config):
        self.backbone = backbone
        self.target_field = config["LABEL_FIELD"]
        self.sigmoid = getattr(backbone, "sigmoid", None)
        if not isinstance(self.sigmoid, nn.Sigmoid):
            raise ValueError(
                f"backbone: [{type(backbone).__name__}] has no nn.Sigmoid module named 'sigmoid' producing its "
                "predictions, which is where DCCL reads a CTR model's logit."
            )

    def logits(self, interaction):
        captured = []
        handle = self.sigmoid.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
        try:
            self.backbone.predict(interaction)
        finally:
            handle.remove()
        return captured[-1].reshape(interaction.length)  # not len(): see NextItemObjective.logits

    @staticmethod
    def prediction(logits, interaction):
        """The predicted probability of each row (``predict``)."""
        return torch.sigmoid(logits)

    def loss(self, logits, interaction):
        return F.binary_cross_entropy_with_logits(logits, interaction[self.target_field].float(), reduction="none")

    @staticmethod
    def distill(student_logits, teacher_logits, temperature):
        teacher, student = teacher_logits / temperature, student_logits / temperature
        teacher_p = torch.sigmoid(teacher)
        kl = teacher_p * (F.logsigmoid(teacher) - F.logsigmoid(student)) + (1 - teacher_p) * (
            F.logsigmoid(-teacher) - F.logsigmoid(-student)
        )
        return kl * temperature**2
