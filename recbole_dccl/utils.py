"""Model and trainer look-up: ours first, RecBole's as the fallback (as RecBole-GNN does)."""

import importlib
import os

import recbole.model
from recbole.utils import get_model as recbole_get_model
from recbole.utils import get_trainer as recbole_get_trainer

from recbole_dccl.errors import InputError

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# Installed, the YAML defaults live in the package; in a source checkout, in the top-level properties/.
PROPERTIES_DIR = next(
    path
    for path in (os.path.join(_PACKAGE_DIR, "properties"), os.path.join(_PACKAGE_DIR, os.pardir, "properties"))
    if os.path.isfile(os.path.join(path, "model", "DCCL.yaml"))
)


PLUGIN_MODELS = {"DCCL": "recbole_dccl.model.dccl", "Frequency": "recbole_dccl.model.frequency"}


def get_model(model_name):
    """Return the model class: ``DCCL`` and the ``Frequency`` baselines from this plugin, anything else from RecBole."""
    if model_name in PLUGIN_MODELS:
        return getattr(importlib.import_module(PLUGIN_MODELS[model_name]), model_name)
    return recbole_model_class(model_name, "model", f"one of {list(PLUGIN_MODELS)} or the name of a RecBole model, e.g. SASRec")


def recbole_model_class(name, key, valid):
    """RecBole's class of model ``name``, read from config ``key``; ``valid`` says what the key accepts.

    RecBole's own look-up reports an unknown name as a missing ``lightgbm`` (it imports its optional-library
    package while searching), so we look for the model's module file first."""
    model_dir = recbole.model.__path__[0]
    packages = [entry.name for entry in os.scandir(model_dir) if entry.name.endswith("_recommender")]
    if not any(os.path.isfile(os.path.join(model_dir, package, name.lower() + ".py")) for package in packages):
        raise InputError(f"{key}: [{name}] is not a model RecBole has; it must be {valid}.")
    try:
        return recbole_get_model(name)
    except AttributeError:  # the module exists under the lower-case name, the class is spelt differently
        raise InputError(f"{key}: [{name}] is not a model RecBole has (names are case-sensitive); it must be {valid}.") from None


def get_trainer(model_type, model_name):
    """Return the trainer class: ``DCCLTrainer`` for DCCL; for RecBole models their own trainer, with per-group
    metrics (:mod:`recbole_dccl.evaluation`) and checkpoints that ``torch.load(weights_only=True)`` reads
    (:mod:`recbole_dccl.trainer.checkpoint`), on one process or several (:mod:`recbole_dccl.distributed`)."""
    from recbole_dccl.distributed import DistributedTrainerMixin
    from recbole_dccl.evaluation import UserGroupEvaluationMixin
    from recbole_dccl.trainer.checkpoint import SafeCheckpointMixin

    module = importlib.import_module("recbole_dccl.trainer")
    trainer = getattr(module, model_name + "Trainer", None)
    if trainer is not None:
        return trainer
    trainer = recbole_get_trainer(model_type, model_name)
    return type(trainer.__name__, (DistributedTrainerMixin, UserGroupEvaluationMixin, SafeCheckpointMixin, trainer), {})
