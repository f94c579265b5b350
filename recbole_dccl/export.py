"""Export what the devices run: the shared device model and each user's metapatch.

    python -m recbole_dccl.export --checkpoint=saved/DCCL-Nov-21-2026_10-00-00.pth --out=export
    python -m recbole_dccl.export --checkpoint=saved/DCCL-Nov-21-2026_10-00-00.pth --out=export --format=onnx --local_data

From a DCCL checkpoint (saved/) this writes, of the run's deployed model (the model after the last phase, what the
devices run) or with ``--reading=selected`` of the phase that scored best in the device view on valid,

- the shared device model (cloud backbone W_f, the patch machinery and Theta), which every device downloads:
  ``device_model.pt2``, a ``torch.export`` program (``--format=torch``, the default), or ``device_model.onnx`` for
  ONNX Runtime (``--format=onnx``, :mod:`recbole_dccl.onnx_export`). Inputs: the user's metapatch ``[B, k]`` and
  the backbone's own inputs (for sequential backbones ``item_id_list`` ``[B, L]`` and ``item_length`` ``[B]``);
  output: the objective's logits, for sequential backbones scores over all items ``[B, n_items]`` (the
  backbone's ``full_sort_predict``), for CTR backbones one logit per row ``[B]``. The batch size is dynamic. With
  ``device_memory`` the inputs also hold the personal memory's fields (``dccl_memory_items`` ``[B, L]``,
  ``dccl_memory_values`` ``[B, L, 3]``, ``L`` dynamic), which a device computes from its own history.
- with ``--format=onnx`` also ``device_training/``: the artifacts with which ONNX Runtime trains a metapatch on
  the device (package :mod:`dccl_device`).
- ``metapatch/<user token>.npz``: each user's metapatch (array ``metapatch``, ``[k]`` float32), the only per-user
  part of a device model.
- with ``--local_data``, ``local_data/<user token>.npz``: the rows each user's device trains on in round 1 (the
  checkpoint's ``device_data`` key: the round's fresh rows, or all rows so far; one array per input field and the
  target; on implicit data each positive followed by its round-1 negatives), to run :mod:`dccl_device` on
  simulated devices.
- ``manifest.json``: the file read (``checkpoint``) and its ``reading``, the inputs and the byte counts of
  docs/deployment.md: ``metapatch`` (what a device uploads and downloads per round, raw), ``metapatch_file``,
  ``theta`` and ``backbone`` (raw parameters), ``device_model_file`` (what every device downloads; for ONNX also
  ``device_training_files``, what a device that trains downloads besides), ``per_user_model_copy`` (W_f plus one
  user's generated patch weights: what each device would need without the shared model) and the totals over all
  users of both ways.

Every file is written to a temporary name and renamed, so a reader never sees a half-written one; re-running
replaces whole files only.
"""

import argparse
import json
import os
import sys
from urllib.parse import quote

import numpy as np
import torch
from recbole.data.interaction import Interaction
from torch import nn

from dccl_device.files import load_arrays, save_arrays
from recbole_dccl.errors import InputError
from recbole_dccl.files import write_atomic, write_result_file
from recbole_dccl.model.memory import ITEMS, VALUES
from recbole_dccl.quick_start import load_from_checkpoint, read_checkpoint
from recbole_dccl.rounds import RoundSchedule
from recbole_dccl.trainer.device_phase import device_settings

FORMATS = {"torch": "device_model.pt2", "onnx": "device_model.onnx"}  # format -> the device model's file


def load_dccl(checkpoint_path, reading=None):
    """``(source, config, train_data, test_data, model)`` of the model ``reading`` of the DCCL run that wrote
    ``checkpoint_path`` (:func:`~recbole_dccl.quick_start.read_checkpoint`), the model on the CPU; ``source``: the
    manifest's ``checkpoint`` (the file read) and ``reading`` (``None`` for a checkpoint that records none)."""
    path, checkpoint = read_checkpoint(checkpoint_path, reading, key="checkpoint")
    stored = checkpoint.get("config", {})
    if stored.get("model") != "DCCL":
        raise InputError(f"checkpoint: [{checkpoint_path}] is not a DCCL checkpoint (model: {stored.get('model')!r}).")
    if stored.get("device_method", "metapatch") != "metapatch":
        raise InputError(
            f"checkpoint: [{checkpoint_path}] has device_method [{stored['device_method']}]; "
            "only device_method 'metapatch' models are exported."
        )
    config, model, _, train_data, _, test_data = load_from_checkpoint(path, checkpoint)
    source = {"checkpoint": os.path.abspath(path), "reading": checkpoint.get("reading")}
    return source, config, train_data, test_data, model.cpu().eval()


