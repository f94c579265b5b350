"""CTR backbones on implicit data: round 0 samples negatives as RecBole does; every later round trains on its rows
with fixed negatives drawn per device, the same in the device phase, MoMoDistill and step 2."""

import math

import numpy as np
import pytest
import torch

from recbole_dccl.errors import InputError
from recbole_dccl.files import save_atomic
from recbole_dccl.quick_start import run_recbole_dccl
from recbole_dccl.rounds import ROW_FIELD, RoundSchedule
from recbole_dccl.trainer.checkpoint import plain
from recbole_dccl.trainer.device_phase import LocalData, device_settings, personalise, personalise_one_by_one
from recbole_dccl.trainer.momodistill import DeviceTeachers
from recbole_dccl.trainer.resume import ResumedRun, run_state_file, save_run_state
from tests.helpers import build

def schedule_of(config_dict):
    config, (train_data, _, _), model, trainer = build(config_dict)
    return config, train_data, RoundSchedule(config, train_data), model, trainer


def rows_by_positive(rows, config):
    """``{(user, positive item, timestamp): sorted negative items}`` of materialised ``rows``."""
    inter = rows.dataset.inter_feat
    users, items = inter[config["USER_ID_FIELD"]].numpy(), inter[config["ITEM_ID_FIELD"]].numpy()
    times, labels = inter[config["TIME_FIELD"]].numpy(), inter[config["LABEL_FIELD"]].numpy()
    found = {}
    for positive in np.unique(rows.positive):
        own = np.flatnonzero(rows.positive == positive)
        first = own[labels[own] == 1]
        assert len(first) == 1
        key = (users[first[0]], items[first[0]], times[first[0]])
        found[key] = sorted(items[own[labels[own] == 0]].tolist())
    return found


def test_round_0_samples_new_negatives_with_recboles_own_sampler(implicit_config):
    config, train_data, schedule, _, _ = schedule_of(implicit_config)
    loader = schedule.loader(schedule.cloud_rows())
    assert loader._sampler is train_data._sampler is not None
    epochs = [torch.cat([batch[config["ITEM_ID_FIELD"]][batch[config["LABEL_FIELD"]] == 0] for batch in loader])
              for _ in range(2)]
    labels = torch.cat([batch[config["LABEL_FIELD"]] for batch in loader])
    assert len(labels) == 2 * len(schedule.cloud_rows()) and labels.sum() == len(schedule.cloud_rows())
    assert not torch.equal(torch.sort(epochs[0]).values, torch.sort(epochs[1]).values)  # drawn again every epoch


@pytest.mark.parametrize("backbone", ["DeepFM", "DIN"])
def test_a_rounds_rows_hold_sample_num_negatives_per_positive(implicit_config, backbone):
    settings = {**implicit_config, "backbone": backbone, "train_neg_sample_args": {"sample_num": 2}}
    config, train_data, schedule, _, _ = schedule_of(settings)
    device_rows = schedule.device_rows(1)
    rows = schedule.training_rows(device_rows, 1)
    assert len(rows) == 3 * len(device_rows)
    assert np.array_equal(rows.positive, np.repeat(np.arange(len(device_rows)), 3))
    inter = rows.dataset[torch.arange(len(rows))]  # as a loader reads them: item features joined
    uid, iid, label = config["USER_ID_FIELD"], config["ITEM_ID_FIELD"], config["LABEL_FIELD"]
    positives = train_data.dataset[torch.as_tensor(device_rows)]
    visible = schedule.visible_rows(1)
    all_users, all_items = (train_data.dataset.inter_feat[field].numpy() for field in (uid, iid))
    assert torch.equal(inter[label], torch.tensor([1.0, 0.0, 0.0]).repeat(len(device_rows)))
    for copy in range(3):
        part = inter[torch.arange(copy, len(rows), 3)]
        for field in positives.interaction:  # every other field is the positive's (DIN: its history)
            if field not in (iid, "release_year"):
                assert torch.equal(part[field], positives[field]), field
        item_year = train_data.dataset.item_feat["release_year"][part[iid]]
        assert torch.equal(part["release_year"], item_year)  # the row's own item's features
        if copy == 0:
            assert torch.equal(part[iid], positives[iid])
            continue
        for user, item in zip(part[uid].tolist(), part[iid].tolist()):  # never an item the device has seen
            assert item > 0 and item not in all_items[visible][all_users[visible] == user]


def test_negatives_are_drawn_per_device_and_round_whatever_rows_are_asked_for(implicit_config):
    config, train_data, schedule, _, _ = schedule_of({**implicit_config, "device_data": "all"})
    device = rows_by_positive(schedule.training_rows(schedule.device_rows(1), 1), config)
    local = rows_by_positive(schedule.training_rows(schedule.local_rows(1), 1), config)
    assert len(local) > len(device) and all(local[key] == negatives for key, negatives in device.items())
    users = train_data.dataset.inter_feat[config["USER_ID_FIELD"]].numpy()
    one_user = schedule.device_rows(1)[users[schedule.device_rows(1)] == 7]
    alone = rows_by_positive(schedule.training_rows(one_user, 1), config)  # the other devices left out
    assert alone and all(device[key] == negatives for key, negatives in alone.items())
    next_round = rows_by_positive(schedule.training_rows(schedule.device_rows(1), 2), config)
    assert sum(next_round[key] != negatives for key, negatives in device.items()) > len(device) // 2


