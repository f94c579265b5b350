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


def test_unsupported_backbone_is_refused_with_families(tiny_config):
    with pytest.raises(ValueError, match=r"backbone: \[BPR\] is a general model; DCCL wraps .*sequential"):
        DCCLConfig(model="DCCL", dataset="tiny", config_dict={**tiny_config, "backbone": "BPR"})
