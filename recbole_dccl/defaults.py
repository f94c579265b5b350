"""Where the plugin's YAML defaults live, and DCCL's defaults as written there."""

import os

import yaml

from recbole_dccl.negatives import NO_NEGATIVES

# The YAML defaults live in the top-level properties/; recbole_dccl/properties links to it in a checkout, and an
# install copies it there, so the package reads them at one path either way.
PROPERTIES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "properties")


def dccl_defaults():
    """The defaults of every DCCL key, as written in ``properties/model/DCCL.yaml``."""
    with open(os.path.join(PROPERTIES_DIR, "model", "DCCL.yaml")) as file:
        return yaml.safe_load(file)


def identity_defaults():
    """The value each setting had in runs from before it joined the identity of a cloud checkpoint or run state:
    DCCL's defaults, and no training negatives (DCCL's rounds could not train with sampled ones before)."""
    return {**dccl_defaults(), "train_neg_sample_args": NO_NEGATIVES}