class ReadFields(Interaction):
    """An ``Interaction`` that records which fields are read."""

    def __init__(self, interaction):
        super().__init__(interaction.interaction)
        self.read = []

    def __getitem__(self, index):
        if isinstance(index, str) and index not in self.read:
            self.read.append(index)
        return super().__getitem__(index)


class DeviceModel(nn.Module):
    """The shared device model as a plain module: ``forward(metapatch, *features)`` -> the objective's logits (for
    sequential backbones scores over all items ``[B, n_items]``, for CTR backbones one logit per row ``[B]``).

    Only the backbone, the patches and the personal memory (its three shared weights) are its submodules, so an
    exported program holds W_f and Theta and nothing else of the cloud's model: not the encoder, not any other
    user's metapatch, not anyone's history."""

    def __init__(self, model, fields):
        super().__init__()
        self.backbone, self.patches, self.memory = model.backbone, model.patches, model.memory
        self.score = model.forward  # a bound method, not a submodule
        self.fields = list(fields)
        self.metapatch_dim = model.metapatch.shape[1]

    def forward(self, metapatch, *features):
        interaction = Interaction(dict(zip(self.fields, features)))
        interaction.length = metapatch.shape[0]  # RecBole's max() over fields is opaque to torch.export's shape solver
        return self.score(interaction, metapatch)


def backbone_fields(model, interaction):
    """The fields of ``interaction`` the backbone reads to score it (the device model's inputs besides the metapatch)."""
    recorder = ReadFields(interaction)
    with torch.no_grad():
        model(recorder, torch.zeros(len(interaction), model.metapatch.shape[1]))
    return recorder.read


def device_program(device_model, example):
    """``device_model`` as a ``torch.export`` program, the batch size dynamic. ``example``: rows of its features;
    the program stores its example inputs, and those must not be some users' data, so only their shapes and types
    are used (two rows, so that the batch size stays symbolic)."""
    inputs = (torch.zeros(2, device_model.metapatch_dim), *placeholder_rows(example))
    batch = torch.export.Dim("batch", min=1)
    dynamic_shapes = ({0: batch}, feature_shapes(device_model.fields, batch))  # (metapatch, features)
    return torch.export.export(device_model, inputs, dynamic_shapes=dynamic_shapes)


def feature_shapes(fields, batch):
    """The dynamic dimensions of the device model's ``fields``: the batch (``batch``), and for the personal
    memory's fields also their columns, one per item the user has."""
    own_items = torch.export.Dim("own_items", min=1)
    return tuple({0: batch, 1: own_items} if field in (ITEMS, VALUES) else {0: batch} for field in fields)


def placeholder_rows(tensors):
    return tuple(torch.ones_like(tensor[:2]) for tensor in tensors)


def save_program(program, path):
    def write(temporary):
        with open(temporary, "wb") as file:  # a file object: torch.export.save warns about names not ending in .pt2
            torch.export.save(program, file)

    write_atomic(path, write)


def user_file(folder, token):
    """``<folder>/<user token>.npz``, the token quoted for a file name."""
    return os.path.join(folder, f"{quote(str(token), safe='')}.npz")


def save_metapatch(path, metapatch):
    save_arrays(path, {"metapatch": metapatch.detach().cpu().numpy().astype(np.float32)})


def load_metapatch(path):
    return torch.from_numpy(load_arrays(path)["metapatch"])


def tensor_bytes(tensors):
    return int(sum(tensor.numel() * tensor.element_size() for tensor in tensors))


