import pytest
import torch
from torch.nn import functional as F

from recbole_dccl.model.objectives import BinaryObjective, NextItemObjective
from tests.helpers import build


def test_binary_logits_are_what_the_backbone_feeds_its_sigmoid(ctr_config):
    config, (_, _, test_data), model, _ = build(ctr_config)
    model.eval()
    batch = next(iter(test_data))[0]
    logits = model(batch)
    assert logits.shape == (len(batch),)
    assert torch.allclose(torch.sigmoid(logits), model.backbone.predict(batch))
    assert torch.allclose(logits, model.backbone.forward(batch))  # DeepFM's forward returns its logit
    label = batch[config["LABEL_FIELD"]]
    assert torch.allclose(model.objective.loss(logits, batch).mean(), model.backbone.loss(logits, label))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_bernoulli_distillation_is_tau_squared_kl(temperature):
    student, teacher = torch.randn(50), torch.randn(50)
    p, q = torch.sigmoid(teacher / temperature), torch.sigmoid(student / temperature)
    expected = p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))
    kl = BinaryObjective.distill(student, teacher, temperature)
    assert torch.allclose(kl, expected * temperature**2, atol=1e-6)
    assert torch.allclose(BinaryObjective.distill(teacher, teacher, temperature), torch.zeros(50), atol=1e-7)


def test_softmax_distillation_is_tau_squared_kl():
    student, teacher = torch.randn(4, 10), torch.randn(4, 10)
    expected = F.kl_div(F.log_softmax(student / 2, -1), F.log_softmax(teacher / 2, -1), log_target=True, reduction="none")
    assert torch.allclose(NextItemObjective.distill(student, teacher, 2.0), expected.sum(-1) * 4, atol=1e-6)


def test_ctr_backbone_without_a_sigmoid_module_is_refused():
    class ScoresWithTorchSigmoid(torch.nn.Module):
        def predict(self, interaction):
            return torch.sigmoid(interaction["x"])

    with pytest.raises(ValueError, match=r"backbone: \[ScoresWithTorchSigmoid\] has no nn.Sigmoid module named 'sigmoid'"):
        BinaryObjective(ScoresWithTorchSigmoid(), {"LABEL_FIELD": "label"})


def test_probability_backbone_gives_log_probabilities_and_is_patched_at_its_item_embedding(tiny_config):
    """RepeatNet's scores are probabilities: DCCL's logits are their log, so its CE is RepeatNet's own NLL."""
    config, (_, _, test_data), model, _ = build({**tiny_config, "backbone": "RepeatNet", "joint_train": False})
    model.eval()
    batch = next(iter(test_data))[0]
    logits = model(batch)
    probabilities = model.backbone.full_sort_predict(batch)
    assert torch.allclose(F.softmax(logits, dim=-1), probabilities, atol=1e-6)
    assert torch.allclose(model.objective.loss(logits, batch).mean(), model.backbone.calculate_loss(batch), atol=1e-6)
    assert list(model.patches) == ["backbone__item_matrix"]
