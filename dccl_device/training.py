"""Training on the device: one user's device phase on ONNX Runtime's on-device training API.

The artifacts (``device_training/``) hold the device phase's loss as a graph whose only trainable parameter is the
metapatch (W_f and Theta frozen in the checkpoint), its gradient graph, an Adam graph and ``settings.json``. What
this module adds is the device phase's procedure, as recbole_dccl's batched phase runs it for every device
(``recbole_dccl/trainer/device_phase.py``): the user's newest ``valid_size`` interactions held out (on implicit
data each is ``rows_per_interaction`` rows: a positive followed by its fixed negatives), ``epochs`` passes over
the others in minibatches of ``batch_size`` in a random order, Adam at ``learning_rate``, and the guard: the cloud
model (a zero metapatch) is kept unless a trained metapatch has a lower loss on the held-out rows (with
``select: best`` the best of the start and every epoch's, with ``last`` the final one).

ONNX Runtime's training objects are called here through its native bindings (``onnxruntime.capi._pybind_state``:
``load_checkpoint``, ``Module``, ``Optimizer``), not through its Python API ``onnxruntime.training.api``: in
``onnxruntime-training`` 1.19.2 importing any of ``onnxruntime.training`` imports torch (the package's
``__init__`` loads its ``optim`` helpers for ORTModule, which need torch), so that API cannot run on a device
without torch. ``onnxruntime.training.api`` is a thin layer over these same objects, which are also what the C,
C++, Java and Objective-C training APIs of ONNX Runtime expose on phones; :class:`OnDeviceTraining` is the part
of that layer used here.
"""

import json
import os
from dataclasses import dataclass

import numpy as np
from onnxruntime.capi import _pybind_state as native
from onnxruntime.capi.onnxruntime_inference_collection import OrtValue

from dccl_device.settings import DeviceSettings


@dataclass
class TrainedMetapatch:
    metapatch: np.ndarray  # [k]: what the device keeps (zero: the cloud model)
    adopted: bool  # the trained metapatch beat the cloud model on the held-out rows
    valid_loss_cloud: float  # loss of the cloud model on the held-out rows (nan: none held out)
    valid_loss_kept: float  # ... of what the device keeps


def read_settings(folder):
    """``settings.json`` of the artifacts in ``folder``: the training graph's ``inputs`` and ``target``, the
    optimizer, and the device phase's settings (``device``: :meth:`DeviceSettings.device_part`)."""
    with open(os.path.join(folder, "settings.json")) as file:
        return json.load(file)


def data_fields(graph):
    """The training graph's inputs that come from the user's data (``graph``: :func:`read_settings`): the device
    model's fields and the target (the last two, ``metapatch_start`` and ``l2``, are the device's own)."""
    return graph["inputs"][:-2]


class OnDeviceTraining:
    """The training artifacts in ``folder`` loaded into ONNX Runtime on the CPU: the checkpoint (every parameter,
    only the metapatch trainable), the training and eval graphs sharing it, and the optimizer (fresh moments)."""

    def __init__(self, folder):
        cpu = native.OrtDevice(native.OrtDevice.cpu(), native.OrtDevice.default_memory(), 0)
        options = native.SessionOptions()
        self.state = native.load_checkpoint(os.path.join(folder, "checkpoint"))
        self.module = native.Module(
            os.path.join(folder, "training_model.onnx"), self.state, os.path.join(folder, "eval_model.onnx"), cpu,
            options,
        )
        self.optimizer = native.Optimizer(os.path.join(folder, "optimizer_model.onnx"), self.state, cpu, options)
        self.input_names = self.module.input_names(True)  # the eval graph's are the same

    @property
    def metapatch(self):
        return self.state.get_parameter("metapatch").data.numpy().copy()  # numpy() is a view of the live parameter

    @metapatch.setter
    def metapatch(self, value):
        self.state.get_parameter("metapatch").copy_from(self.state, OrtValue.ortvalue_from_numpy(value)._ortvalue)

    def loss(self, inputs, train):
        """The graph's loss on ``inputs`` (name -> array); with ``train`` also its gradient, for :meth:`step`."""
        fetches = native.OrtValueVector()
        run = self.module.train_step if train else self.module.eval_step
        run([inputs[name] for name in self.input_names], fetches)
        return float(fetches[0].numpy())

    def step(self, learning_rate):
        """One Adam step of the metapatch with the gradient of the last training :meth:`loss`."""
        self.optimizer.set_learning_rate(learning_rate)
        self.optimizer.optimizer_step()
        self.module.lazy_reset_grad()


def train_metapatch(folder, start, data, shuffle_keys=None, seed=0):
    """One user's device phase from metapatch ``start`` (``[k]``) on ``data`` (field -> array, the user's rows in
    time order) with the artifacts in ``folder``. ``shuffle_keys``: ``[epochs, rows]``, the random key of each row
    in each epoch (an epoch visits the rows in the order of their keys); drawn from ``seed`` when not given."""
    graph = read_settings(folder)
    settings = DeviceSettings.from_device_part(graph["device"])
    training = OnDeviceTraining(folder)
    start = np.asarray(start, dtype=np.float32).reshape(1, -1)
    rows = len(data[graph["target"]])
    held_out = min(settings.valid_size * settings.rows_per_interaction, rows)
    train_rows, valid_rows = np.arange(rows - held_out), np.arange(rows - held_out, rows)
    if shuffle_keys is None:
        shuffle_keys = np.random.default_rng(seed).random((settings.epochs, rows), dtype=np.float32)

    def inputs(batch, l2):
        named = {name: data[name][batch] for name in data_fields(graph)}
        return {**named, "metapatch_start": start, "l2": np.array(l2, dtype=np.float32)}

    def valid_loss(metapatch):
        """The data loss of ``metapatch`` on the held-out rows (``l2`` 0); leaves ``metapatch`` in the model."""
        if not len(valid_rows):
            return float("nan")
        training.metapatch = metapatch
        return training.loss(inputs(valid_rows, 0.0), train=False)

    guarded = settings.valid_size > 0
    every_epoch = guarded and settings.select == "best"
    zeros = np.zeros_like(start)
    kept, kept_loss = zeros, valid_loss(zeros) if guarded else float("nan")
    cloud_loss = kept_loss

    def consider(metapatch):
        nonlocal kept, kept_loss
        loss = valid_loss(metapatch)
        if loss < kept_loss:  # False against nan: without held-out rows the cloud model stays
            kept, kept_loss = metapatch, loss

    if every_epoch:
        consider(start)
    training.metapatch = start
    for epoch, keys in enumerate(shuffle_keys):
        order = train_rows[np.argsort(keys[train_rows], kind="stable")]
        epoch_loss = 0.0
        for first in range(0, len(order), settings.batch_size):
            batch = order[first : first + settings.batch_size]
            epoch_loss += training.loss(inputs(batch, settings.l2), train=True)
            training.step(settings.learning_rate)
        if not np.isfinite(epoch_loss):  # as the batched phase, one check per epoch
            raise FloatingPointError(f"the device's training loss is {epoch_loss} in local epoch {epoch}")
        if every_epoch:
            consider(training.metapatch)
    if not guarded:
        final = training.metapatch.reshape(-1)
        return TrainedMetapatch(final, bool(final.any()), float("nan"), float("nan"))
    if not every_epoch:
        consider(training.metapatch)
    return TrainedMetapatch(kept.reshape(-1), bool(kept.any()), cloud_loss, kept_loss)
