"""Model and trainer look-up: ours first, RecBole's as the fallback (as RecBole-GNN does)."""

from recbole.trainer import Trainer
from recbole.utils import get_trainer as recbole_get_trainer

import recbole_dccl.trainer
from recbole_dccl.distributed import DistributedTrainerMixin
from recbole_dccl.evaluation import UserGroupEvaluationMixin
from recbole_dccl.model.dccl import DCCL
from recbole_dccl.model.frequency import Frequency
from recbole_dccl.model.lookup import recbole_model_class
from recbole_dccl.trainer.checkpoint import SafeCheckpointMixin
from recbole_dccl.trainer.resume import ResumableFitMixin

PLUGIN_MODELS = {"DCCL": DCCL, "Frequency": Frequency}


def get_model(model_name):
    """Return the model class: ``DCCL`` and the ``Frequency`` baselines from this plugin, anything else from RecBole."""
    if model_name in PLUGIN_MODELS:
        return PLUGIN_MODELS[model_name]
    return recbole_model_class(model_name, "model", f"one of {list(PLUGIN_MODELS)} or the name of a RecBole model, e.g. SASRec")


def get_trainer(model_type, model_name):
    """Return the trainer class: ``DCCLTrainer`` for DCCL; for RecBole models their own trainer, with per-group
    metrics (:mod:`recbole_dccl.evaluation`), checkpoints that ``torch.load(weights_only=True)`` reads
    (:mod:`recbole_dccl.trainer.checkpoint`), on one process or several (:mod:`recbole_dccl.distributed`), and, where
    they train with ``Trainer``'s own ``fit`` (every sequential and CTR model), a run state after every evaluated
    epoch that ``resume`` goes on from (:mod:`recbole_dccl.trainer.resume`)."""
    trainer = getattr(recbole_dccl.trainer, model_name + "Trainer", None)
    if trainer is not None:
        return trainer
    trainer = recbole_get_trainer(model_type, model_name)
    resumable = (ResumableFitMixin,) if issubclass(trainer, Trainer) and trainer.fit is Trainer.fit else ()
    mixins = (DistributedTrainerMixin, UserGroupEvaluationMixin, *resumable, SafeCheckpointMixin)
    return type(trainer.__name__, (*mixins, trainer), {})
