"""RecBole ``Config`` that knows DCCL and its backbone.

For ``model: DCCL`` the configuration is layered as RecBole layers its own models, with the backbone standing
in for the model: RecBole's ``overall.yaml``, the backbone's YAML, the dataset YAML and the family quick-start
YAML, then ours (``properties/quick_start_config/<family>.yaml``, ``properties/model/DCCL.yaml``), then the
user's files, dict and command line. ``properties/overall.yaml`` applies to plain RecBole models too. ``MODEL_TYPE`` and ``MODEL_INPUT_TYPE`` are the backbone's, so RecBole's
datasets and dataloaders work unchanged; ``model`` stays ``DCCL`` so the trainer and checkpoints are ours.
"""

import os

import yaml
from recbole.config import Config
from recbole.utils import ModelType

from recbole_dccl.utils import PROPERTIES_DIR, get_model

FAMILY_YAML = {
    ModelType.SEQUENTIAL: "sequential.yaml",
}


def dccl_defaults():
    """The defaults of every DCCL key, as written in ``properties/model/DCCL.yaml``."""
    with open(os.path.join(PROPERTIES_DIR, "model", "DCCL.yaml")) as file:
        return yaml.safe_load(file)


class DCCLConfig(Config):
    """``Config`` for DCCL and, unchanged but for our family fixes, for any plain RecBole model."""

    def _get_model_and_dataset(self, model, dataset):
        self.backbone_class = None
        if isinstance(model, str) or model is None:
            name = model if model is not None else self.external_config_dict.get("model")
            if name is not None:
                model = get_model(name)
        return super()._get_model_and_dataset(model, dataset)

    def _load_internal_config_dict(self, model, model_class, dataset):
        if getattr(model_class, "is_dccl", False):
            backbone = self.external_config_dict.get("backbone", dccl_defaults()["backbone"])
            self.backbone_class = model_class.backbone_class_for(backbone)
            super()._load_internal_config_dict(backbone, self.backbone_class, dataset)
        else:
            super()._load_internal_config_dict(model, model_class, dataset)
        self._update_internal_config_dict(os.path.join(PROPERTIES_DIR, "overall.yaml"))
        family_yaml = FAMILY_YAML.get(self.internal_config_dict["MODEL_TYPE"])
        if family_yaml is not None:
            self._update_internal_config_dict(os.path.join(PROPERTIES_DIR, "quick_start_config", family_yaml))
        if self.backbone_class is not None:
            self._update_internal_config_dict(os.path.join(PROPERTIES_DIR, "model", "DCCL.yaml"))

    def _set_default_parameters(self):
        # RecBole derives MODEL_INPUT_TYPE from the model class; for DCCL that is the backbone's.
        model_class = self.model_class
        if self.backbone_class is not None:
            self.model_class = self.backbone_class
            self._load_user_profiles()
        try:
            super()._set_default_parameters()
        finally:
            self.model_class = model_class

    def _load_user_profiles(self):
        """DCCL's auxiliary encoder reads the ``.user`` profile file when the dataset has one."""
        load_col = self.final_config_dict.get("load_col")
        if isinstance(load_col, dict) and "user" not in load_col:
            self.final_config_dict["load_col"] = {**load_col, "user": "*"}
