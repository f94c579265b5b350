import json
import logging
import os
import re

import pytest
import torch

from recbole_dccl.errors import InputError
from recbole_dccl.quick_start import run_recbole_dccl
from recbole_dccl.rounds import RoundSchedule
from recbole_dccl.trainer.checkpoint import reading_files
from recbole_dccl.trainer.momodistill import DeviceTeachers, distill_cloud_epoch
from tests.helpers import build


def test_distill_weight_zero_is_plain_ce_training(tiny_config):
    config, (train_data, _, _), model, trainer = build(tiny_config)
    schedule = RoundSchedule(config, train_data)
    rows = schedule.device_rows(1)
    teachers = DeviceTeachers(model)
    optimizer = trainer._build_optimizer(params=model.backbone.parameters())
    torch.manual_seed(5)
    distill_cloud_epoch(model, schedule.loader(rows), optimizer, teachers, 0.0, config)

    _, _, plain_model, plain_trainer = build(tiny_config, model="GRU4Rec")
    plain_trainer.optimizer = plain_trainer._build_optimizer(params=plain_model.parameters())
    torch.manual_seed(5)
    plain_trainer._train_epoch(schedule.loader(rows), 0)
    for name, value in plain_model.state_dict().items():
        assert torch.allclose(model.backbone.state_dict()[name], value, atol=1e-6), name


def test_distillation_pulls_cloud_towards_devices(tiny_config):
    config, (train_data, _, _), model, trainer = build({**tiny_config, "distill_weight": 1.0})
    schedule = RoundSchedule(config, train_data)
    with torch.no_grad():
        model.uploaded_metapatch.normal_()
    teachers = DeviceTeachers(model)
    loader = schedule.loader(schedule.device_rows(1))
    batch = next(iter(loader)).to(config["device"])
    objective = model.objective
    kl = lambda: objective.distill(model(batch), teachers.logits(batch), 1.0).mean().item()
    before = kl()
    optimizer = torch.optim.Adam(model.backbone.parameters(), lr=0.01)
    for _ in range(3):
        distill_cloud_epoch(model, loader, optimizer, teachers, 100.0, config)
    model.eval()
    assert kl() < before


def test_checkpoint_round_trips(tiny_config):
    config, (train_data, valid_data, test_data), model, trainer = build({**tiny_config, "rounds": 1})
    trainer.fit(train_data, valid_data, saved=True, test_data=test_data)
    checkpoint = torch.load(trainer.saved_model_file, weights_only=True)  # plain values only
    assert checkpoint["config"]["model"] == "DCCL"
    _, _, fresh, fresh_trainer = build({**tiny_config, "rounds": 1})
    fresh.load_state_dict(checkpoint["state_dict"])
    batch, _, _, _ = next(iter(test_data))
    model.eval(), fresh.eval()
    for view in ("cloud", "device"):
        model.view = fresh.view = view
        assert torch.equal(model.full_sort_predict(batch), fresh.full_sort_predict(batch))
    # RecBole's own evaluate(load_best_model=True) reads it on torch>=2.6 without any environment switch.
    fresh_trainer.saved_model_file = trainer.saved_model_file
    fresh_trainer.eval_collector.data_collect(train_data)  # as fit does: the metrics that read the training data
    fresh.view = "device"
    assert fresh_trainer.evaluate(test_data, load_best_model=True) == trainer.evaluate(test_data, load_best_model=False)


