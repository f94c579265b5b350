import pytest
import torch

from tests.helpers import build


def eval_batch(test_data, device):
    interaction, _, _, _ = next(iter(test_data))
    return interaction.to(device)


@pytest.mark.parametrize("backbone,device_method", [("GRU4Rec", "metapatch"), ("SASRec", "metapatch"), ("SASRec", "patch")])
def test_fresh_device_model_equals_cloud_model(tiny_config, backbone, device_method):
    config, (_, _, test_data), model, _ = build({**tiny_config, "backbone": backbone, "device_method": device_method})
    model.eval()
    batch = eval_batch(test_data, config["device"])
    model.view = "cloud"
    cloud = model.full_sort_predict(batch)
    model.view = "device"
    assert torch.equal(model.full_sort_predict(batch), cloud)


def test_device_view_uses_each_users_metapatch(tiny_config):
    config, (_, _, test_data), model, _ = build(tiny_config)
    model.eval()
    batch = eval_batch(test_data, config["device"])
    users = batch["user_id"]
    model.view = "cloud"
    cloud = model.full_sort_predict(batch).view(len(batch), -1)
    with torch.no_grad():
        model.metapatch[users[0]] = torch.randn(model.metapatch.shape[1])
    model.view = "device"
    device = model.full_sort_predict(batch).view(len(batch), -1)
    mine = users == users[0]
    assert not torch.allclose(device[mine], cloud[mine])
    assert torch.equal(device[~mine], cloud[~mine])


def test_wrong_patch_site_lists_valid_names(tiny_config):
    with pytest.raises(ValueError, match=r"patch_sites: \[nope\] matches no module.*backbone\.gru_layers"):
        build({**tiny_config, "patch_sites": ["nope"]})


def test_patch_sites_by_pattern(tiny_config):
    _, _, model, _ = build({**tiny_config, "backbone": "SASRec", "patch_sites": [r"backbone\.trm_encoder\.layer\.\d+"]})
    assert sorted(model.patches) == ["backbone__trm_encoder__layer__0"]
