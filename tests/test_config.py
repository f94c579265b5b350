import pytest
from recbole.utils import InputType, ModelType

from recbole_dccl.config import DCCLConfig


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
        ("patch_sites", "backbone", "None or a list of module names"),
        ("device_select", "first", "'best' or 'last'"),
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