@pytest.mark.parametrize("protocol", ["incremental", "static"])
def test_end_to_end_writes_all_three_views(tiny_config, tmp_path, protocol):
    result_file = str(tmp_path / "out" / "result.json")
    config = {**tiny_config, "protocol": protocol, "rounds": 2, "result_file": result_file}
    result = run_recbole_dccl(model="DCCL", dataset="tiny", config_dict=config, verbose=False)
    with open(result_file) as file:
        written = json.load(file)
    for view in ("cloud_only", "dccl_cloud", "dccl_device"):
        for split in ("valid", "test"):
            assert 0.0 <= written[view][split]["ndcg@10"] <= 1.0
    assert phases(written) == [
        (0, "cloud"), (1, "device"), (1, "momodistill"), (1, "shared"), (2, "device"), (2, "momodistill"), (2, "shared"),
    ]
    assert written["config"]["protocol"] == protocol
    groups = written["dccl_device"]["test_groups"]
    assert len(groups) == 5 and sum(group["users"] for group in groups.values()) == 30
    assert set(written["phase_seconds"]) >= {"round 0 cloud", "round 2 shared"}
    assert written["platform"]["threads"] == torch.get_num_threads() and written["platform"]["device"] == "cpu"
    best = max(entry["device"]["valid"]["ndcg@10"] for entry in written["history"])
    assert written["dccl_device"]["valid"]["ndcg@10"] == best
    assert result["test_result"] == written["dccl_device"]["test"]
    # The deployed reading: what the cloud and the devices run after the last phase, whatever valid says.
    for view in ("cloud", "device"):
        deployed = written[f"deployed_{view}"]
        assert deployed["test"] == written["history"][-1][view]["test"]
        assert len(deployed["test_users"]["ndcg@10"]) == 30
    assert (written["deployed_device"]["round"], written["deployed_device"]["phase"]) == (2, "shared")
    assert (written["deployed_cloud"]["round"], written["deployed_cloud"]["phase"]) == (2, "momodistill")
    for view in ("cloud", "device"):
        selection, chosen = written["selection"][view], written[f"dccl_{view}"]
        assert (selection["round"], selection["phase"]) == (chosen["round"], chosen["phase"])
        dccl_best = max(e[view]["valid"]["ndcg@10"] for e in written["history"] if e["round"] > 0)
        assert selection["best_dccl_phase"]["valid"] == dccl_best
        assert ("selection kept round 0" in selection["message"]) == (chosen["round"] == 0)


def test_the_log_ends_with_the_summary_and_the_saved_models(tiny_config, caplog):
    with caplog.at_level(logging.INFO):
        result = run_recbole_dccl(model="DCCL", dataset="tiny", config_dict={**tiny_config, "rounds": 1})
    *_, summary, selected, deployed = [re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage()) for record in caplog.records]
    title, header, *rows = summary.splitlines()
    assert title == "summary (selected: the phase best on valid ndcg@10; deployed: the model after the last phase)"
    assert re.split(r"\s{2,}", header.strip()) == [
        "phase", "valid ndcg@10", "test ndcg@10", "test recall@10", "test mrr@10", "vs cloud-only",
    ]
    base = result["cloud_only"]["test"]["ndcg@10"]
    labels = {"cloud_only": "cloud-only", "dccl_cloud": "DCCL cloud (selected)", "deployed_cloud": "DCCL cloud (deployed)",
              "dccl_device": "DCCL device (selected)", "deployed_device": "DCCL device (deployed)"}
    for row, (key, label) in zip(rows, labels.items(), strict=True):
        reading = result[key]
        change = "" if key == "cloud_only" else f"{100 * (reading['test']['ndcg@10'] / base - 1):+.1f}%"
        expected = [label, f"round {reading['round']} {reading['phase']}", f"{reading['valid']['ndcg@10']:.4f}",
                    *(f"{reading['test'][name]:.4f}" for name in ("ndcg@10", "recall@10", "mrr@10")), change]
        assert re.split(r"\s{2,}", row.strip()) == [cell for cell in expected if cell]
        assert len(row) == len(header) or key == "cloud_only"  # aligned: the change right-aligned under its head
    files = reading_files(result["saved_files"]["selected"]["path"])
    assert re.fullmatch(r"DCCL-.*-[0-9a-f]{6}\.pth", os.path.basename(files["selected"]))
    for line, reading, key in ((selected, "selected", "dccl_device"), (deployed, "deployed", "deployed_device")):
        where = {"round": result[key]["round"], "phase": result[key]["phase"]}
        assert result["saved_files"][reading] == {**where, "path": files[reading]}
        assert line == f"{reading} model (round {where['round']} {where['phase']}) saved to {files[reading]}"
        assert os.path.dirname(files[reading]) == tiny_config["checkpoint_dir"] and os.path.isfile(files[reading])


