"""The device artifacts for ONNX Runtime (``python -m recbole_dccl.export --format=onnx``): the shared device model
to score with, and the training artifacts of ``onnxruntime-training`` to train a metapatch with. The device side,
which needs ``onnxruntime`` and numpy only, is the package :mod:`dccl_device`.

Both are exported with torch's own ONNX exporter (``torch.onnx.export``, the ``torch.export``-based one), opset
:data:`OPSET`, for ``onnxruntime-training-cpu`` 1.19.2, the last release of ONNX Runtime's on-device training
package. Four things the two do not agree on are mended here (docs/deployment.md, "On ONNX Runtime"):

- ONNX Runtime's training graphs run every ``BatchNormalization`` in training mode, on the batch's statistics
  (and fail to build where the exporter has merged equal statistics into one initializer); the device model's are
  frozen inference-mode layers (DIN's MLP). In the training graph each is replaced by what it computes in
  inference mode, a per-channel ``Mul`` and ``Add`` (:func:`fold_batch_norms`).
- the exporter types the per-row loss of ``cross_entropy(reduction="none")`` as a scalar in the graph's
  ``value_info``; ONNX's checker, which ``generate_artifacts`` runs, refuses the graph. The shape hints are dropped
  (ONNX Runtime infers shapes itself).
- ``generate_artifacts`` builds the optimizer graph with the IR version of the installed ``onnx`` (1.23: IR 14);
  ONNX Runtime 1.19 reads IR 10 at most. The graph uses nothing newer, so it is labelled IR 10.
- its AdamW graph runs the update of Hugging Face's AdamW (``adam_mode`` 1), whose ``eps`` is added before the
  bias correction; the device phase uses ``torch.optim.Adam``'s update, ONNX Runtime's ``adam_mode`` 0, which
  with weight decay 0 is exactly Adam.

Besides, the exporter's notes on every node (torch stack traces) are dropped from what a device downloads.
"""

import os
import tempfile

import numpy as np
import onnx
import onnxruntime
import torch
from onnx import helper, numpy_helper
from onnxruntime.training import artifacts, onnxblock
from recbole.data.interaction import Interaction
from torch import nn

from recbole_dccl.files import write_atomic, write_result_file

OPSET = 18  # ONNX Runtime reads it since 1.14 (torch's exporter defaults to 20); all the device models need
IR_VERSION = 10  # the newest onnxruntime-training 1.19 reads
ARTIFACT_FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint")  # generate_artifacts'
TRAINING_FILES = (*ARTIFACT_FILES, "settings.json")
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults, which the device phase uses


def save_onnx_program(program, input_names, output_names, path):
    """Write ``program`` (a ``torch.export`` program) as one ONNX file."""
    onnx_program = torch.onnx.export(
        program, input_names=input_names, output_names=output_names, opset_version=OPSET, verbose=False
    )
    proto = onnx_program.model_proto
    drop_annotations(proto.graph)
    write_atomic(path, lambda temporary: onnx.save(proto, temporary))


def drop_annotations(graph):
    """Drop the exporter's notes on each node (``pkg.torch.onnx.*``: the torch stack trace, module and FX names),
    which no runtime reads: 64 KB of the 899 KB GRU4Rec device model on ml-100k."""
    for node in graph.node:
        del node.metadata_props[:]


class DeviceStepLoss(nn.Module):
    """The loss one device minimises in the device phase, as a module whose only parameter is that device's
    metapatch (``[1, k]``): ``forward(*features, target, metapatch_start, l2)`` -> the mean data loss of the rows
    plus ``l2 * |metapatch - metapatch_start|^2``. ``l2`` is an input so that the same graph with ``l2 = 0`` is
    the local validation loss of the guard."""

    def __init__(self, device_model, objective):
        super().__init__()
        self.device_model = device_model
        self.objective = objective
        self.metapatch = nn.Parameter(torch.zeros(1, device_model.metapatch_dim))

    def forward(self, *inputs):
        *features, target, start, l2 = inputs
        logits = self.device_model(self.metapatch.expand(target.shape[0], -1), *features)
        loss = self.objective.loss(logits, Interaction({self.objective.target_field: target}))
        return loss.mean() + l2 * ((self.metapatch - start) ** 2).sum()


