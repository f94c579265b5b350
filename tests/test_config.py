import logging
import os
import subprocess
import sys

import pytest
from recbole.utils import InputType, ModelType

from recbole_dccl.config import DCCLConfig
from recbole_dccl.errors import InputError
from recbole_dccl.model.dccl import DCCL
from tests.conftest import TINY_SETTINGS, write_dataset
from tests.helpers import build


def test_dccl_takes_type_and_defaults_from_backbone(tiny_config):
    config = DCCLConfig(model="DCCL", dataset="tiny", config_dict={**tiny_config, "backbone": "SASRec"})
    assert config["model"] == "DCCL"
    assert config["MODEL_TYPE"] == ModelType.SEQUENTIAL
    assert config["MODEL_INPUT_TYPE"] == InputType.POINTWISE
    assert config["n_heads"] == 1  # the user's value over SASRec.yaml's
    assert config["attn_dropout_prob"] == 0.5  # from RecBole's SASRec.yaml
    assert config["train_neg_sample_args"]["distribution"] == "none"  # our sequential family fix
    assert config["metapatch_dim"] == 4 and config["distill_weight"] == 1.0  # properties/model/DCCL.yaml
    assert config["load_col"]["user"] == "*"  # the encoder reads profiles


def test_plain_recbole_model_runs_with_family_fix_only(tiny_config):
    config = DCCLConfig(model="SASRec", dataset="tiny", config_dict=tiny_config)
    assert config["model"] == "SASRec"
    assert config["train_neg_sample_args"]["distribution"] == "none"
    assert "distill_weight" not in config  # DCCL.yaml is for DCCL only


@pytest.mark.parametrize("backbone,kind", [("BPR", "general"), ("LightGCN", "general"), ("KGAT", "knowledge")])
def test_unsupported_backbone_is_refused_with_families(tiny_config, backbone, kind):
    with pytest.raises(
        ValueError, match=rf"backbone: \[{backbone}\] is a {kind} model; DCCL wraps .*: sequential, context \(CTR\)"
    ):
        DCCLConfig(model="DCCL", dataset="tiny", config_dict={**tiny_config, "backbone": backbone})


@pytest.mark.parametrize("model,backbone", [("DCCL", "DeepFM"), ("DCCL", "DIN"), ("DeepFM", None), ("DIN", None)])
def test_ctr_models_get_labeled_time_ordered_evaluation(ctr_config, model, backbone):
    config = DCCLConfig(model=model, dataset="tiny", config_dict={**ctr_config, "backbone": backbone or "DeepFM"})
    assert config["eval_args"]["mode"] == {"valid": "labeled", "test": "labeled"}
    assert config["eval_args"]["order"] == "TO" and config["eval_args"]["group_by"] == "user"
    assert config["threshold"] == {"rating": 4}
    assert config["valid_metric"] == "AUC" and config["metrics"] == ["AUC", "LogLoss"]
    assert config["train_neg_sample_args"]["distribution"] == "none"


@pytest.mark.parametrize(
    "key,value,valid",
    [
        ("protocol", "online", r"one of \['incremental', 'static'\]"),
        ("rounds", 0, "a positive integer"),
        ("metapatch_dim", -4, "a positive integer"),
        ("patch_rank", 0, "a positive integer"),
        ("device_epochs", -1, "an integer >= 0"),
        ("cloud_epochs", 1.5, "an integer >= 0"),
        ("device_learning_rate", 0, "a number > 0"),
        ("shared_learning_rate", -0.1, "a number > 0"),
        ("distill_weight", -1.0, "a number >= 0"),
        ("distill_temperature", 0, "a number > 0"),
        ("patch_sites", ["backbone", 3], r"None, a module name \(or regex\) or a list of them"),
        ("device_select", "first", "'best' or 'last'"),
        ("memory_gate", "yes", "True or False"),
        ("cold_start_ratio", 1.0, r"a number in \[0, 1\)"),
    ],
)
def test_bad_settings_are_refused_before_training(tiny_config, key, value, valid):
    with pytest.raises(ValueError, match=rf"{key}: \[.*\] is not valid; it must be {valid}"):
        DCCLConfig(model="DCCL", dataset="tiny", config_dict={**tiny_config, key: value})


