"""A trained model used as RecBole users use theirs: load_data_and_model, full_sort_topk, and the recommend command."""

import re

import pytest
import torch
from recbole.utils.case_study import full_sort_topk

from recbole_dccl.errors import InputError
from recbole_dccl.quick_start import load_data_and_model
from recbole_dccl.recommend import main
from tests.conftest import TINY_SETTINGS, write_dataset
from tests.helpers import build


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny DCCL model trained and saved: ``(model in memory, its test data, checkpoint path)``."""
    folder = tmp_path_factory.mktemp("recommend")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        settings = {**TINY_SETTINGS, "data_path": write_dataset(str(folder / "data")), "checkpoint_dir": str(folder / "saved")}
        _, (train_data, valid_data, test_data), model, trainer = build(settings)
        trainer.fit(train_data, valid_data, saved=True, test_data=test_data)
        yield model, test_data, trainer.saved_model_file


def top_k(model, view, users, test_data):
    model.view = view
    return full_sort_topk(users, model, test_data, k=5)[1]


def test_loaded_dccl_model_ranks_as_trained_in_both_views(trained):
    trained_model, trained_test_data, model_file = trained
    config, model, dataset, _, _, test_data = load_data_and_model(model_file)
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


def test_loaded_plain_model_ranks_as_trained(tiny_config):
    _, (train_data, valid_data, test_data), trained_model, trainer = build(tiny_config, model="GRU4Rec")
    trainer.fit(train_data, valid_data, saved=True)
    _, model, dataset, _, _, loaded_test_data = load_data_and_model(trainer.saved_model_file)
    trained_model.load_state_dict(torch.load(trainer.saved_model_file, weights_only=True)["state_dict"])  # best epoch
    users = torch.arange(1, dataset.user_num).numpy()
    expected = full_sort_topk(users, trained_model, test_data, k=5)
    assert torch.equal(full_sort_topk(users, model, loaded_test_data, k=5)[1], expected[1])


def test_recommend_prints_device_beside_cloud(trained, capsys):
    model, _, model_file = trained
    adopted = [str(uid) for uid in range(1, len(model.metapatch)) if model.uploaded_metapatch[uid].any()]
    users = f"{adopted[0]},1" if adopted[0] != "1" else "1,2"  # the tiny dataset's tokens are its ids
    assert main([f"--model_file={model_file}", f"--users={users}", "--k=3", "--item_field=release_year"]) == 0
    printed = capsys.readouterr().out.split("\n\n")
    assert len(printed) == 2
    first = printed[0].splitlines()
    assert first[0].startswith(f"user {users.split(',')[0]}  (metapatch norm ") and first[0].endswith("adopted its patch: yes)")
    assert first[1].split() == ["rank", "device", "cloud"]
    assert len(first) == 2 + 3
    rank, device_item, device_year, cloud_item, cloud_year = first[2].split()
    assert rank == "1" and 1990 <= int(device_year) <= 1996 and 1990 <= int(cloud_year) <= 1996


@pytest.mark.parametrize(
    "argument, message",
    [
        ("--users=1,nobody,77", r"users: \['nobody', '77'\] not in dataset \[tiny\]; give user tokens as in its files, e\.g\. 1, 2, 3"),
        ("--item_field=title", r"item_field: \[title\] is not a field of .*tiny\.item\]; it must be one of \['release_year', 'class'\]"),
        ("--k=0", r"k: \[0\] must be an integer from 1 to 40"),
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
    _, model, _, _, _, loaded_test_data = load_data_and_model(trainer.saved_model_file, verbose=False)
    batch = next(iter(loaded_test_data))[0]
    trained_model.eval(), model.eval()
    with torch.no_grad():
        assert torch.equal(model.predict(batch), trained_model.predict(batch))
    assert main([f"--model_file={trainer.saved_model_file}", "--users=1"]) == 2
    assert "is evaluated on labelled rows (eval_args mode: {'valid': 'labeled', 'test': 'labeled'})" in capsys.readouterr().err
