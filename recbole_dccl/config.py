"""RecBole ``Config`` that knows DCCL and its backbone.

For ``model: DCCL`` the configuration is layered as RecBole layers its own models, with the backbone standing
in for the model: RecBole's ``overall.yaml``, the backbone's YAML, the dataset YAML and the family quick-start
YAML, then ours (``properties/quick_start_config/<family>.yaml``, ``properties/model/DCCL.yaml``), then the
user's files, dict and command line; ``properties/overall.yaml`` applies to plain RecBole models too. A CTR model
on interactions without labels gets the family's implicit-data quick-start YAML instead (:func:`is_implicit`).
``MODEL_TYPE`` and ``MODEL_INPUT_TYPE`` are the backbone's, so RecBole's datasets and dataloaders work unchanged;
``model`` stays ``DCCL`` so the trainer and checkpoints are ours.
"""

import os

import recbole
import yaml
from recbole.config import Config
from recbole.utils import ModelType

from dccl_device.settings import RULES as DEVICE_RULES, DeviceSettings
from recbole_dccl.defaults import PROPERTIES_DIR, dccl_defaults
from recbole_dccl.distributed import init_process_group
from recbole_dccl.errors import InputError
from recbole_dccl.fleet import check_privacy_extra
from recbole_dccl.model.families import family_of
from recbole_dccl.rounds import PROTOCOLS
from recbole_dccl.utils import get_model


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
        family = family_of(self.backbone_class or model_class)
        if family is not None:
            self._update_internal_config_dict(self._quick_start_yaml(family, dataset))
        plugin_yaml = os.path.join(PROPERTIES_DIR, "model", f"{model_class.__name__}.yaml")
        if os.path.isfile(plugin_yaml):  # this plugin's models: DCCL, Frequency
            self._update_internal_config_dict(plugin_yaml)

    def _quick_start_yaml(self, family, dataset):
        """The family's quick-start YAML, or its implicit-data one on interactions without labels."""
        folder = os.path.join(PROPERTIES_DIR, "quick_start_config")
        labelled = os.path.join(folder, family.quick_start_yaml)
        if family.implicit_quick_start_yaml is None:
            return labelled
        settings = {**self.internal_config_dict, **self.external_config_dict}
        if "threshold" not in self.external_config_dict:
            with open(labelled, encoding="utf-8") as file:
                settings["threshold"] = (yaml.safe_load(file) or {}).get("threshold")
        implicit = is_implicit(settings, dataset_folder(settings, dataset), dataset)
        return os.path.join(folder, family.implicit_quick_start_yaml) if implicit else labelled

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
        if self.backbone_class is not None:
            validate_dccl_settings(self.final_config_dict)
            validate_data_fields(self.final_config_dict)
        else:
            validate_settings(self.final_config_dict, PLAIN_MODEL_KEYS)

    def _init_device(self):
        if "local_rank" not in self.final_config_dict:
            super()._init_device()
        else:
            init_process_group(self.final_config_dict)  # RecBole's, with gloo on CPU

    def _load_user_profiles(self):
        """DCCL's auxiliary encoder reads the ``.user`` profile file when the dataset has one."""
        load_col = self.final_config_dict.get("load_col")
        if isinstance(load_col, dict) and "user" not in load_col:
            self.final_config_dict["load_col"] = {**load_col, "user": "*"}


