"""The RecBole model families DCCL wraps: what a device learns to predict and where its patches go by default.

- **sequential** (RecBole's ``ModelType.SEQUENTIAL`` next-item models): softmax over the catalogue; default patch
  site ``backbone``, the backbone's own output, which is the sequence representation it scores items with. Where
  that output is already a distribution over the items (RepeatNet), the default sites are the backbone's item
  embedding tables instead: where it reads the sequence, before anything that turns it into probabilities.
- **context** (CTR: RecBole's ``ModelType.CONTEXT`` models, plus DIN and DIEN, which RecBole files under
  sequential but trains on labels, and which its ``Config`` singles out by name the same way): the probability
  of a positive label; default patch sites: every hidden layer (each ``nn.Linear``) of each MLP (RecBole's
  ``MLPLayers``) that is a direct part of the backbone, i.e. its prediction MLP and not, for example, DIN's
  attention MLP.

Each family also names its quick-start YAML in ``properties/quick_start_config/``, applied to DCCL's backbone
and to plain RecBole models of the family alike, and the CTR family a second one for interactions without labels
(implicit data: sampled negatives, sampled ranking evaluation).
"""

from dataclasses import dataclass

from recbole.model.layers import MLPLayers
from recbole.utils import ModelType
from torch import nn

from recbole_dccl.model.objectives import BinaryObjective, NextItemObjective, scores_are_probabilities

SEQUENTIAL_CTR_MODELS = ("DIN", "DIEN")


def no_default_sites(backbone, lacks):
    """The error for a backbone without the modules its family patches by default (``lacks`` says which)."""
    names = ", ".join(["backbone"] + [f"backbone.{name}" for name, _ in backbone.named_modules() if name])
    return ValueError(
        f"patch_sites: {type(backbone).__name__} has no {lacks} DCCL patches by default; set patch_sites to some "
        f"of its modules. Valid names: {names}"
    )


def sequence_sites(backbone):
    if not scores_are_probabilities(backbone):
        return ["backbone"]
    sites = [
        f"backbone.{name}"
        for name, child in backbone.named_children()
        if isinstance(child, nn.Embedding) and child.num_embeddings == backbone.n_items
    ]
    if not sites:
        raise no_default_sites(backbone, "item embedding table (an nn.Embedding with one row per item), which")
    return sites


def mlp_hidden_layers(backbone):
    """The hidden ``nn.Linear`` layers of the backbone's own MLPs, by their site names. A final layer of width 1
    (xDeepFM's MLP ends in its score) is an output, not a hidden layer."""
    sites = [
        f"backbone.{name}.{inner}"
        for name, child in backbone.named_children()
        if isinstance(child, MLPLayers)
        for inner, module in child.named_modules()
        if isinstance(module, nn.Linear) and module.out_features > 1
    ]
    if not sites:
        raise no_default_sites(backbone, "MLP (RecBole's MLPLayers) whose hidden layers")
    return sites


@dataclass(frozen=True)
class Family:
    name: str
    objective: type
    default_sites: object  # backbone -> site names
    quick_start_yaml: str
    implicit_quick_start_yaml: str = None  # on interactions without labels (only a labelled family needs one)


FAMILIES = {
    "sequential": Family("sequential", NextItemObjective, sequence_sites, "sequential.yaml"),
    "context": Family("context", BinaryObjective, mlp_hidden_layers, "context.yaml", "context_implicit.yaml"),
}


def family_of(model_class):
    """The family of a RecBole model class, or ``None`` when DCCL does not wrap its kind of model."""
    if model_class.type == ModelType.CONTEXT or model_class.__name__ in SEQUENTIAL_CTR_MODELS:
        return FAMILIES["context"]
    if model_class.type == ModelType.SEQUENTIAL:
        return FAMILIES["sequential"]
    return None