def export(checkpoint_path, out, format="torch", local_data=False, reading=None):
    """Write the device model in ``format`` (see :data:`FORMATS`), every user's metapatch and ``manifest.json`` to
    ``out``; with ``local_data`` also each user's local data of round 1. ``reading``: which model of the run
    (default deployed). Returns the manifest."""
    if format not in FORMATS:
        raise InputError(f"format: [{format}] is not one of {', '.join(FORMATS)}.")
    onnx_export = onnx_exporter() if format == "onnx" else None  # before any work: its packages are optional
    source, config, train_data, test_data, model = load_dccl(checkpoint_path, reading)
    dataset = train_data.dataset
    batch, _, _, _ = next(iter(test_data))
    complete = model.memory.complete if model.memory is not None else lambda interaction: None
    complete(batch)  # the personal memory's fields: a device computes them from its own history
    device_model = DeviceModel(model, backbone_fields(model, batch)).eval()
    program = device_program(device_model, [batch[field] for field in device_model.fields])
    inputs = ["metapatch", *device_model.fields]
    model_path = os.path.join(out, FORMATS[format])
    file_bytes = {}
    if format == "torch":
        save_program(program, model_path)
    else:
        onnx_export.save_onnx_program(program, inputs, ["scores"], model_path)
        folder = os.path.join(out, "device_training")
        fields = [*device_model.fields, model.objective.target_field]
        example = placeholder_rows([batch[field] for field in fields])
        shapes = lambda batch_dim: feature_shapes(fields, batch_dim)
        onnx_export.export_training_artifacts(
            device_model, model.objective, device_settings(config), example, shapes, folder
        )
        file_bytes["device_training_files"] = sum(
            os.path.getsize(os.path.join(folder, name)) for name in onnx_export.TRAINING_FILES
        )

    folder = os.path.join(out, "metapatch")
    users = torch.unique(dataset.inter_feat[dataset.uid_field])
    tokens = dataset.id2token(dataset.uid_field, users.numpy())
    for user, token in zip(users.tolist(), tokens):
        save_metapatch(user_file(folder, token), model.metapatch[user])
    if local_data:
        schedule = RoundSchedule(config, train_data)
        rows = schedule.training_rows(schedule.local_rows(1), 1)  # with their negatives on implicit data
        fields = [*device_model.fields, model.objective.target_field]
        save_local_data(rows.dataset, np.arange(len(rows)), fields, os.path.join(out, "local_data"), complete)

    metapatch_bytes = tensor_bytes([model.metapatch[0]])
    metapatch_file_bytes = os.path.getsize(user_file(folder, tokens[0]))
    model_file_bytes = os.path.getsize(model_path)
    per_user_copy = tensor_bytes(model.backbone.parameters()) + generated_patch_bytes(model)
    manifest = {
        **source,
        "backbone": config["backbone"],
        "format": format,
        "inputs": inputs,
        "output": model.objective.OUTPUT,
        "users": len(users),
        "metapatch_dim": model.metapatch.shape[1],
        "bytes": {
            "metapatch": metapatch_bytes,
            "metapatch_file": metapatch_file_bytes,
            "theta": tensor_bytes(model.patches.parameters()),
            "backbone": tensor_bytes(model.backbone.parameters()),
            "device_model_file": model_file_bytes,
            **file_bytes,
            "per_user_model_copy": per_user_copy,
            "all_users_shared_model_and_metapatch_files": model_file_bytes + len(users) * metapatch_file_bytes,
            "all_users_per_user_model_copies": len(users) * per_user_copy,
        },
    }
    write_result_file(os.path.join(out, "manifest.json"), manifest)
    return manifest


def onnx_exporter():
    """:mod:`recbole_dccl.onnx_export`, imported only for ``--format=onnx``: its packages are the optional extra
    ``device``."""
    try:
        from recbole_dccl import onnx_export
    except ImportError as error:
        raise InputError(
            f"format: [onnx] needs the optional packages of the 'device' extra ({error.name} is not installed): "
            'pip install ".[device]"'
        ) from None
    return onnx_export


def save_local_data(dataset, rows, fields, folder, complete):
    """Each user's ``rows`` (indices into ``dataset``, in time order, a positive's negatives after it) as
    ``<folder>/<user token>.npz``, one array per field (``complete`` adds those not in the dataset: the personal
    memory's): what that user's device holds, for running the device side on a simulated device."""
    rows = torch.as_tensor(rows)
    user_ids = dataset.inter_feat[dataset.uid_field][rows].numpy()
    users = np.unique(user_ids)
    for user, token in zip(users, dataset.id2token(dataset.uid_field, users)):
        own = dataset[rows[torch.from_numpy(np.flatnonzero(user_ids == user))]]
        complete(own)
        save_arrays(user_file(folder, token), {field: own[field].numpy() for field in fields})


def generated_patch_bytes(model):
    """Bytes of one user's patch weights once generated from the metapatch: D (``d x r``) and U (``r x d``) per site."""
    return sum(2 * tensor_bytes([patch.base_down]) for patch in model.patches.values())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a DCCL checkpoint written by run_recbole_dccl.py (saved/)")
    parser.add_argument("--out", default="export", help="folder to write the device model and metapatches to")
    parser.add_argument("--format", default="torch", choices=FORMATS, help="torch: a torch.export program; onnx: "
                        "ONNX models for ONNX Runtime, scoring and on-device training (the 'device' extra)")
    parser.add_argument("--local_data", action="store_true", help="also write each user's local data of round 1 "
                        "(local_data/<user token>.npz), to run the device side on simulated devices")
    parser.add_argument("--reading", default=None, help="model of the DCCL run: deployed (default, the model after "
                        "the last phase) or selected (the phase best on valid)")
    args = parser.parse_args(argv)
    try:
        manifest = export(args.checkpoint, args.out, args.format, args.local_data, args.reading)
    except InputError as error:
        print(f"export: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(manifest, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