def test_unwritable_result_file_is_refused(tiny_config, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="result_file: .* cannot be written"):
        DCCLConfig(model="DCCL", dataset="tiny", config_dict={**tiny_config, "result_file": str(blocker / "r.json")})


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("backbone", "Nope", r"backbone: \[Nope\] is not a model RecBole has; it must be a RecBole model of these families: sequential"),
        ("backbone", "gru4rec", r"backbone: \[gru4rec\] is not a model RecBole has \(names are case-sensitive\)"),
        ("epochs", 0, r"epochs: \[0\] is not valid; it must be a positive integer"),
        ("learning_rate", -0.001, r"learning_rate: \[-0.001\] is not valid; it must be a number > 0"),
        ("train_batch_size", 0, r"train_batch_size: \[0\] is not valid; it must be a positive integer"),
        ("resume", "no/such/run-state.pth", r"resume: \['no/such/run-state.pth'\] is not valid; it must be None or an existing"),
    ],
)
def test_bad_backbone_and_round_0_settings_are_refused(tiny_config, key, value, message):
    with pytest.raises(InputError, match=message):
        DCCLConfig(model="DCCL", dataset="tiny", config_dict={**tiny_config, key: value})


def test_a_plain_models_resume_that_does_not_exist_is_refused(tiny_config):
    with pytest.raises(InputError, match=r"resume: \['no/such/run-state.pth'\] is not valid; it must be None or an existing"):
        DCCLConfig(model="GRU4Rec", dataset="tiny", config_dict={**tiny_config, "resume": "no/such/run-state.pth"})


def test_unknown_model_is_refused_by_name(tiny_config):
    with pytest.raises(InputError, match=r"model: \[Nope\] is not a model RecBole has; it must be one of \['DCCL', 'Frequency'\] or the name"):
        DCCLConfig(model="Nope", dataset="tiny", config_dict=tiny_config)


@pytest.mark.parametrize(
    "columns,key,field,why",
    [
        (["item_id", "timestamp"], "USER_ID_FIELD", "user_id", "DCCL keeps one device model per user"),
        (["user_id", "item_id"], "TIME_FIELD", "timestamp", "a sequential backbone orders each user's interactions by time"),
    ],
)
def test_data_without_user_or_time_field_is_refused_before_loading(tiny_config, columns, key, field, why):
    settings = {**tiny_config, "load_col": {"inter": columns}}
    message = rf"{key}: \[{field}\] is not a column loaded from \[.*tiny\.inter\] \(loaded: .*\); {why}"
    with pytest.raises(InputError, match=message):
        DCCLConfig(model="DCCL", dataset="tiny", config_dict=settings)


def test_data_without_profiles_runs_with_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    data = write_dataset(str(tmp_path / "data"), with_profiles=False)
    config, (train_data, _, _), _, _ = build({**TINY_SETTINGS, "data_path": data, "checkpoint_dir": str(tmp_path)})
    logging.getLogger().setLevel(logging.WARNING)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        model = DCCL(config, train_data.dataset)
    assert [record.message for record in caplog.records if "profile" in record.message] == [
        "DCCL: the dataset has no .user profile features; the encoder runs without them."
    ]
    assert not model.encoder.has_profile


def test_command_line_exits_non_zero_with_the_message(tiny_data, tmp_path):
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "run_recbole_dccl.py")
    args = [sys.executable, script, "--model=DCCL", "--dataset=tiny", f"--data_path={tiny_data}", "--rounds=0"]
    finished = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True)
    assert finished.returncode == 2
    assert "run_recbole_dccl: error: rounds: [0] is not valid; it must be a positive integer." in finished.stderr
    assert "Traceback" not in finished.stderr


