"""The personal memory (``device_memory``): what it reads of a user's history, that a zero memory is the plain
device view, that its fit reduces the logits exactly, that the batched device phase trains the metapatches beside it
as a per-device loop does, and that a run fits it, reports it and saves it."""

import os

import numpy as np
import pytest
import torch

from dccl_device.memory import memory_fields
from recbole_dccl.errors import InputError
from recbole_dccl.model.frozen import frozen
from recbole_dccl.model.memory import ITEMS, RECENCY_DECAY, VALUES
from recbole_dccl.trainer.memory_fit import LabelledRows, RankedRows, fit_memory
from tests.conftest import TINY_SETTINGS
from tests.helpers import build
from tests.test_device_phase import batched_and_loop, local_setup

# One user's interactions (item token, time); a second user's, which the first one's memory must never read.
MINE = [(5, 1), (7, 2), (5, 3), (9, 4), (5, 5), (7, 6), (8, 7), (9, 8), (6, 9), (5, 10), (7, 11), (9, 12)]
OTHER = [(item, time) for time, item in enumerate([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], start=1)]


@pytest.fixture
def memory_config(tmp_path):
    path = tmp_path / "data" / "hand"
    os.makedirs(path)
    with open(path / "hand.inter", "w") as file:
        file.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for user, rows in (("a", MINE), ("b", OTHER)):
            file.writelines(f"{user}\t{item}\t{time}\n" for item, time in rows)
    return {**TINY_SETTINGS, "data_path": str(tmp_path / "data"), "device_memory": True,
            "checkpoint_dir": str(tmp_path / "saved")}


def test_the_memory_reads_what_the_user_did_before_the_row_and_nothing_else(memory_config):
    config, (train_data, valid_data, test_data), model, _ = build(memory_config, dataset="hand")
    model.hold_histories([train_data.dataset, valid_data.dataset, test_data.dataset])
    dataset = train_data.dataset
    user = torch.tensor(dataset.token2id(dataset.uid_field, ["a"]))
    for time in (1, 4, 12, 13):  # 12: the test row (its own item is not read); 13: after every row
        items, values = model.memory.histories.features(user, torch.tensor([float(time)]), dataset.item_num)
        before = [item for item, when in MINE if when < time]
        expected = {}
        for since, item in enumerate(reversed(before)):
            count, recent = expected.get(item, (0, 0.0))
            expected[item] = (count + 1, recent + RECENCY_DECAY**since)
        read = {
            int(dataset.id2token(dataset.iid_field, [item])[0]): tuple(value)
            for item, value in zip(items[0].tolist(), values[0].tolist()) if item
        }
        assert set(read) == set(expected)
        repeat_share = 1 - len(expected) / len(before) if before else 0.0  # time 12: 11 before, 5 items: 6 returns
        for item, (count, recent) in expected.items():
            assert read[item] == pytest.approx((1.0, np.log1p(count), np.log1p(recent), repeat_share), abs=1e-6)
        assert values[0][items[0] == 0].abs().sum() == 0  # the padding adds nothing


def memory_settings(config_dict, backbone, **more):
    settings = {**config_dict, "backbone": backbone, "device_memory": True, **more}
    if backbone == "DeepFM":  # CTR: every field loaded, ratings give the labels
        settings.update(load_col=None, mlp_hidden_size=[8, 8])
    return settings


def memory_model(config_dict, backbone):
    return build(memory_settings(config_dict, backbone))


@pytest.mark.parametrize("backbone", ["GRU4Rec", "DeepFM"])
def test_a_zero_memory_is_the_plain_device_view(tiny_config, backbone):
    config, (_, _, test_data), model, _ = memory_model(tiny_config, backbone)
    model.eval()
    with torch.no_grad():
        model.metapatch.normal_(0, 0.5)
    model.view = "device"
    batch = next(iter(test_data))[0]
    score = model.full_sort_predict if backbone == "GRU4Rec" else model.predict
    with torch.no_grad():
        remembered = score(batch)
        memory, model.memory = model.memory, None
        plain = score(batch)
        model.memory = memory
        model.memory.weights.copy_(torch.tensor([0.5, 0.3, -0.2]))
        raised = score(batch)
    assert torch.equal(remembered, plain)
    changed = (raised - plain).abs() > 0
    assert changed.any()
    if backbone == "GRU4Rec":  # only the items each user had before the row
        own = torch.zeros_like(changed)
        own.scatter_(1, batch[ITEMS], batch[VALUES][..., 0] > 0)
        assert torch.equal(changed, own)


