"""DCCL over every backbone of docs/backbones.md, on tiny data: one round runs, metrics are finite, the
checkpoint reloads, and the device view differs from the cloud view for users with data."""

import math

import pytest
import torch

from recbole_dccl.rounds import RoundSchedule
from recbole_dccl.utils import get_model
from tests.helpers import build

SEQUENTIAL = [
    "SASRec", "GRU4Rec", "NARM", "STAMP", "Caser", "BERT4Rec", "SRGNN", "NextItNet", "LightSANs", "GCSAN",
    "SINE", "CORE", "HRM", "NPE", "SHAN", "FOSSIL", "HGN", "GRU4RecF", "FDSA", "SASRecF", "RepeatNet",
]
CTR = ["DIN", "DeepFM", "WideDeep", "DCN", "AutoInt", "xDeepFM", "NFM", "PNN", "FNN", "DCNV2", "DSSM"]
# RecBole's xDeepFM ends its MLP in a ReLU on the score, which can be zero for every row from the start: then no
# MLP patch can change a prediction, so the test patches its CIN layers (docs/backbones.md).
PATCH_SITES = {"xDeepFM": [r"backbone\.conv1d_list\.\d+"]}

ONE_SHORT_ROUND = {
    "load_col": None,  # every field: ratings for CTR labels, item features for feature-aware models
    "epochs": 1,
    "device_epochs": 1,
    "shared_epochs": 1,
    "device_valid_size": 0,  # devices keep what they trained, so their view must differ from the cloud's
    "mlp_hidden_size": [8, 8],
}


def view_logits(model, batch):
    """Each view's logits (before any sigmoid, which saturates in float32 on an untrained CTR model)."""
    model.eval()
    result = {}
    with torch.no_grad():
        for view in model.VIEWS:
            model.view = view
            result[view] = model(batch, model.view_metapatch(batch))
    return result


@pytest.mark.parametrize("backbone", SEQUENTIAL + CTR)
def test_one_round_over_every_backbone(tiny_config, backbone):
    config, (train_data, valid_data, test_data), model, trainer = build(
        {**tiny_config, **ONE_SHORT_ROUND, "backbone": backbone, "patch_sites": PATCH_SITES.get(backbone)}
    )
    trainer.fit(train_data, valid_data, saved=True, test_data=test_data)
    for name in ("cloud_only", "dccl_cloud", "dccl_device"):
        for split in ("valid", "test"):
            values = trainer.report[name][split]
            assert values and all(math.isfinite(value) for value in values.values()), (name, split, values)

    batch = next(iter(test_data))[0].to(config["device"])
    fitted = view_logits(model, batch)
    reloaded = get_model("DCCL")(config, train_data.dataset).to(config["device"])
    reloaded.load_state_dict(torch.load(trainer.saved_model_file, weights_only=True)["state_dict"])
    for view, expected in view_logits(reloaded, batch).items():
        assert torch.equal(expected, fitted[view]), view

    schedule = RoundSchedule(config, train_data)
    device_rows = schedule.device_rows(1)
    trainer.device_phase(1, schedule.training_rows(device_rows, 1))
    after = view_logits(model, batch)
    users = batch[config["USER_ID_FIELD"]]
    users_with_data = torch.unique(train_data.dataset.inter_feat[config["USER_ID_FIELD"]][device_rows])
    row_differs = (after["device"] - after["cloud"]).reshape(len(batch), -1).abs().amax(dim=1) > 0
    evaluated = [user for user in torch.unique(users) if user in users_with_data]
    assert evaluated
    # per user: a ReLU MLP can be flat for a single row, not for all of a user's rows
    assert all(row_differs[users == user].any() for user in evaluated)
