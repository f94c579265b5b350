import pytest
import torch
from torch.nn import functional as F

from recbole_dccl.model.families import sequence_sites
from tests.helpers import build


def eval_batch(test_data, device):
    interaction, _, _, _ = next(iter(test_data))
    return interaction.to(device)


def scores_of_both_views(model, score):
    """``score()`` of the cloud view, then of the device view, in eval mode; the model is left in the device view."""
    model.eval()
    model.view = "cloud"
    cloud = score()
    model.view = "device"
    return cloud, score()


@pytest.mark.parametrize("backbone,device_method", [("GRU4Rec", "metapatch"), ("SASRec", "metapatch"), ("SASRec", "patch")])
def test_fresh_device_model_equals_cloud_model(tiny_config, backbone, device_method):
    config, (_, _, test_data), model, _ = build({**tiny_config, "backbone": backbone, "device_method": device_method})
    batch = eval_batch(test_data, config["device"])
    cloud, device = scores_of_both_views(model, lambda: model.full_sort_predict(batch))
    assert torch.equal(device, cloud)


def test_recbole_leaves_autograd_anomaly_detection_off(tiny_config):
    build({**tiny_config, "backbone": "SASRec"})  # RecBole's SINE module, imported with every sequential model, turns it on
    assert not torch.is_anomaly_enabled()


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


@pytest.mark.parametrize("patch_sites", [[r"backbone\.trm_encoder\.layer\.\d+"], r"backbone\.trm_encoder\.layer\.\d+"])
def test_patch_sites_by_pattern(tiny_config, patch_sites):
    # One pattern may be given alone, as on the command line: --patch_sites=backbone.item_embedding
    _, _, model, _ = build({**tiny_config, "backbone": "SASRec", "patch_sites": patch_sites})
    assert sorted(model.patches) == ["backbone__trm_encoder__layer__0"]


def test_ctr_default_sites_are_the_hidden_layers_of_the_backbones_own_mlp(ctr_config):
    _, _, model, _ = build({**ctr_config, "backbone": "DIN"})
    # DIN's prediction MLP, not the MLP inside its attention layer
    assert sorted(model.patches) == ["backbone__dnn_mlp_layers__mlp_layers__1", "backbone__dnn_mlp_layers__mlp_layers__5"]


def test_ctr_backbone_without_mlp_needs_patch_sites(ctr_config):
    with pytest.raises(ValueError, match=r"patch_sites: FM has no MLP .* Valid names: backbone, .*first_order_linear"):
        build({**ctr_config, "backbone": "FM"})


def test_probability_backbone_without_an_item_embedding_table_needs_patch_sites():
    class ProbabilitiesFromALinearLayer(torch.nn.Module):
        n_items = 10
        loss_fct = staticmethod(F.nll_loss)

        def __init__(self):
            super().__init__()
            self.decoder = torch.nn.Linear(4, self.n_items)

    with pytest.raises(ValueError, match=r"patch_sites: ProbabilitiesFromALinearLayer has no item embedding table .* Valid names: backbone, backbone\.decoder$"):
        sequence_sites(ProbabilitiesFromALinearLayer())


def test_ctr_fresh_device_model_equals_cloud_model(ctr_config):
    config, (_, _, test_data), model, _ = build(ctr_config)
    batch = eval_batch(test_data, config["device"])
    cloud, device = scores_of_both_views(model, lambda: model.predict(batch))
    assert torch.equal(device, cloud)
    with torch.no_grad():
        model.metapatch.normal_()
    assert not torch.allclose(model.predict(batch), cloud)