def phases(result):
    return [(entry["round"], entry["phase"]) for entry in result["history"]]


def test_cloud_method_data_is_model_over_data(tiny_config):
    """cloud_method: data ignores distill_weight: step 1 is plain CE, as with distill_weight 0."""

    def cloud_after_step_1(settings):
        config, (train_data, _, _), model, trainer = build({**tiny_config, **settings})
        with torch.no_grad():
            model.uploaded_metapatch.normal_(generator=torch.Generator().manual_seed(0))
        trainer.start_round(RoundSchedule(config, train_data), 1)
        torch.manual_seed(5)
        trainer.momodistill(1)  # its teachers: the model as it is now
        return model.backbone.state_dict()

    data = cloud_after_step_1({"cloud_method": "data"})
    zero = cloud_after_step_1({"distill_weight": 0.0})
    distilled = cloud_after_step_1({})
    assert all(torch.equal(data[name], zero[name]) for name in data)
    assert not all(torch.equal(data[name], distilled[name]) for name in data)


def test_device_method_none_has_no_device_models(tiny_config):
    result = run_recbole_dccl(model="DCCL", dataset="tiny", config_dict={**tiny_config, "device_method": "none"}, verbose=False)
    assert phases(result) == [(0, "cloud"), (1, "momodistill")]
    assert all(entry["device"] == entry["cloud"] for entry in result["history"])
    assert result["dccl_device"] == result["dccl_cloud"]


@pytest.mark.parametrize(
    "fixture, overrides", [("tiny_config", {}), ("tiny_config", {"device_method": "patch"}), ("implicit_config", {})]
)
def test_device_view_without_patches_is_scored_as_the_cloud_view(request, fixture, overrides):
    config, (train_data, valid_data, test_data), model, trainer = build({**request.getfixturevalue(fixture), **overrides})
    evaluated = []  # (phase index, view, whether any device holds a patch or the memory has weights)
    score_view = trainer.score_view

    def counted(view):
        evaluated.append((len(trainer.record.history), view, not trainer._device_view_is_cloud()))
        return score_view(view)

    trainer.score_view = counted
    trainer.fit(train_data, valid_data, saved=False, test_data=test_data)
    devices = [(index, has_patch) for index, view, has_patch in evaluated if view == "device"]
    assert devices and all(has_patch for _, has_patch in devices)
    assert 0 not in [index for index, _ in devices]
    assert trainer.report["history"][0]["device"] == trainer.report["history"][0]["cloud"]
    # What it rests on: with every metapatch and the memory's weights zero, evaluating the device view gives the cloud
    # view's scores exactly.
    model.metapatch.zero_()
    model.memory.weights.zero_()
    assert score_view("device") == score_view("cloud")


def test_device_method_patch_trains_per_user_patch_weights(tiny_config):
    config, (train_data, valid_data, test_data), model, trainer = build({**tiny_config, "device_method": "patch"})
    dim, rank = tiny_config["hidden_size"], tiny_config["patch_rank"]
    assert model.metapatch.shape == (train_data.dataset.user_num, 2 * dim * rank)
    trainer.fit(train_data, valid_data, saved=False, test_data=test_data)
    assert os.listdir(tiny_config["checkpoint_dir"]) == [] and trainer.saved_files == {}  # saved=False writes nothing
    assert phases(trainer.report) == [(0, "cloud"), (1, "device"), (1, "momodistill"), (1, "shared")]
    assert (model.uploaded_metapatch != 0).any(dim=1).sum() > 0  # some devices adopted their own patch


def test_best_views_carry_per_user_test_values(tiny_config):
    result = run_recbole_dccl(model="DCCL", dataset="tiny", config_dict=tiny_config, verbose=False)
    for view in ("cloud_only", "dccl_cloud", "dccl_device"):
        users = result[view]["test_users"]
        assert len(users["users"]) == len(set(users["users"])) == 30
        for metric in ("ndcg@10", "hit@10", "mrr@10"):
            assert sum(users[metric]) / len(users[metric]) == pytest.approx(result[view]["test"][metric], abs=1e-4)
    assert all("test_users" not in entry["cloud"] for entry in result["history"])