IMPLICIT_DEFAULTS = {
    "threshold": None,
    "eval_args": {"split": {"LS": "valid_and_test"}, "group_by": "user", "order": "TO", "mode": {"valid": "uni100", "test": "uni100"}},
    "metrics": ["Hit", "NDCG", "GAUC"],
    "topk": [10],
    "valid_metric": "NDCG@10",
}


def without_rating_column(folder):
    """Rewrite ``tiny.inter`` in ``folder`` without its rating column: interactions and no label of any kind."""
    path = os.path.join(folder, "tiny", "tiny.inter")
    with open(path) as file:
        lines = [line.rstrip("\n").split("\t") for line in file]
    with open(path, "w") as file:
        file.writelines("\t".join(fields[:2] + fields[3:]) + "\n" for fields in lines)


@pytest.mark.parametrize("model,backbone", [("DCCL", "DeepFM"), ("DCCL", "DIN"), ("DeepFM", None), ("DIN", None)])
@pytest.mark.parametrize("decided_by", ["load_col", "header"])
def test_ctr_models_on_data_without_labels_get_the_implicit_quick_start(ctr_config, model, backbone, decided_by):
    settings = {**ctr_config, "backbone": backbone or "DeepFM"}
    if decided_by == "load_col":
        settings["load_col"] = {"inter": ["user_id", "item_id", "timestamp"]}  # the file has ratings; not loaded
    else:
        without_rating_column(ctr_config["data_path"])  # load_col None: every column of the file
    config = DCCLConfig(model=model, dataset="tiny", config_dict=settings)
    assert {key: config[key] for key in IMPLICIT_DEFAULTS} == IMPLICIT_DEFAULTS
    assert config["train_neg_sample_args"] == {
        "distribution": "uniform", "sample_num": 1, "dynamic": False, "alpha": 1.0, "candidate_num": 0
    }


def test_a_label_column_or_one_the_threshold_names_keeps_the_labelled_quick_start(ctr_config):
    no_rating = {**ctr_config, "load_col": {"inter": ["user_id", "item_id", "timestamp"]}}
    config = DCCLConfig(model="DCCL", dataset="tiny", config_dict={**no_rating, "threshold": {"timestamp": 5000}})
    assert config["eval_args"]["mode"]["test"] == "labeled" and config["threshold"] == {"timestamp": 5000}
    config = DCCLConfig(model="DCCL", dataset="tiny", config_dict={**no_rating, "LABEL_FIELD": "timestamp"})
    assert config["eval_args"]["mode"]["test"] == "labeled"
    # ratings loaded but no threshold on them: no labels
    config = DCCLConfig(model="DCCL", dataset="tiny", config_dict={**ctr_config, "threshold": None})
    assert config["eval_args"]["mode"]["test"] == "uni100"


def test_the_users_settings_win_over_the_implicit_quick_start(ctr_config):
    settings = {**ctr_config, "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
                "train_neg_sample_args": {"sample_num": 4}, "metrics": ["Hit"], "valid_metric": "Hit@10"}
    config = DCCLConfig(model="DCCL", dataset="tiny", config_dict=settings)
    assert config["train_neg_sample_args"]["sample_num"] == 4 and config["train_neg_sample_args"]["distribution"] == "uniform"
    assert config["metrics"] == ["Hit"] and config["valid_metric"] == "Hit@10"
    assert config["eval_args"]["mode"]["test"] == "uni100"


@pytest.mark.parametrize(
    "args", [{"distribution": "popularity"}, {"dynamic": True}, {"sample_num": 0}], ids=["popularity", "dynamic", "zero"]
)
def test_negatives_dccl_cannot_draw_are_refused(ctr_config, args):
    settings = {**ctr_config, "load_col": {"inter": ["user_id", "item_id", "timestamp"]}, "train_neg_sample_args": args}
    with pytest.raises(InputError, match=r"train_neg_sample_args: \[.*\] is not valid; it must be None or \{distribution: uniform"):
        DCCLConfig(model="DCCL", dataset="tiny", config_dict=settings)