# key -> (test, what is valid)
_POSITIVE_INT = (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive integer")
_NON_NEGATIVE_INT = (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0")
_NUMBER = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
_POSITIVE = (lambda v: _NUMBER(v) and v > 0, "a number > 0")
_NON_NEGATIVE = (lambda v: _NUMBER(v) and v >= 0, "a number >= 0")
_NO_DISTRIBUTION = (None, "none", "None")
SETTING_RULES = {
    # RecBole's own keys, as round 0 uses them
    "epochs": _POSITIVE_INT,
    # ... and as DCCL's rounds draw their fixed negatives (recbole_dccl/negatives.py)
    "train_neg_sample_args": (
        lambda v: not isinstance(v, dict) or v.get("distribution") in _NO_DISTRIBUTION or (
            v["distribution"] == "uniform" and not v.get("dynamic") and _POSITIVE_INT[0](v.get("sample_num"))
        ),
        "None or {distribution: uniform, sample_num: a positive integer, dynamic: False}: DCCL's rounds draw fixed "
        "uniform negatives per device (docs/method.md)",
    ),
    "learning_rate": _POSITIVE,
    "train_batch_size": _POSITIVE_INT,
    # DCCL's keys (properties/model/DCCL.yaml); a phase's epochs may be 0 to leave the phase out
    "protocol": (lambda v: v in PROTOCOLS, f"one of {list(PROTOCOLS)}"),
    "device_method": (lambda v: v in ("none", "patch", "metapatch"), "one of ['none', 'patch', 'metapatch']"),
    "device_memory": (lambda v: isinstance(v, bool), "True or False"),
    "memory_gate": (lambda v: isinstance(v, bool), "True or False"),
    "cloud_method": (lambda v: v in ("data", "momodistill"), "one of ['data', 'momodistill']"),
    "rounds": _POSITIVE_INT,
    "fresh_interactions": _POSITIVE_INT,
    "cold_start_ratio": (lambda v: _NUMBER(v) and 0 <= v < 1, "a number in [0, 1)"),
    "metapatch_dim": _POSITIVE_INT,
    "patch_rank": _POSITIVE_INT,
    "patch_sites": (
        lambda v: v is None or isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
        "None, a module name (or regex) or a list of them",
    ),
    "device_data": (lambda v: v in ("fresh", "all"), "'fresh' or 'all'"),
    # device_epochs, _learning_rate, _batch_size, _valid_size, _select, _l2, _chunk_size, _cache_mb: DeviceSettings
    "cloud_epochs": _NON_NEGATIVE_INT,
    "distill_weight": _NON_NEGATIVE,
    "distill_temperature": _POSITIVE,
    "shared_epochs": _NON_NEGATIVE_INT,
    "shared_learning_rate": _POSITIVE,
    "shared_ce_weight": _NON_NEGATIVE,
    "encoder_embedding_size": _POSITIVE_INT,
    "encoder_hidden_size": _POSITIVE_INT,
    "resume": (lambda v: v is None or (isinstance(v, str) and os.path.exists(v)), "None or an existing run-state file or folder"),
    # the fleet (recbole_dccl/fleet.py); upload_dtype: DeviceSettings
    "device_participation": (lambda v: _NUMBER(v) and 0 < v <= 1, "a number in (0, 1]"),
    "device_dropout": (lambda v: _NUMBER(v) and 0 <= v < 1, "a number in [0, 1)"),
    "device_availability": (
        lambda v: v is None or (isinstance(v, str) and os.path.isfile(v)), "None or an existing trace file"
    ),
    "stale_teachers": (lambda v: isinstance(v, bool), "True or False"),
    "dp_clip": (lambda v: v is None or (_NUMBER(v) and v > 0), "None or a number > 0"),
    "dp_noise_multiplier": _NON_NEGATIVE,
    "dp_delta": (lambda v: _NUMBER(v) and 0 < v < 1, "a number in (0, 1)"),
}


def setting_rule(key):
    """``(test, what is valid)`` of a DCCL key (of the device phase's keys, :class:`DeviceSettings`'s), or None."""
    if key in DEVICE_RULES:
        _, is_valid, valid = DEVICE_RULES[key]
        return is_valid, valid
    return SETTING_RULES.get(key)


# The keys of SETTING_RULES that plain RecBole models read too (properties/overall.yaml).
PLAIN_MODEL_KEYS = ("resume",)


def validate_settings(settings, keys):
    """Refuse a bad value of any of ``keys`` (of :data:`SETTING_RULES`), naming the key, the value and what is valid."""
    for key in keys:
        is_valid, valid = SETTING_RULES[key]
        if not is_valid(settings.get(key)):
            raise InputError(f"{key}: [{settings.get(key)!r}] is not valid; it must be {valid}.")


def validate_dccl_settings(settings):
    """Refuse bad DCCL settings before any data is loaded, naming the key, the value and what is valid."""
    validate_settings(settings, SETTING_RULES)
    try:
        DeviceSettings.from_config(settings)
    except ValueError as error:
        raise InputError(str(error)) from None
    if settings.get("dp_noise_multiplier"):
        if settings.get("dp_clip") is None:
            raise InputError(f"dp_noise_multiplier: [{settings['dp_noise_multiplier']!r}] needs dp_clip, the norm the "
                             "noise is scaled to; set dp_clip to a number > 0.")
        check_privacy_extra()
    if settings.get("result_file"):
        folder = os.path.dirname(os.path.abspath(settings["result_file"]))
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as error:
            raise InputError(f"result_file: [{settings['result_file']}] cannot be written: {error}") from None
        if not os.access(folder, os.W_OK):
            raise InputError(f"result_file: [{settings['result_file']}] cannot be written: {folder} is not writable")


def dataset_folder(settings, dataset):
    """Where RecBole reads ``dataset`` from (its ``data_path`` once the config is final)."""
    if dataset == "ml-100k":  # RecBole's bundled copy, whatever data_path says
        return os.path.join(os.path.dirname(os.path.abspath(recbole.__file__)), "dataset_example", dataset)
    return os.path.join(settings["data_path"], dataset)


def inter_columns(settings, folder, dataset):
    """``(path, columns)``: the ``.inter`` file of ``dataset`` in ``folder`` and the columns RecBole loads from it
    (its header, less what ``load_col``/``unload_col`` leave out); columns are ``None`` when there is no such file
    (yet: RecBole may download it). Reads only the header."""
    parts = settings.get("benchmark_filename")
    path = os.path.join(folder, f"{dataset}.{parts[0]}.inter" if parts else f"{dataset}.inter")
    if not os.path.isfile(path):
        return path, None
    with open(path, encoding=settings.get("encoding") or "utf-8") as file:
        columns = [column.split(":")[0] for column in file.readline().rstrip("\r\n").split(settings["field_separator"])]
    load_col, unload_col = settings.get("load_col"), settings.get("unload_col")
    if isinstance(load_col, dict) and isinstance(load_col.get("inter"), list):
        columns = [column for column in columns if column in load_col["inter"]]
    if isinstance(unload_col, dict) and isinstance(unload_col.get("inter"), list):
        columns = [column for column in columns if column not in unload_col["inter"]]
    return path, columns


def is_implicit(settings, folder, dataset):
    """Whether the interactions ``settings`` load carry no label: neither a ``LABEL_FIELD`` column nor one that
    ``threshold`` names. Decided by the loaded columns of the ``.inter`` file, or by ``load_col['inter']`` while
    there is no file; with neither, the data count as labelled."""
    _, columns = inter_columns(settings, folder, dataset)
    load_col = settings.get("load_col")
    if columns is None and isinstance(load_col, dict) and isinstance(load_col.get("inter"), list):
        columns = load_col["inter"]
    if columns is None:
        return False
    threshold = settings.get("threshold")
    label_columns = {settings.get("LABEL_FIELD"), *(threshold if isinstance(threshold, dict) else {})}
    return not label_columns & set(columns)


def validate_data_fields(settings):
    """Refuse data DCCL cannot use before RecBole loads it (RecBole would fail later with a bare ``KeyError``):
    DCCL keeps one device model per user, and a sequential backbone orders each user's interactions by time.
    Reads only the header of the ``.inter`` file; a dataset RecBole has yet to download is checked by RecBole."""
    path, columns = inter_columns(settings, settings["data_path"], settings["dataset"])
    if columns is None:
        return
    needed = {"USER_ID_FIELD": "DCCL keeps one device model per user"}
    if settings["MODEL_TYPE"] == ModelType.SEQUENTIAL:
        needed["TIME_FIELD"] = "a sequential backbone orders each user's interactions by time"
    elif settings.get("device_memory") and settings.get("device_method") != "none":
        needed["TIME_FIELD"] = "device_memory reads each user's history before a row by time"
    for key, why in needed.items():
        if settings.get(key) not in columns:
            raise InputError(
                f"{key}: [{settings.get(key)}] is not a column loaded from [{path}] (loaded: {columns}); {why}. "
                f"It must name one of the loaded columns (see also load_col)."
            )