@pytest.mark.parametrize("backbone", ["GRU4Rec", "DeepFM"])
def test_the_weights_are_chosen_by_what_the_reduced_rows_score_as_the_full_model_does(tiny_config, backbone):
    config, (train_data, _, _), model, _ = memory_model(tiny_config, backbone)
    with torch.no_grad():
        model.metapatch.normal_(0, 0.5)
    rows = train_data.dataset[:21]
    chunks = [rows[start : start + 7] for start in range(0, 21, 7)]
    with frozen(model):
        scored = RankedRows(model, chunks, "ndcg", 10) if backbone == "GRU4Rec" else LabelledRows(model, chunks)
        for weights, gate in ((torch.zeros(3), 0.0), (torch.tensor([1.0, 0.5, 2.0]), 0.0), (torch.ones(3), 2.0)):
            model.memory.weights.copy_(weights)
            model.memory.gate.fill_(gate)
            logits = model(rows, model.metapatch[rows[model.USER_ID]])
            if backbone == "GRU4Rec":  # NDCG@10 of the full scores, the padding item left out as in evaluation
                logits[:, 0] = -torch.inf
                target = logits.gather(1, rows[model.objective.target_field][:, None])
                rank = (logits > target).sum(1)
                expected = torch.where(rank < 10, 1 / torch.log2(rank.float() + 2), torch.zeros(())).mean()
            else:
                expected = -model.objective.loss(logits, rows).mean()
            assert float(scored(weights, torch.tensor(gate))) == pytest.approx(float(expected), abs=1e-6)
    chosen = fit_memory(model, rows, "NDCG@10" if backbone == "GRU4Rec" else "AUC", chunk_size=7, device="cpu")
    assert torch.equal(model.memory.weights, chosen[:-1]) and torch.equal(model.memory.gate, chosen[-1])
    with frozen(model):
        best = float(scored(chosen[:-1], chosen[-1]))
        assert best >= max(float(scored(torch.full((3,), w), torch.tensor(g))) for w in (0.0, 1.0) for g in (0.0, 1.0))


@pytest.mark.parametrize("backbone", ["GRU4Rec", "DeepFM"])
def test_the_batched_device_phase_with_a_memory_equals_a_per_device_loop(tiny_config, backbone):
    _, model, local, device_settings = local_setup(memory_settings(tiny_config, backbone, device_chunk_size=7))
    model.memory.weights.copy_(torch.tensor([0.5, 0.3, -0.2]))
    batched_and_loop(model, local, device_settings)


def test_a_run_with_the_memory_reports_it_and_its_saved_model_reads_the_same(tiny_config):
    from recbole_dccl.quick_start import load_data_and_model

    config, (train_data, valid_data, test_data), model, trainer = build({**tiny_config, "device_memory": True})
    trainer.fit(train_data, valid_data, verbose=False, saved=True, test_data=test_data)
    assert model.memory.weights.abs().sum() > 0  # fitted in round 1
    assert trainer.report["config"]["device_memory"] is True
    _, loaded, _, _, _, loaded_test = load_data_and_model(trainer.saved_model_file, reading="selected")
    loaded.eval(), model.eval()
    first, again = next(iter(loaded_test))[0], next(iter(loaded_test))[0]  # each model completes its own batch
    with torch.no_grad():
        assert torch.allclose(loaded.full_sort_predict(first), model.full_sort_predict(again), atol=1e-6)


def test_the_memory_needs_the_time_of_each_interaction(ctr_config):
    with pytest.raises(InputError, match="TIME_FIELD.*device_memory"):
        build({**ctr_config, "device_memory": True, "load_col": {"inter": ["user_id", "item_id", "rating"]}})


def test_a_device_computes_the_memorys_fields_as_the_trainer_does(memory_config):
    config, (train_data, valid_data, test_data), model, _ = build(memory_config, dataset="hand")
    model.hold_histories([train_data.dataset, valid_data.dataset, test_data.dataset])
    dataset = train_data.dataset
    user = dataset.token2id(dataset.uid_field, ["a"])
    items = dataset.token2id(dataset.iid_field, [str(item) for item, _ in MINE])
    times = [float(time) for _, time in MINE]
    row_times = torch.tensor([1.0, 4.0, 7.5, 12.0, 13.0])
    expected_items, expected_values = model.memory.histories.features(
        torch.full((5,), int(user)), row_times, dataset.item_num
    )
    fields = memory_fields(np.asarray(items)[::-1], np.asarray(times)[::-1], row_times.numpy())  # any order
    assert np.array_equal(fields[ITEMS], expected_items.numpy())
    assert np.allclose(fields[VALUES], expected_values.numpy(), atol=1e-6)


def test_the_gate_scales_each_users_memory_by_the_users_repeat_share():
    from recbole_dccl.model.memory import memory_offsets

    # two rows, two own items each: features (1, log count, log recent), then the row's repeat share
    values = torch.tensor([[[1.0, 0.5, 0.2, 0.8], [1.0, 0.1, 0.1, 0.8]], [[1.0, 0.7, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0]]])
    weights = torch.tensor([1.0, 2.0, -1.0])
    ungated = values[..., :3] @ weights
    assert torch.equal(memory_offsets(values, weights, torch.tensor(0.0)), ungated)  # 0 ** 0 is 1: no gate
    gated = memory_offsets(values, weights, torch.tensor(2.0))
    assert torch.allclose(gated[0], ungated[0] * 0.64) and torch.equal(gated[1], torch.zeros(2))


def test_a_model_saved_before_the_gate_loads_with_gate_zero(memory_config):
    _, _, model, _ = build(memory_config, dataset="hand")
    state = {key: value for key, value in model.state_dict().items() if key != "memory.gate"}
    model.memory.gate.fill_(2.0)
    model.load_state_dict(state)
    assert float(model.memory.gate) == 0.0