def fold_batch_norms(graph):
    """Replace each ``BatchNormalization`` of ``graph`` whose scale, bias and statistics are initializers by its
    inference-mode function ``x * a + b`` (``a = scale / sqrt(var + eps)``, ``b = bias - mean * a``, per channel,
    axis 1). Reads the input ranks from the exporter's ``value_info``."""
    constants = {tensor.name: tensor for tensor in graph.initializer}
    ranks = {value.name: len(value.type.tensor_type.shape.dim) for value in graph.value_info}
    nodes = []
    for node in graph.node:
        if node.op_type != "BatchNormalization" or not all(name in constants for name in node.input[1:5]):
            nodes.append(node)
            continue
        scale, bias, mean, var = (numpy_helper.to_array(constants[name]) for name in node.input[1:5])
        epsilon = next((attribute.f for attribute in node.attribute if attribute.name == "epsilon"), 1e-5)
        multiplier = scale / np.sqrt(var + epsilon)
        channel_shape = (-1, *[1] * (ranks[node.input[0]] - 2))
        output = node.output[0]
        for name, values in ((f"{output}.bn_multiplier", multiplier), (f"{output}.bn_shift", bias - mean * multiplier)):
            graph.initializer.append(numpy_helper.from_array(values.astype(np.float32).reshape(channel_shape), name))
        nodes.append(helper.make_node("Mul", [node.input[0], f"{output}.bn_multiplier"], [f"{output}.bn_scaled"]))
        nodes.append(helper.make_node("Add", [f"{output}.bn_scaled", f"{output}.bn_shift"], [output]))
    del graph.node[:]
    graph.node.extend(nodes)


def export_training_artifacts(device_model, objective, settings, example, example_shapes, folder):
    """Write the ``onnxruntime-training`` artifacts of :class:`DeviceStepLoss` to ``folder``, only the metapatch
    trainable, and ``settings.json``: the graph's inputs and the device phase's settings (``settings``, a
    :class:`DeviceSettings`), which a device trains with. ``example``: rows of the device model's features and the
    target (placeholders: the training graph keeps no example), ``example_shapes`` their dynamic dimensions with
    ``batch``, a ``torch.export.Dim`` (a function of it)."""
    step_loss = DeviceStepLoss(device_model, objective).eval()
    inputs = (*example, torch.zeros(1, device_model.metapatch_dim), torch.zeros(()))
    dynamic_shapes = ((*example_shapes(torch.export.Dim("batch", min=1)), None, None),)  # (*inputs,)
    program = torch.export.export(step_loss, inputs, dynamic_shapes=dynamic_shapes)
    input_names = [*device_model.fields, objective.target_field, "metapatch_start", "l2"]
    proto = torch.onnx.export(
        program, input_names=input_names, output_names=["loss"], opset_version=OPSET, verbose=False
    ).model_proto
    fold_batch_norms(proto.graph)
    drop_annotations(proto.graph)
    proto.graph.ClearField("value_info")
    frozen = [tensor.name for tensor in proto.graph.initializer if tensor.name != "metapatch"]
    adam = onnxblock.optim.AdamW(betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=0.0)
    os.makedirs(folder, exist_ok=True)
    onnxruntime.set_default_logger_severity(3)  # errors only: the gradient builder logs every graph pass at INFO
    with tempfile.TemporaryDirectory(dir=folder) as staging:
        artifacts.generate_artifacts(
            proto, requires_grad=["metapatch"], frozen_params=frozen, loss=None, optimizer=adam,
            artifact_directory=staging,
        )
        optimizer = onnx.load(os.path.join(staging, "optimizer_model.onnx"))
        optimizer.ir_version = IR_VERSION
        for node in optimizer.graph.node:
            for attribute in node.attribute:
                if node.op_type == "AdamWOptimizer" and attribute.name == "adam_mode":
                    attribute.i = 0  # torch's Adam(W) update
        onnx.save(optimizer, os.path.join(staging, "optimizer_model.onnx"))
        for name in ARTIFACT_FILES:
            staged = os.path.join(staging, name)
            write_atomic(os.path.join(folder, name), lambda temporary: os.replace(staged, temporary))
    write_result_file(os.path.join(folder, "settings.json"), {
        "inputs": input_names,
        "target": objective.target_field,
        "metapatch_dim": device_model.metapatch_dim,
        "device": settings.device_part(),
        "optimizer": {"name": "Adam", "betas": list(ADAM_BETAS), "eps": ADAM_EPS},
    })