def test_shared_cloud_checkpoint_is_reused_and_checked(tiny_config, tmp_path):
    cloud = str(tmp_path / "cloud.pth")
    first = run_recbole_dccl(model="DCCL", dataset="tiny", config_dict={**tiny_config, "cloud_checkpoint": cloud}, verbose=False)
    assert os.path.isfile(cloud)
    again = run_recbole_dccl(
        model="DCCL", dataset="tiny", config_dict={**tiny_config, "cloud_checkpoint": cloud, "device_epochs": 1}, verbose=False
    )
    assert again["cloud_only"] == first["cloud_only"]
    with pytest.raises(ValueError, match="cloud_checkpoint: .* other settings"):
        run_recbole_dccl(model="DCCL", dataset="tiny", config_dict={**tiny_config, "cloud_checkpoint": cloud, "rounds": 3}, verbose=False)


@pytest.mark.parametrize("backbone, refused", [("DeepFM", False), ("DIN", True), ("GRU4Rec", True)])
def test_cloud_checkpoint_depends_on_history_length_only_where_items_have_a_history(ctr_config, tmp_path, backbone, refused):
    cloud = str(tmp_path / "cloud.pth")
    run_recbole_dccl(model="DCCL", dataset="tiny", config_dict={**ctr_config, "backbone": backbone, "cloud_checkpoint": cloud}, verbose=False)
    *_, longer = build({**ctr_config, "backbone": backbone, "MAX_ITEM_LIST_LENGTH": 12})
    if refused:
        with pytest.raises(InputError, match=r"cloud_checkpoint: .*'MAX_ITEM_LIST_LENGTH': \(8, 12\)"):
            longer.load_cloud(cloud)
    else:
        longer.load_cloud(cloud)
        saved = torch.load(cloud, weights_only=True)["state_dict"]
        assert all(torch.equal(longer.model.state_dict()[name], value) for name, value in saved.items())


def test_plain_recbole_model_runs_through_the_same_entry_point(tiny_config):
    result = run_recbole_dccl(model="SASRec", dataset="tiny", config_dict=tiny_config, verbose=False)
    assert 0.0 <= result["test_result"]["ndcg@10"] <= 1.0


def test_short_run_on_ml_100k(tmp_path, monkeypatch):
    """The real dataset RecBole ships: one short DCCL round end to end, profiles from ml-100k.user included."""
    monkeypatch.chdir(tmp_path)
    settings = {
        "embedding_size": 16, "hidden_size": 16, "MAX_ITEM_LIST_LENGTH": 5, "epochs": 1, "train_batch_size": 4096,
        "device_epochs": 1, "shared_epochs": 1, "show_progress": False, "checkpoint_dir": str(tmp_path / "saved"),
    }
    result = run_recbole_dccl(model="DCCL", dataset="ml-100k", config_dict=settings, verbose=False)
    first = result["history"][1]
    assert first["phase"] == "device"
    assert result["cloud_only"]["test"]["ndcg@10"] > 0
    assert all(0 <= result[view]["test"]["hit@10"] <= 1 for view in ("cloud_only", "dccl_cloud", "dccl_device"))


def test_devices_can_train_on_every_row_their_user_produced(tiny_config):
    settings = {**tiny_config, "rounds": 1, "device_data": "all", "device_epochs": 1}
    config, (train_data, valid_data, test_data), _, trainer = build(settings)
    trainer.fit(train_data, valid_data, saved=True, test_data=test_data)
    assert phases(trainer.report) == [(0, "cloud"), (1, "device"), (1, "momodistill"), (1, "shared")]
    # every user trained on its round-0 rows too: each user's device has a metapatch of its own (in the deployed
    # model: selection on valid may keep round 0, where no device has one)
    deployed = torch.load(reading_files(trainer.saved_model_file)["deployed"], weights_only=True)["state_dict"]
    assert (deployed["uploaded_metapatch"][1:] != 0).any(dim=1).float().mean() > 0
    assert len(RoundSchedule(config, train_data).local_rows(1)) == len(train_data.dataset)