def test_the_round_loader_samples_nothing_more_and_numbers_the_materialised_rows(implicit_config):
    config, _, schedule, _, trainer = schedule_of(implicit_config)
    trainer.verbose = False
    rows = trainer.start_round(schedule, 1)
    iid = config["ITEM_ID_FIELD"]
    for _ in range(2):
        batches = list(trainer.round.loader)
        numbers = torch.cat([batch[ROW_FIELD] for batch in batches])
        assert sorted(numbers.tolist()) == list(range(len(rows)))
        items = torch.cat([batch[iid] for batch in batches])
        assert torch.equal(items, rows.dataset.inter_feat[iid][numbers])


def test_a_negative_never_gets_its_positives_cached_site_output(implicit_config):
    config, _, schedule, model, trainer = schedule_of(implicit_config)
    trainer.verbose = False
    rows = trainer.start_round(schedule, 1)
    trainer.device_phase(1, rows)
    cache = trainer.round.cache
    assert cache.outputs is not None and len(cache.outputs) == len(rows)
    outputs = cache.outputs
    assert (outputs[0::2] - outputs[1::2]).abs().amax(dim=1).min() > 0  # positive vs its negative: other items
    cached, plain = DeviceTeachers(model, cache=cache), DeviceTeachers(model)
    for batch in trainer.round.loader:
        batch = batch.to(config["device"])
        assert torch.allclose(cached.logits(batch), plain.logits(batch), atol=1e-6)


def test_a_device_holds_out_its_newest_positives_with_their_negatives(implicit_config):
    config, _, schedule, _, _ = schedule_of(implicit_config)
    rows = schedule.training_rows(schedule.device_rows(1), 1)
    local = LocalData.from_rows(rows, 2, config["device"])
    time, label = local.interaction[config["TIME_FIELD"]], local.interaction[config["LABEL_FIELD"]]
    for device in range(len(local.users)):
        own = local.owner == device
        held = own & local.is_valid
        assert int(held.sum()) == 4 and int(label[held].sum()) == 2  # two positives, each with its negative
        assert time[held].min() > time[own & ~local.is_valid].max()  # the newest


@pytest.mark.parametrize("backbone", ["DeepFM", "DIN"])
@pytest.mark.parametrize("valid_size", [1, 0])
def test_batched_device_phase_with_sampled_negatives_equals_per_user_loop(implicit_config, backbone, valid_size):
    settings_dict = {**implicit_config, "backbone": backbone, "device_valid_size": valid_size, "device_chunk_size": 7}
    config, _, schedule, model, _ = schedule_of(settings_dict)
    settings = device_settings(config)
    local = LocalData.from_rows(schedule.training_rows(schedule.device_rows(1), 1), settings.valid_size, config["device"])
    assert 0 < float(local.interaction[config["LABEL_FIELD"]].mean()) < 1
    start = 0.1 * torch.randn(len(local.users), model.metapatch.shape[1], generator=torch.Generator().manual_seed(0))
    batched = personalise(model, local, start, settings, seed=7)
    loop = personalise_one_by_one(model, local, start, settings, seed=7)
    assert (batched.metapatch - start).abs().max() > 1e-3  # it trained
    assert (batched.metapatch - loop.metapatch).abs().max() < 1e-5
    assert torch.equal(batched.adopted, loop.adopted)


@pytest.mark.parametrize("backbone", ["DeepFM", "DIN"])
def test_a_dccl_run_on_implicit_data(implicit_config, backbone):
    settings = {**implicit_config, "backbone": backbone, "epochs": 1, "shared_epochs": 1}  # the implicit quick start
    result = run_recbole_dccl(model="DCCL", dataset="tiny", config_dict=settings, verbose=False)
    assert [(entry["round"], entry["phase"]) for entry in result["history"]] == [
        (0, "cloud"), (1, "device"), (1, "momodistill"), (1, "shared")
    ]
    for view in ("cloud_only", "dccl_cloud", "dccl_device"):
        test = result[view]["test"]
        assert {"hit@10", "ndcg@10", "gauc"} <= set(test) and all(math.isfinite(value) for value in test.values())
    assert result["config"]["train_neg_sample_args"]["sample_num"] == 1


def test_files_written_before_sampled_negatives_still_load(ctr_config, implicit_config, tmp_path):
    config, _, _, model, trainer = schedule_of(ctr_config)
    # a cloud checkpoint from before train_neg_sample_args joined its identity: a labelled run loads it ...
    identity = {key: plain(config[key]) for key in trainer.CLOUD_KEYS if key != "train_neg_sample_args"}
    state = {name: value for name, value in model.state_dict().items() if name.startswith("backbone.")}
    cloud = str(tmp_path / "old-cloud.pth")
    save_atomic({"identity": identity, "state_dict": state}, cloud)
    trainer.load_cloud(cloud)
    # ... a run with sampled negatives does not
    _, _, _, _, implicit = schedule_of(implicit_config)
    with pytest.raises(InputError, match=r"cloud_checkpoint: .* other settings .*'train_neg_sample_args': \(\{'distribution': 'none'"):
        implicit.load_cloud(cloud)
    # a run state from before: resumed by the same settings
    run_state = run_state_file(trainer.saved_model_file)
    save_run_state(run_state, trainer, 0, "cloud", trainer._settings())
    old = torch.load(run_state, weights_only=True)
    del old["identity"]["train_neg_sample_args"]
    save_atomic(old, run_state)
    ResumedRun(run_state, trainer._settings())
