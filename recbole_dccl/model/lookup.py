"""RecBole's model classes by name, with a clear error for a name RecBole does not have."""

import os

import recbole.model
from recbole.utils import get_model as recbole_get_model

from recbole_dccl.errors import InputError


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
