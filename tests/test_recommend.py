"""A trained model used as RecBole users use theirs: load_data_and_model, full_sort_topk, and the recommend command."""

import os
import re
import shutil

import pytest
import torch
from recbole.utils.case_study import full_sort_topk

from recbole_dccl.errors import InputError
from recbole_dccl.quick_start import load_data_and_model
from recbole_dccl.recommend import main
from recbole_dccl.trainer.checkpoint import READINGS, reading_files
from tests.conftest import TINY_SETTINGS, write_dataset
from tests.helpers import build


# Devices that adopt their patch on the tiny data (the device-side defaults of properties/model/DCCL.yaml, given
# here so that the tests do not depend on it), and a step 2 that moves the encoder's metapatch far enough from zero
# to change some device lists: the deployed model (round 1 shared) then differs from the selected one (round 1 device).
ADOPTING = {"device_data": "all", "metapatch_dim": 64, "device_learning_rate": 0.01, "device_epochs": 10,
            "shared_learning_rate": 0.01, "shared_epochs": 2,
            "device_memory": False}  # patches alone: the memory would change every user's device view


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny DCCL model trained and saved: ``(model in memory, its test data, selected model's file)``; the model
    in memory is the selected one, as RecBole leaves a trainer's model at its best epoch."""
    folder = tmp_path_factory.mktemp("recommend")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        settings = {**TINY_SETTINGS, **ADOPTING, "data_path": write_dataset(str(folder / "data")),
                    "checkpoint_dir": str(folder / "saved")}
        _, (train_data, valid_data, test_data), model, trainer = build(settings)
        trainer.fit(train_data, valid_data, saved=True, test_data=test_data)
        yield model, test_data, trainer.saved_model_file


def top_k(model, view, users, test_data, k=5):
    model.view = view
    return full_sort_topk(users, model, test_data, k=k)[1]


def test_both_readings_are_saved_and_either_file_leads_to_both(trained):
    trained_model, _, model_file = trained
    files = reading_files(model_file)
    assert files["deployed"] == model_file[: -len(".pth")] + "-deployed.pth"
    checkpoints = {reading: torch.load(path, weights_only=True) for reading, path in files.items()}
    for reading, checkpoint in checkpoints.items():
        assert checkpoint["reading"] == reading
        assert checkpoint["reading_files"] == {name: os.path.basename(path) for name, path in files.items()}
    assert [(c["round"], c["phase"]) for c in checkpoints.values()] == [(1, "device"), (1, "shared")]
    selected, deployed = (checkpoints[reading]["state_dict"] for reading in READINGS)
    assert all(torch.equal(selected[name], value) for name, value in trained_model.state_dict().items())
    assert not torch.equal(deployed["metapatch"], selected["metapatch"])  # step 2 gave every device the encoder's

    for path in files.values():
        for reading in READINGS:
            _, model, *_ = load_data_and_model(path, verbose=False, reading=reading)
            state = checkpoints[reading]["state_dict"]
            assert all(torch.equal(model.state_dict()[name], value) for name, value in state.items()), (path, reading)
    _, model, *_ = load_data_and_model(model_file, verbose=False)  # by default, what the devices run at the end
    assert torch.equal(model.metapatch, deployed["metapatch"])


def test_a_missing_file_of_the_run_is_refused_naming_it(trained, tmp_path):
    _, _, model_file = trained
    alone = str(tmp_path / os.path.basename(model_file))
    shutil.copy(model_file, alone)
    missing = os.path.join(str(tmp_path), os.path.basename(reading_files(model_file)["deployed"]))
    message = (rf"model_file: \[{re.escape(alone)}\] is the selected model of its run, "
               rf"and its deployed model \[{re.escape(missing)}\] is missing")
    with pytest.raises(InputError, match=message):
        load_data_and_model(alone)


def test_loaded_dccl_model_ranks_as_trained_in_both_views(trained):
    trained_model, trained_test_data, model_file = trained
    config, model, dataset, _, _, test_data = load_data_and_model(model_file, reading="selected")
    assert model.view == "device"
    users = torch.arange(1, dataset.user_num).numpy()
    device, cloud = top_k(model, "device", users, test_data), top_k(model, "cloud", users, test_data)
    assert torch.equal(device, top_k(trained_model, "device", users, trained_test_data))
    assert torch.equal(cloud, top_k(trained_model, "cloud", users, trained_test_data))

    adopted = (model.uploaded_metapatch[users] != 0).any(dim=1)
    patched = (model.metapatch[users] != 0).any(dim=1)
    differs = (device != cloud).any(dim=1)
    assert adopted.any() and not adopted.all()
    assert differs[patched].any()  # a patched user's device model recommends other items than the cloud model
    assert not differs[~patched].any()  # without a patch, the device view is the cloud model


def test_loaded_plain_model_ranks_as_trained(tiny_config, capsys):
    _, (train_data, valid_data, test_data), trained_model, trainer = build(tiny_config, model="GRU4Rec")
    trainer.fit(train_data, valid_data, saved=True)
    _, model, dataset, _, _, loaded_test_data = load_data_and_model(trainer.saved_model_file)
    trained_model.load_state_dict(torch.load(trainer.saved_model_file, weights_only=True)["state_dict"])  # best epoch
    users = torch.arange(1, dataset.user_num).numpy()
    expected = full_sort_topk(users, trained_model, test_data, k=5)
    assert torch.equal(full_sort_topk(users, model, loaded_test_data, k=5)[1], expected[1])

    # One model, no readings to choose from.
    message = r"reading: \[deployed\] applies to a DCCL run's checkpoints; \[.*\] holds one model \(model GRU4Rec, no"
    with pytest.raises(InputError, match=message):
        load_data_and_model(trainer.saved_model_file, reading="deployed")
    assert main([f"--model_file={trainer.saved_model_file}", "--users=1", "--reading=selected"]) == 2
    assert re.search(r"recommend: error: reading: \[selected\] applies to a DCCL run's", capsys.readouterr().err)


def test_recommend_shows_the_deployed_model_by_default(trained, capsys):
    """An adopted user whose device list is not the cloud's, as the deployed model ranks them."""
    _, _, model_file = trained
    _, model, dataset, _, _, test_data = load_data_and_model(model_file, verbose=False, reading="deployed")
    users = torch.arange(1, dataset.user_num).numpy()
    device, cloud = top_k(model, "device", users, test_data, k=3), top_k(model, "cloud", users, test_data, k=3)
    adopted = model.uploaded_metapatch[users].any(dim=1)
    index = int(torch.nonzero(adopted & (device != cloud).any(dim=1))[0])
    token = str(users[index])  # the tiny dataset's user tokens are its ids
    assert main([f"--model_file={model_file}", f"--users={token}", "--k=3", "--item_field=release_year"]) == 0
    header, user = capsys.readouterr().out.strip().split("\n\n")
    assert header == (
        f"deployed model (round 1 shared): {int(adopted.sum())} of 30 devices adopted their patch; "
        "after step 2 every device runs the auxiliary encoder's metapatch"
    )
    lines = user.splitlines()
    assert lines[0].startswith(f"user {token}  (metapatch norm ") and lines[0].endswith("adopted its patch: yes)")
    assert lines[1].split() == ["rank", "device", "cloud"]
    ranks = [line.split() for line in lines[2:]]  # rank, device item, its year, cloud item, its year
    assert [rank[0] for rank in ranks] == ["1", "2", "3"]
    assert all(1990 <= int(rank[2]) <= 1996 and 1990 <= int(rank[4]) <= 1996 for rank in ranks)
    assert [rank[1] for rank in ranks] == list(dataset.id2token(dataset.iid_field, device[index]))
    assert [rank[3] for rank in ranks] == list(dataset.id2token(dataset.iid_field, cloud[index]))
    assert [rank[1] for rank in ranks] != [rank[3] for rank in ranks]


def test_recommend_on_the_selected_model_names_its_phase(trained, capsys):
    model, _, model_file = trained
    deployed_file = reading_files(model_file)["deployed"]
    assert main([f"--model_file={deployed_file}", "--users=1", "--k=3", "--reading=selected"]) == 0
    adopted = int(model.uploaded_metapatch[1:].any(dim=1).sum())
    header = capsys.readouterr().out.split("\n\n")[0]
    assert header == f"selected model (round 1 device): {adopted} of 30 devices adopted their patch"


@pytest.mark.parametrize(
    "argument, message",
    [
        ("--users=1,nobody,77", r"users: \['nobody', '77'\] not in dataset \[tiny\]; give user tokens as in its files, e\.g\. 1, 2, 3"),
        ("--item_field=title", r"item_field: \[title\] is not a field of .*tiny\.item\]; it must be one of \['release_year', 'class'\]"),
        ("--k=0", r"k: \[0\] must be an integer from 1 to 40"),
        ("--reading=best", r"reading: \[best\] is not one of selected, deployed\."),
    ],
)
def test_recommend_refuses_bad_input_naming_it(trained, capsys, argument, message):
    _, _, model_file = trained
    assert main([f"--model_file={model_file}", "--users=1", argument]) == 2  # the last --users counts
    assert re.search(f"recommend: error: {message}", capsys.readouterr().err)


def test_load_refuses_a_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"model_file: \[.*missing.pth\] cannot be read as a checkpoint: FileNotFoundError"):
        load_data_and_model(str(tmp_path / "missing.pth"))


def test_ctr_models_load_and_are_refused_a_full_sort_top_k(ctr_config, capsys):
    _, (train_data, valid_data, test_data), trained_model, trainer = build({**ctr_config, "epochs": 1})
    trainer.fit(train_data, valid_data, saved=True, test_data=test_data)
    _, model, _, _, _, loaded_test_data = load_data_and_model(trainer.saved_model_file, verbose=False, reading="selected")
    batch = next(iter(loaded_test_data))[0]
    trained_model.eval(), model.eval()
    with torch.no_grad():
        assert torch.equal(model.predict(batch), trained_model.predict(batch))
    assert main([f"--model_file={trainer.saved_model_file}", "--users=1"]) == 2
    assert "is evaluated on labelled rows (eval_args mode: {'valid': 'labeled', 'test': 'labeled'})" in capsys.readouterr().err
