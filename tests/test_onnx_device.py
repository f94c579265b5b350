"""The device side on ONNX Runtime (docs/deployment.md, "On ONNX Runtime"): ``export --format=onnx`` and the
``dccl_device`` package, which scores and trains a metapatch with onnxruntime and numpy alone.

These tests need the optional extra ``device`` (onnx, onnxscript, onnxruntime-training-cpu). CI installs it
(``.ci/run``: ``pip install ".[test,device]"``), so there they run; the skip below only spares a core install.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime.training", reason="the 'device' extra is not installed: pip install '.[device]'")

from dccl_device.files import load_arrays  # noqa: E402
from dccl_device.scoring import Scorer  # noqa: E402
from dccl_device.training import OnDeviceTraining, train_metapatch  # noqa: E402
from dccl_device.upload import encode  # noqa: E402
from recbole_dccl.export import export, user_file  # noqa: E402
from recbole_dccl.rounds import RoundSchedule  # noqa: E402
from recbole_dccl.trainer.device_phase import LocalData, device_settings, personalise  # noqa: E402
from tests.helpers import build  # noqa: E402

# On-device training against the batched phase: both float32 Adam on the same minibatches; the gradients agree to
# the last bits (ONNX Runtime's gradient graph sums in its own order), which Adam's normalisation can enlarge.
# Measured on these tiny data: at most 6.6e-7 over all 30 devices (DeepFM; GRU4Rec, SASRec 1.8e-7; DIN 1.2e-7).
TRAINING_TOLERANCE = 1e-5
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def exported(config_dict, out):
    """A model with personalised (random) metapatches, saved as a checkpoint and exported with ``--format=onnx
    --local_data``; returns ``(config, train_data, test_data, model, manifest)``."""
    config, (train_data, _, test_data), model, trainer = build(config_dict)
    with torch.no_grad():
        model.metapatch.normal_(0, 0.5)
        if model.memory is not None:
            model.memory.weights.copy_(torch.tensor([0.5, 0.3, -0.2]))  # as if fitted
            model.memory.gate.fill_(0.5)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm1d):  # statistics as if trained (DIN), not 0 and 1
                module.running_mean.normal_(0, 0.5)
                module.running_var.uniform_(0.5, 2)
    trainer._save_checkpoint(0, verbose=False)
    manifest = export(trainer.saved_model_file, out, format="onnx", local_data=True)
    return config, train_data, test_data, model, manifest


@pytest.mark.parametrize(
    "backbone", ["GRU4Rec", "SASRec", "DeepFM", "DIN", "DeepFM-implicit", "GRU4Rec-memory", "DeepFM-memory"]
)
def test_onnx_device_scores_and_trains_as_the_pytorch_device_phase(tiny_config, backbone, tmp_path):
    settings = {"backbone": backbone.split("-")[0], "device_l2": 0.01, "device_memory": backbone.endswith("memory")}
    if backbone in ("DeepFM", "DIN", "DeepFM-memory"):
        settings.update(load_col=None, mlp_hidden_size=[8, 8])  # CTR: every field loaded, ratings give the labels
    if backbone == "DeepFM-implicit":  # no rating loaded: sampled negatives, each device holding out 2 rows per interaction
        settings.update(mlp_hidden_size=[8, 8])
    out = str(tmp_path / "export")
    config, train_data, test_data, model, manifest = exported({**tiny_config, **settings}, out)
    dataset = train_data.dataset
    model.eval()

    # Scoring: the ONNX model, given users' metapatch files, is the PyTorch device view; one row per device as a
    # device scores, and the whole batch at once (the batch size is an input, not fixed at export).
    scorer = Scorer(os.path.join(out, "device_model.onnx"))
    batch, _, _, _ = next(iter(test_data))
    if model.memory is not None:  # what a device computes from its own history
        model.memory.complete(batch)
    tokens = dataset.id2token(dataset.uid_field, batch[dataset.uid_field].numpy())
    files = [user_file(os.path.join(out, "metapatch"), token) for token in tokens]
    metapatch = np.stack([load_arrays(file)["metapatch"] for file in files])
    features = {name: batch[name].numpy() for name in scorer.features}
    model.view = "device"
    with torch.no_grad():
        expected = model(batch, model.view_metapatch(batch)).numpy()
    assert np.abs(expected).max() > 0
    for row, row_metapatch in enumerate(metapatch):
        scores = scorer(row_metapatch, {name: values[row : row + 1] for name, values in features.items()})
        assert np.abs(scores - expected[row : row + 1]).max() < 1e-5
    scores = scorer.session.run(None, {"metapatch": metapatch, **features})[0]
    assert scores.shape == expected.shape
    assert np.abs(scores - expected).max() < 1e-5

    # Training: each device's phase on ONNX Runtime keeps the metapatch the batched phase gives that device.
    phase_settings = device_settings(config)
    schedule = RoundSchedule(config, train_data)
    local = LocalData.from_rows(schedule.training_rows(schedule.local_rows(1), 1), phase_settings.valid_size, "cpu")
    start = model.metapatch[local.users]
    seed = 7
    batched = personalise(model, local, start, phase_settings, seed)
    keys = local.shuffle_keys(phase_settings.epochs, seed)
    folder = os.path.join(out, "device_training")
    for device, token in enumerate(dataset.id2token(dataset.uid_field, local.users.numpy())):
        data = load_arrays(user_file(os.path.join(out, "local_data"), token))
        own = torch.nonzero(local.owner == device).squeeze(1)
        assert (data[dataset.iid_field] == local.interaction[dataset.iid_field][own].numpy()).all()
        trained = train_metapatch(folder, start[device].numpy(), data, keys[:, own].numpy())
        assert np.abs(trained.metapatch - batched.metapatch[device].numpy()).max() < TRAINING_TOLERANCE
        assert trained.adopted == bool(batched.adopted[device])
        assert trained.valid_loss_kept == pytest.approx(float(batched.valid_loss_device[device]), abs=1e-5)
    assert batched.adopted.any() and not batched.adopted.all()  # both ways of the guard are compared
    assert not OnDeviceTraining(folder).metapatch.any()  # the artifacts hold no user's metapatch

    with open(os.path.join(folder, "settings.json")) as file:
        inputs = json.load(file)["inputs"]
    assert inputs == [*manifest["inputs"][1:], model.objective.target_field, "metapatch_start", "l2"]
    sizes = manifest["bytes"]
    assert sizes["device_model_file"] == os.path.getsize(os.path.join(out, "device_model.onnx"))
    assert sizes["device_training_files"] > sizes["backbone"] + sizes["theta"]  # the checkpoint holds W_f and Theta


def run_on_device(command, folder):
    """``python -m dccl_device <command>`` in ``folder`` on a device without torch: any import of it fails
    (onnxruntime itself then skips its optional torch parts)."""
    code = "import sys; sys.modules['torch'] = None; from dccl_device.__main__ import main; "
    code += f"sys.exit(main({command!r}))"
    return subprocess.run([sys.executable, "-c", code], cwd=folder, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT})


def test_device_command_line_runs_without_torch(tiny_config, tmp_path):
    out = str(tmp_path / "export")
    _, train_data, _, _, _ = exported({**tiny_config, "upload_dtype": "int8"}, out)
    token = train_data.dataset.id2token("user_id", [1])[0]
    metapatch, data = (user_file(os.path.join(out, folder), token) for folder in ("metapatch", "local_data"))
    commands = [
        ["score", f"--model={out}/device_model.onnx", f"--metapatch={metapatch}", f"--data={data}", "--out=scores.npz"],
        ["train", f"--artifacts={out}/device_training", f"--metapatch={metapatch}", f"--data={data}", "--out=kept.npz",
         "--upload=upload.npz"],
    ]
    for command in commands:
        done = run_on_device(command, tmp_path)
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["peak_rss_bytes"] >= report["peak_rss_after_imports_bytes"] > 0
    wrong_data = run_on_device([*commands[1][:3], f"--data={metapatch}", "--out=kept.npz"], tmp_path)
    assert wrong_data.returncode == 2
    missing = "item_id_list, item_length, dccl_memory_items, dccl_memory_values, item_id"
    assert f"[{metapatch}] has no array {missing}; it holds: metapatch" in wrong_data.stderr

    # What the commands wrote is what the library gives (train: its default order, from seed 0).
    start, arrays = load_arrays(metapatch)["metapatch"], load_arrays(data)
    scores = Scorer(os.path.join(out, "device_model.onnx"))(start, arrays)
    assert np.array_equal(load_arrays(str(tmp_path / "scores.npz"))["scores"], scores)
    trained = train_metapatch(os.path.join(out, "device_training"), start, arrays)
    assert np.array_equal(load_arrays(str(tmp_path / "kept.npz"))["metapatch"], trained.metapatch)
    # What it sends the cloud: the format the export's settings name, as the simulated fleet encodes it.
    sent = load_arrays(str(tmp_path / "upload.npz"))
    expected = encode(trained.metapatch[None], "int8")
    assert sent.keys() == expected.keys() and all(np.array_equal(sent[key], expected[key]) for key in expected)
    assert report["upload_dtype"] == "int8" and report["upload_bytes"] == len(trained.metapatch) + 4
