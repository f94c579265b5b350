import json
import os
import sys

import pytest
import torch

import recbole_dccl
from recbole_dccl.errors import InputError
from recbole_dccl.export import export, load_metapatch, main, user_file
from recbole_dccl.trainer.checkpoint import reading_files
from tests.helpers import build


def test_exported_device_model_reproduces_device_scores(tiny_config, tmp_path):
    config, (train_data, valid_data, test_data), model, trainer = build(tiny_config)
    trainer.fit(train_data, valid_data, saved=True, test_data=test_data)
    out = str(tmp_path / "export")
    manifest = export(trainer.saved_model_file, out)
    deployed = reading_files(trainer.saved_model_file)["deployed"]  # by default, what the devices run at the end
    assert (manifest["checkpoint"], manifest["reading"]) == (os.path.abspath(deployed), "deployed")
    model.load_state_dict(torch.load(deployed, weights_only=True)["state_dict"])

    program = torch.export.load(os.path.join(out, "device_model.pt2"))
    assert not any(name.startswith(("encoder", "metapatch", "uploaded")) for name in program.state_dict)  # W_f and Theta only
    example_args, _ = program.example_inputs
    assert not example_args[0].any()  # the stored example is a placeholder, not some users' metapatches
    device_model = program.module()
    batch, _, _, _ = next(iter(test_data))
    users = batch["user_id"]
    tokens = train_data.dataset.id2token("user_id", users.numpy())
    metapatch = torch.stack([load_metapatch(user_file(os.path.join(out, "metapatch"), token)) for token in tokens])
    assert metapatch.abs().max() > 0  # the devices are personalised, not the cloud model
    model.eval()
    model.view = "device"
    with torch.no_grad():
        expected = model.full_sort_predict(batch).view(len(batch), -1)
        for rows in (slice(None), slice(0, 3)):  # the batch size is an input, not fixed at export
            scores = device_model(metapatch[rows], *(batch[field][rows] for field in manifest["inputs"][1:]))
            assert (scores - expected[rows]).abs().max() < 1e-5

    assert manifest["inputs"] == ["metapatch", "item_id_list", "item_length", "dccl_memory_items", "dccl_memory_values"]
    assert len(os.listdir(os.path.join(out, "metapatch"))) == manifest["users"] == 30  # no temporary files left
    sizes = manifest["bytes"]
    assert sizes["metapatch"] == 4 * config["metapatch_dim"]
    assert sizes["device_model_file"] == os.path.getsize(os.path.join(out, "device_model.pt2"))
    with open(os.path.join(out, "manifest.json")) as file:
        assert json.load(file) == manifest


def test_export_refuses_a_checkpoint_of_another_model(tmp_path):
    path = str(tmp_path / "gru.pth")
    torch.save({"config": {"model": "GRU4Rec"}, "state_dict": {}}, path)
    with pytest.raises(ValueError, match=r"checkpoint: .*gru.pth\] is not a DCCL checkpoint \(model: 'GRU4Rec'\)"):
        export(path, str(tmp_path / "out"))


def test_export_refuses_a_bad_reading_with_status_2(tmp_path, capsys):
    path = str(tmp_path / "gru.pth")
    torch.save({"config": {"model": "GRU4Rec"}, "state_dict": {}}, path)
    assert main([f"--checkpoint={path}", "--reading=best"]) == 2
    assert "export: error: reading: [best] is not one of selected, deployed." in capsys.readouterr().err
    assert main([f"--checkpoint={path}", "--reading=selected"]) == 2
    assert "export: error: reading: [selected] applies to a DCCL run's checkpoints" in capsys.readouterr().err


def test_export_refuses_an_unknown_format(tmp_path):
    with pytest.raises(InputError, match=r"format: \[tflite\] is not one of torch, onnx"):
        export(str(tmp_path / "any.pth"), str(tmp_path / "out"), format="tflite")


def test_onnx_export_without_the_device_extra_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "recbole_dccl.onnx_export", raising=False)  # imported anew, if it was
    monkeypatch.delattr(recbole_dccl, "onnx_export", raising=False)
    message = r"format: \[onnx\] needs .* 'device' extra \(onnx is not installed\): pip install"
    with pytest.raises(InputError, match=message):
        export(str(tmp_path / "any.pth"), str(tmp_path / "out"), format="onnx")
