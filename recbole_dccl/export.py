"""Export what the devices run: the shared device model and each user's metapatch.

    python -m recbole_dccl.export --checkpoint=saved/DCCL-Nov-21-2026_10-00-00.pth --out=export

From a DCCL checkpoint (saved/) this writes

- ``device_model.pt2``: the shared device model (cloud backbone W_f, the patch machinery and Theta) as a
  ``torch.export`` program. Inputs: the user's metapatch ``[B, k]`` and the backbone's own inputs (for sequential
  backbones ``item_id_list`` ``[B, L]`` and ``item_length`` ``[B]``); output: scores over all items ``[B, n_items]``,
  the backbone's ``full_sort_predict``. Every device downloads the same file.
- ``metapatch/<user token>.npz``: each user's metapatch (array ``metapatch``, ``[k]`` float32), the only per-user
  part of a device model.
- ``manifest.json``: the inputs and the byte counts of docs/deployment.md: ``metapatch`` (what a device uploads and
  downloads per round, raw), ``metapatch_file``, ``theta`` and ``backbone`` (raw parameters), ``device_model_file``
  (what every device downloads), ``per_user_model_copy`` (W_f plus one user's generated patch weights: what each
  device would need without the shared model) and the totals over all users of both ways.

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

from recbole_dccl.errors import InputError
from recbole_dccl.quick_start import load_data_and_model
from recbole_dccl.trainer.checkpoint import load_safe, write_atomic


def load_dccl(checkpoint_path):
    """``(config, train_data, test_data, model)`` of a DCCL checkpoint of :mod:`trainer.checkpoint`, on the CPU."""
    stored = load_safe(checkpoint_path, "checkpoint").get("config", {})
    if stored.get("model") != "DCCL":
        raise InputError(f"checkpoint: [{checkpoint_path}] is not a DCCL checkpoint (model: {stored.get('model')!r}).")
    if stored.get("device_method", "metapatch") != "metapatch":
        raise InputError(
            f"checkpoint: [{checkpoint_path}] has device_method [{stored['device_method']}]; "
            "only device_method 'metapatch' models are exported."
        )
    config, model, _, train_data, _, test_data = load_data_and_model(checkpoint_path)
    return config, train_data, test_data, model.cpu().eval()


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
    """The shared device model as a plain module: ``forward(metapatch, *fields)`` -> scores over all items.

    Only the backbone and the patches are its submodules, so the exported program holds W_f and Theta and nothing
    else of the cloud's model: not the encoder, not any other user's metapatch."""

    def __init__(self, model, fields):
        super().__init__()
        self.backbone, self.patches = model.backbone, model.patches
        self.score = model.forward  # a bound method, not a submodule
        self.fields = list(fields)

    def forward(self, metapatch, *inputs):
        interaction = Interaction(dict(zip(self.fields, inputs)))
        interaction.length = metapatch.shape[0]  # RecBole's max() over fields is opaque to torch.export's shape solver
        return self.score(interaction, metapatch)


def backbone_fields(model, interaction):
    """The fields of ``interaction`` the backbone reads to score it (the device model's inputs besides the metapatch)."""
    recorder = ReadFields(interaction)
    with torch.no_grad():
        model(recorder, torch.zeros(len(interaction), model.metapatch.shape[1]))
    return recorder.read


def export_device_model(model, interaction, path):
    """Write the shared device model as a ``torch.export`` program (batch size dynamic); returns its input names."""
    fields = backbone_fields(model, interaction)
    device_model = DeviceModel(model, fields).eval()
    # Placeholder values of the right shapes and types: the program stores its example inputs, and those must
    # not be some users' data. Two rows, so the batch size stays symbolic.
    inputs = (torch.zeros(2, model.metapatch.shape[1]), *(torch.ones_like(interaction[field][:2]) for field in fields))
    batch = torch.export.Dim("batch", min=1)
    dynamic_shapes = ({0: batch}, tuple({0: batch} for _ in fields))  # (metapatch, inputs)
    program = torch.export.export(device_model, inputs, dynamic_shapes=dynamic_shapes)

    def write(temporary):
        with open(temporary, "wb") as file:  # a file object: torch.export.save warns about names not ending in .pt2
            torch.export.save(program, file)

    write_atomic(path, write)
    return ["metapatch", *fields]


def metapatch_file(folder, token):
    return os.path.join(folder, f"{quote(str(token), safe='')}.npz")


def save_metapatch(path, metapatch):
    def write(temporary):
        with open(temporary, "wb") as file:  # a file object: np.savez would append '.npz' to a name
            np.savez(file, metapatch=metapatch.detach().cpu().numpy().astype(np.float32))

    write_atomic(path, write)


def load_metapatch(path):
    with np.load(path) as data:
        return torch.from_numpy(data["metapatch"])


def tensor_bytes(tensors):
    return int(sum(tensor.numel() * tensor.element_size() for tensor in tensors))


def export(checkpoint_path, out):
    """Write the device model, every user's metapatch and ``manifest.json`` to ``out``; returns the manifest."""
    config, train_data, test_data, model = load_dccl(checkpoint_path)
    dataset = train_data.dataset
    batch, _, _, _ = next(iter(test_data))
    model_path = os.path.join(out, "device_model.pt2")
    inputs = export_device_model(model, batch, model_path)

    folder = os.path.join(out, "metapatch")
    users = torch.unique(dataset.inter_feat[dataset.uid_field])
    tokens = dataset.id2token(dataset.uid_field, users.numpy())
    for user, token in zip(users.tolist(), tokens):
        save_metapatch(metapatch_file(folder, token), model.metapatch[user])

    metapatch_bytes = tensor_bytes([model.metapatch[0]])
    metapatch_file_bytes = os.path.getsize(metapatch_file(folder, tokens[0]))
    model_file_bytes = os.path.getsize(model_path)
    per_user_copy = tensor_bytes(model.backbone.parameters()) + generated_patch_bytes(model)
    manifest = {
        "checkpoint": os.path.abspath(checkpoint_path),
        "backbone": config["backbone"],
        "inputs": inputs,
        "output": "scores over all items, [batch, n_items]",
        "users": len(users),
        "metapatch_dim": model.metapatch.shape[1],
        "bytes": {
            "metapatch": metapatch_bytes,
            "metapatch_file": metapatch_file_bytes,
            "theta": tensor_bytes(model.patches.parameters()),
            "backbone": tensor_bytes(model.backbone.parameters()),
            "device_model_file": model_file_bytes,
            "per_user_model_copy": per_user_copy,
            "all_users_shared_model_and_metapatch_files": model_file_bytes + len(users) * metapatch_file_bytes,
            "all_users_per_user_model_copies": len(users) * per_user_copy,
        },
    }

    def write(temporary):
        with open(temporary, "w") as file:
            json.dump(manifest, file, indent=2)

    write_atomic(os.path.join(out, "manifest.json"), write)
    return manifest


def generated_patch_bytes(model):
    """Bytes of one user's patch weights once generated from the metapatch: D (``d x r``) and U (``r x d``) per site."""
    return sum(2 * tensor_bytes([patch.base_down]) for patch in model.patches.values())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a DCCL checkpoint written by run_recbole_dccl.py (saved/)")
    parser.add_argument("--out", default="export", help="folder to write the device model and metapatches to")
    args = parser.parse_args(argv)
    manifest = export(args.checkpoint, args.out)
    print(json.dumps(manifest, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
